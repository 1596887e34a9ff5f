"""MLflow tracking: the only module that imports mlflow.

Why one module: the artifact location next to the store and the metric naming (`<split>/<name>`)
live in one place, and nothing else needs to know MLflow's API. Which store a command uses is
decided by `pipeline.store.resolve_store` (one precedence for every command).
Telemetry is switched off: nothing may reach the network at run time.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's own defaults retry a dead server for about 4 minutes (7 retries, backoff factor 2, 120 s
# timeout); a tracking store that does not answer should cost seconds, not minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

#: seconds to wait for a TCP connection to an http(s) tracking server before giving up
PROBE_TIMEOUT_S = 5.0

__all__ = [
    "ensure_experiment", "start_run", "log_params", "log_metrics", "set_tags",
    "log_artifact", "log_artifacts", "log_text", "log_dict", "log_torch_model",
    "pinned_requirements", "registered_model_run_id", "get_run", "download_artifacts",
    "search_runs", "sanitize_metric_name", "check_reachable", "project_requirements", "log_pyfunc_model",
    "registered_model_names", "register_model",
]

_BAD_METRIC_CHARS = re.compile(r"[^0-9A-Za-z_\-./ ]")


def _mlflow():
    import mlflow  # deferred: importing mlflow costs about a second

    return mlflow


_probed: set[str] = set()


def check_reachable(uri: str) -> None:
    """For an http(s) tracking URI, open one TCP connection first and fail at once if none opens.

    Why: MLflow retries a dead server with growing pauses and ends in a page of urllib3 traceback;
    a connection attempt with a short timeout turns that into one line within seconds.

    Raises:
        PipelineError: the host cannot be resolved or does not accept connections.
    """
    import socket
    from urllib.parse import urlsplit

    from .errors import PipelineError

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or uri in _probed:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise PipelineError(f"the MLflow tracking server {parts.scheme}://{parts.hostname}:{port} cannot be reached "
                            f"({exc.strerror or type(exc).__name__}). Start it, fix tracking.uri / MLFLOW_TRACKING_URI, "
                            f"or unset them to use a local sqlite store.") from None
    _probed.add(uri)


def _artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts go beside the database (not into the working folder)."""
    if uri.startswith("sqlite:///"):
        root = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
        root.mkdir(parents=True, exist_ok=True)
        return root.resolve().as_uri()
    return None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local sqlite store while it may be created.

    Why: two trainings that start at once on a new store both run MLflow's schema migrations,
    and one of them dies in an alembic race; the lock makes the second wait for the first.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the race stays possible there
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# Tracking-store schemes MLflow accepts (its file, sqlalchemy and REST stores); anything else fails deep inside
# MLflow with a chained traceback, so it is refused up front with the forms that work.
_STORE_SCHEMES = frozenset({"file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks",
                            "databricks-uc"})


def ensure_experiment(uri: str, name: str) -> str:
    """Point mlflow at `uri` and return the id of experiment `name`, creating it if needed.

    Raises:
        PipelineError: the server cannot be reached, or a local store cannot be opened or created.
    """
    from .errors import PipelineError

    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme and scheme not in _STORE_SCHEMES:
        raise PipelineError(f"the MLflow tracking URI {uri!r} has a scheme ({scheme}://) MLflow cannot store runs in; "
                            f"use sqlite:////path/to/mlflow.db, file:///path/to/folder, http(s)://host:port or a "
                            f"database URI (postgresql://, mysql://), in tracking.uri or MLFLOW_TRACKING_URI")
    check_reachable(uri)
    mlflow = _mlflow()
    try:
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        with _store_lock(uri):
            _use_store(mlflow, uri)
            exp = mlflow.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            return mlflow.create_experiment(name, artifact_location=_artifact_root(uri))
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - a store that cannot be opened is the user's to fix
        if not uri.startswith(("sqlite:", "file:")) and "://" in uri and not isinstance(exc, OSError):
            raise
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200]
        raise PipelineError(f"the MLflow store {uri} cannot be opened or created ({type(exc).__name__}: {reason}). "
                            f"Set tracking.uri (or MLFLOW_TRACKING_URI) to a writable location, e.g. "
                            f"sqlite:////a/writable/folder/mlflow.db.") from None


