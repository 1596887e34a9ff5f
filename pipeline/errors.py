"""User-facing error types of the pipeline.

Why separate types: the CLI prints these as one line and exits with status 2, while any other
exception is a bug and keeps its traceback. Messages name the key/file and what is allowed.
"""
from __future__ import annotations

__all__ = ["ConfigError", "PipelineError"]


class ConfigError(ValueError):
    """A bad config key or value; raised before any work starts."""


class PipelineError(RuntimeError):
    """A user-facing fault at run time: missing run or checkpoint, non-finite loss, bad model file."""
