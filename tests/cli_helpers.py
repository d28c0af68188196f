"""Running the `lorakit` command in the test process, as the tests that drive the CLI do."""

from __future__ import annotations

from lorakit.cli import main


def run_cli(*argv) -> int:
    """`lorakit ARGV...` in this process (arguments may be paths); returns the exit code."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)
    return 0
