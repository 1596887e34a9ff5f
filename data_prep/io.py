"""Atomic writes, content hashing and strict reading of the user's CSVs, shared by every stage.

Why: a crash or Ctrl-C must never leave a half-written manifest, cache or checkpoint behind.
Every output goes to a temporary file in the same folder and is moved into place with
`os.replace`, which is atomic on POSIX and Windows. `pipeline` reuses these helpers. The file is
created with the permissions the umask gives (as `open()` would), and the temporary files of a
killed write (`.<name>.<host>-<pid>.<random>.ecl-tmp`) are deleted by the next write of the same file.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_open", "clean_stale_temps", "TEMP_SUFFIX", "atomic_write_bytes", "atomic_write_text", "file_sha256", "bytes_sha256", "read_user_csv"]


#: suffix of an atomic write's temporary file: `.<name>.<host>-<pid>.<random>.ecl-tmp`
TEMP_SUFFIX = ".ecl-tmp"
_HOST = socket.gethostname().replace(".", "_").replace(os.sep, "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(path: str | os.PathLike, foreign_age_s: float = 24 * 3600) -> int:
    """Delete temporary files left by interrupted atomic writes of `path`; returns how many.

    Why: a kill during a write leaves `.<name>.<host>-<pid>.<random>.ecl-tmp` behind (gigabytes for
    a cache's pixel file). A temp file is stale when its writer, named in it, is a process of this
    host that no longer runs; one from another host (a shared volume), or one left by an earlier
    version of this package (`.<name>.<random>.tmp`), only after `foreign_age_s`.
    """
    import glob
    import time

    path = Path(path)
    removed = 0
    folder, name = glob.escape(str(path.parent)), glob.escape(path.name)
    # earlier versions used tempfile.mkstemp: `.<name>.<8 random characters>.tmp`, writer unknown, so by age only
    for tmp in glob.glob(os.path.join(folder, f".{name}.{'[a-z0-9_]' * 8}.tmp")):
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(tmp) > foreign_age_s:
                os.unlink(tmp)
                removed += 1
    for tmp in glob.glob(os.path.join(folder, f".{name}.*{TEMP_SUFFIX}")):
        writer = os.path.basename(tmp)[len(path.name) + 2: -len(TEMP_SUFFIX)].split(".")[0]
        host, _, pid = writer.rpartition("-")
        try:
            if host == _HOST and pid.isdigit():
                stale = int(pid) != os.getpid() and not _pid_alive(int(pid))
            else:
                stale = time.time() - os.path.getmtime(tmp) > foreign_age_s
            if stale:
                os.unlink(tmp)
                removed += 1
        except OSError:
            continue
    return removed


def _create_temp(path: Path) -> tuple[int, str]:
    """Open a new temporary sibling of `path` with the permissions a plain open() would give.

    Why not `tempfile.mkstemp`: it creates files with mode 0600 whatever the umask, so a cache or
    run written on a shared volume could not be read by a colleague or a container's other user.
    `os.open(..., 0o666)` lets the umask decide, exactly as for any other file the user writes.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; rename it onto `path` on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path`
    keeps its previous content, if any. Temporary files of earlier, killed writes of the same
    `path` are deleted first (`clean_stale_temps`); the new file's mode follows the umask.
    """
    if "r" in mode or "a" in mode:
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} is not supported")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes | str) -> str:
    """Hex SHA-256 of bytes (str is UTF-8 encoded first)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def read_user_csv(path: str | os.PathLike, missing: str, fix: str = "Save it as comma-separated UTF-8."):
    """Read a user-supplied CSV as strings (no NA guessing), or raise one clear DataPrepError.

    Args:
        path: the CSV file.
        missing: the whole message when the file does not exist.
        fix: the sentence that follows "<path>: cannot be read as CSV (<reason>)." when parsing fails.
    """
    import pandas as pd

    from .errors import DataPrepError

    path = Path(path)
    if not path.is_file():
        raise DataPrepError(missing, str(path))
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataPrepError(f"{path}: cannot be read as CSV ({exc}). {fix}", str(path)) from None
    if len(df.columns) == 1 and any(sep in str(df.columns[0]) for sep in (";", "\t")):
        sep = "semicolons" if ";" in str(df.columns[0]) else "tabs"
        raise DataPrepError(f"{path}: the columns are separated by {sep}, not commas (header {str(df.columns[0])[:80]!r}). "
                            f"Save it as comma-separated CSV (in Excel: 'CSV UTF-8 (Comma delimited)').", str(path))
    return df
