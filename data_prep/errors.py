"""The one exception type for faults in the user's input data.

Why one type: the CLI turns it into a single line on stderr (exit status 2) while genuine bugs
still show a traceback. Every message names the file, the row or field, and what to do.
"""
from __future__ import annotations

__all__ = ["DataPrepError"]


class DataPrepError(Exception):
    """A user-facing fault in input data: unreadable file, bad CSV row, inconsistent series...

    Args:
        message: one or more sentences naming the file and the field, ending with the fix.
        path: the offending file or folder, when there is one (kept for quarantine lists).
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path