@contextlib.contextmanager
def start_run(
    uri: str,
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Open (or re-open, with `run_id`) a run; yields its id. The run ends FAILED on an exception."""
    mlflow = _mlflow()
    exp_id = ensure_experiment(uri, experiment)
    kwargs: dict[str, Any] = {"run_id": run_id} if run_id else {"experiment_id": exp_id, "run_name": run_name}
    active = mlflow.start_run(**kwargs)
    try:
        if tags:
            mlflow.set_tags({k: str(v) for k, v in tags.items()})
        yield active.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run()


def log_params(params: dict[str, Any]) -> None:
    """Log params (values stringified; MLflow keeps at most 6000 characters each)."""
    mlflow = _mlflow()
    clean = {k: ("None" if v is None else str(v))[:6000] for k, v in params.items()}
    items = list(clean.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


def sanitize_metric_name(name: str) -> str:
    """MLflow allows letters, digits, _ - . / and space; anything else becomes '_'."""
    return _BAD_METRIC_CHARS.sub("_", name)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log finite numeric metrics; None/NaN values ("n/a") are skipped, not logged as zero."""
    import math

    mlflow = _mlflow()
    clean = {}
    for k, v in metrics.items():
        if v is None:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            clean[sanitize_metric_name(k)] = f
    if clean:
        mlflow.log_metrics(clean, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    _mlflow().set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    _mlflow().log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    _mlflow().log_artifacts(str(folder), artifact_path=artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    _mlflow().log_text(text, artifact_file)


def log_dict(data: dict, artifact_file: str) -> None:
    _mlflow().log_dict(data, artifact_file)


def pinned_requirements() -> list[str]:
    """pip requirements of a logged torch model: the exact versions of this environment.

    Why: MLflow otherwise infers them by re-importing the model in a subprocess, which costs about
    20 s per model on a small machine (the demo logs two) and adds nothing we do not know already.
    """
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("torch", "timm", "numpy", "mlflow", "cloudpickle"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def log_torch_model(model: Any, input_example: Any, name: str = "model", register: str | None = None,
                    pip_requirements: list[str] | None = None, serialization_format: str = "pickle") -> str:
    """Log a torch module with a signature inferred from `input_example` (numpy); returns its URI.

    Requirements default to `pinned_requirements()` (no slow inference). Why pickle: MLflow 3's
    default "pt2" format runs torch.export on the input example, which specialises the batch
    dimension to 1, so the loaded model would refuse any other batch size.
    """
    import mlflow.pytorch  # binds `mlflow` with its pytorch flavour loaded
    import torch
    from mlflow.models import infer_signature

    model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(input_example)).cpu().numpy()
    signature = infer_signature(input_example, out)
    # MLflow warns about pickle on every call; the choice is deliberate (see above) and documented.
    flavour_logger = logging.getLogger("mlflow.pytorch")
    level = flavour_logger.level
    flavour_logger.setLevel(logging.ERROR)
    try:
        info = mlflow.pytorch.log_model(
            model, name=name, signature=signature, input_example=input_example, registered_model_name=register,
            pip_requirements=pip_requirements if pip_requirements is not None else pinned_requirements(),
            serialization_format=serialization_format,
        )
    finally:
        flavour_logger.setLevel(level)
    return info.model_uri


def registered_model_run_id(uri: str, model_uri: str) -> str:
    """The run id behind `models:/NAME/VERSION` (or `models:/NAME/latest`)."""
    mlflow = _mlflow()
    parts = model_uri[len("models:/"):].strip("/").split("/")
    if len(parts) != 2 or not parts[0]:
        raise ValueError(f"expected models:/NAME/VERSION, got {model_uri!r}")
    name, version = parts
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    if version == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ValueError(f"no versions of {name!r}")
        mv = max(versions, key=lambda v: int(v.version))
    else:
        mv = client.get_model_version(name, version)
    return str(mv.run_id)


def _use_store(mlflow: Any, uri: str) -> None:
    """Point mlflow's fluent API at `uri` without leaving it in $MLFLOW_TRACKING_URI.

    Why: `mlflow.set_tracking_uri` also writes the environment variable, which
    `pipeline.store.resolve_store` reads as the user's choice; after one tracked call, every later
    store resolution in the process (evaluating another run, comparing runs) would follow the store
    used last instead of the checkpoint's own.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def get_run(uri: str, run_id: str) -> Any:
    """The mlflow Run (params, metrics, tags, artifact_uri)."""
    check_reachable(uri)
    mlflow = _mlflow()
    _use_store(mlflow, uri)
    return mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)


def download_artifacts(uri: str, run_id: str, artifact_path: str, dst: str | Path) -> Path:
    mlflow = _mlflow()
    _use_store(mlflow, uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))


def search_runs(uri: str, experiment: str) -> list[Any]:
    """All finished runs of an experiment, newest first."""
    check_reachable(uri)
    mlflow = _mlflow()
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def project_requirements(distribution: str = "ecl-pipeline") -> list[str]:
    """pip requirements of a model whose code is this project's: every runtime dependency, pinned.

    Read from the installed distribution's metadata (pyproject's `dependencies`, extras left out),
    so a served model lists what its code imports at the versions it was logged with, and MLflow
    does not spend ~20 s inferring them by loading the model in a subprocess.
    """
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        declared = requires(distribution) or []
    except PackageNotFoundError:
        return pinned_requirements()
    reqs = []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        try:
            reqs.append(f"{req.name}=={version(req.name)}")
        except PackageNotFoundError:
            reqs.append(str(req))
    return reqs


def log_pyfunc_model(loader_module: str, data_path: str | Path, name: str, inputs: list[tuple[str, str]],
                     outputs: list[tuple[str, str]], code_paths: list[str | Path] | None = None,
                     pip_requirements: list[str] | None = None) -> str:
    """Log a python_function model loaded by `<loader_module>._load_pyfunc(<data folder>)`; returns its URI.

    Why the loader-module form and not a `mlflow.pyfunc.PythonModel` subclass: the model's code
    then needs no MLflow import (only this module imports mlflow) and nothing is pickled.
    `inputs` are optional columns and `outputs` columns, as (name, MLflow type) pairs; an input
    of type "binary" arrives base64-encoded over HTTP and MLflow's scoring server decodes it.
    `code_paths` travel with the model and come first on sys.path when it is loaded.
    """
    import mlflow.pyfunc  # binds `mlflow` with the pyfunc flavour loaded
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec(t, n, required=False) for n, t in inputs]),
                               outputs=Schema([ColSpec(t, n) for n, t in outputs]))
    with warnings.catch_warnings():
        # an input example would make MLflow load the model in this process to validate it (and put
        # its code paths first on sys.path here); the signature already fixes the request format
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name, loader_module=loader_module, data_path=str(data_path),
            code_paths=[str(c) for c in code_paths] if code_paths else None, signature=signature,
            pip_requirements=pip_requirements if pip_requirements is not None else project_requirements(),
        )
    return info.model_uri


def registered_model_names(uri: str, run_id: str) -> list[str]:
    """Names of the registered models that hold a version logged by run `run_id` (sorted)."""
    check_reachable(uri)
    client = _mlflow().MlflowClient(tracking_uri=uri)
    return sorted({mv.name for mv in client.search_model_versions(f"run_id='{run_id}'")})


def register_model(model_uri: str, name: str) -> str:
    """Register `model_uri` as a new version of the registered model `name`; returns the version."""
    return str(_mlflow().register_model(model_uri, name).version)
