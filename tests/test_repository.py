"""The repository is the whole project: nothing it ships reads files from outside itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# spelled in pieces so that this file does not match itself
OUTSIDE = ["../" + "shared", "shared" + "/data", "LORAKIT_" + "SHARED"]


def tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def test_nothing_reads_the_sibling_shared_folder():
    places = ("src/", "tests/", "benchmarks/", "examples/", "scripts/", "Makefile", "README.md", ".ci/")
    hits = []
    for name in tracked_files():
        if not name.startswith(places):
            continue
        path = ROOT / name
        text = path.read_text(encoding="utf-8", errors="replace")
        hits += [f"{name}: {word}" for word in OUTSIDE if word in text]
    assert not hits, "files that read data from outside the repository: " + "; ".join(hits)


def test_data_files_are_in_the_repository_with_their_provenance():
    data = ROOT / "data"
    files = sorted(p.name for p in data.iterdir() if p.name != "README.md")
    readme = (data / "README.md").read_text(encoding="utf-8")
    assert files, "data/ is empty"
    for name in files:
        assert f"`{name}`" in readme, f"data/{name} has no provenance line in data/README.md"
        assert f"data/{name}" in tracked_files(), f"data/{name} is not committed"


def test_typed_package_marker_ships():
    assert (ROOT / "src" / "lorakit" / "py.typed").is_file()
