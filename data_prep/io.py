"""Atomic writes, content hashing and strict reading of the user's CSVs, shared by every stage.

Why: a crash or Ctrl-C must never leave a half-written manifest, cache or checkpoint behind.
Every output goes to a temporary file in the same folder and is moved into place with
`os.replace`, which is atomic on POSIX and Windows. `pipeline` reuses these helpers.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "file_sha256", "bytes_sha256", "read_user_csv"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; rename it onto `path` on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path`
    keeps its previous content, if any.
    """
    if "r" in mode or "a" in mode:
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} is not supported")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataPrepError(f"{path}: cannot be read as CSV ({exc}). {fix}", str(path)) from None
