from __future__ import annotations

import hashlib

import pytest

from data_prep import atomic_open, atomic_write_text, bytes_sha256, file_sha256


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]


def test_atomic_open_failure_keeps_old_content_and_no_temp(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(p, "w") as fh:
            fh.write("half")
            raise KeyboardInterrupt
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_hashes_match_hashlib(tmp_path):
    p = tmp_path / "b.bin"
    p.write_bytes(b"x" * 3_000_000)
    assert file_sha256(p) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert bytes_sha256("é") == hashlib.sha256("é".encode()).hexdigest()
