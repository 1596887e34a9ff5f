"""Which MLflow store a command talks to, and which run a reference names.

Why one module: train, evaluate, predict, compare, geometry and checkpoint lookup each used to
pick the tracking store by a rule of their own (evaluate alone let the checkpoint's recorded URI
beat MLFLOW_TRACKING_URI) and parse run ids with two different patterns. Here is the one rule
and the one parser; mlflow itself stays behind `pipeline.tracking`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError

__all__ = ["resolve_store", "resolve_run_ref", "RunRef", "DEFAULT_OUTPUT_DIR", "STORE_FILE"]

#: train.output_dir's default: where a run id is looked up when nothing else names a store
DEFAULT_OUTPUT_DIR = Path("runs")
#: the sqlite file a local store keeps beside the run folders
STORE_FILE = "mlflow.db"
_RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})(?:/.*)?$")


def resolve_store(flag: str | None = None, *, stored: str | None = None, beside: str | Path | None = None,
                  create: bool = False) -> str:
    """The MLflow tracking URI to use, by one precedence for every command:

    1. `flag`: what the user named for this call (--tracking-uri, or tracking.uri in the config
       `ecl train` runs with);
    2. the environment variable MLFLOW_TRACKING_URI;
    3. `stored`: the URI the checkpoint recorded when it was trained (where its run lives);
    4. sqlite:///<beside>/mlflow.db, the local store beside the run folders (train.output_dir).

    Why this order: what the user says now beats what was true at training time (a store that
    moved, a server that took over from a local file), and the environment is how a user says it
    once for every command; the recorded URI still finds the run with no setting at all.

    Args:
        beside: folder holding the run folders (and the sqlite store); None when there is none.
        create: make `beside` (training and evaluation open a new store there); without it the
            sqlite file must already exist.

    Raises:
        PipelineError: no rule applies (no flag, variable, recorded URI, or existing store).
    """
    for uri in (flag, os.environ.get("MLFLOW_TRACKING_URI"), stored):
        if uri:
            return str(uri)
    if beside is not None:
        db = Path(beside).expanduser().resolve() / STORE_FILE
        if create:
            db.parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{db}"
        if db.is_file():
            return f"sqlite:///{db}"
    where = f" and there is no {Path(beside) / STORE_FILE}" if beside is not None else ""
    raise PipelineError(f"no MLflow tracking store is known{where}: pass --tracking-uri, set MLFLOW_TRACKING_URI, "
                        f"or give the run folder / checkpoint file instead of a run id")


@dataclass(frozen=True)
class RunRef:
    """An MLflow run and the store it lives in."""

    run_id: str
    tracking_uri: str


def resolve_run_ref(ref: str | Path, tracking_uri: str | None = None) -> RunRef | None:
    """The MLflow run behind `ref`, or None when `ref` is no MLflow reference (then it is a path).

    MLflow references: a run id (32 hex digits), runs:/<id>[/artifact path], or a registered
    model models:/NAME/VERSION or models:/NAME/latest (followed to the run that logged it). The
    store comes from `resolve_store(tracking_uri, beside=runs/)`. Callers test for a path first,
    so a folder that happens to be named like a run id still counts as a folder.

    Raises:
        PipelineError: no store is known, or the registered model is not in it.
    """
    text = str(ref).strip()
    if text.startswith("models:/"):
        from . import tracking

        uri = resolve_store(tracking_uri, beside=DEFAULT_OUTPUT_DIR)
        try:
            run_id = tracking.registered_model_run_id(uri, text)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - mlflow raises its own types for a missing model
            raise PipelineError(f"registered model {text!r} was not found in {uri} ({exc})") from None
        return RunRef(run_id=run_id, tracking_uri=uri)
    match = _RUN_ID.match(text)
    if match is None:
        return None
    return RunRef(run_id=match.group(1), tracking_uri=resolve_store(tracking_uri, beside=DEFAULT_OUTPUT_DIR))
