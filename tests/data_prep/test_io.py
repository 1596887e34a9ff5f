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


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_honours_the_umask_like_open(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask


def test_stale_temp_files_of_a_killed_write_are_removed_on_the_next_write(tmp_path):
    import subprocess
    import sys

    from data_prep.io import TEMP_SUFFIX, _HOST

    target = tmp_path / "pixels.u8"
    # a writer that dies (os._exit, as a kill -9 would) in the middle of an atomic write
    code = ("import os, sys; from data_prep import atomic_open\n"
            "with atomic_open(sys.argv[1], 'wb') as fh:\n    fh.write(b'x' * 1000); fh.flush(); os._exit(9)\n")
    subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".pixels.u8.") and left[0].endswith(TEMP_SUFFIX)
    # a live writer's temp file (this process, another host seen recently) must survive
    mine = tmp_path / f".pixels.u8.{_HOST}-{os_getpid()}.abcd{TEMP_SUFFIX}"
    foreign = tmp_path / f".pixels.u8.otherhost-1.abcd{TEMP_SUFFIX}"
    mine.write_bytes(b"")
    foreign.write_bytes(b"")
    atomic_write_text(target, "done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([foreign.name, mine.name, "pixels.u8"])
    assert target.read_text() == "done"


def test_temp_files_of_the_earlier_mkstemp_writer_are_removed_once_old(tmp_path):
    import os
    import time

    old, fresh = tmp_path / ".cache.json.k3j_x9a2.tmp", tmp_path / ".cache.json.ab12cd34.tmp"
    for p in (old, fresh):
        p.write_bytes(b"x")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (day_ago, day_ago))
    atomic_write_text(tmp_path / "cache.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, "cache.json"])


def os_getpid() -> int:
    import os

    return os.getpid()
