"""write_atomic: all of the new content or the old one, never a part, and no temporary file left."""

from __future__ import annotations

import os

import pytest

from lorakit.files import current_umask, write_atomic


def test_writes_text_and_bytes_with_the_usual_permissions(tmp_path):
    path = tmp_path / "summary.json"
    write_atomic(path, "{\"a\": 1}\n")
    assert path.read_text(encoding="utf-8") == "{\"a\": 1}\n"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~current_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old", encoding="utf-8")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
