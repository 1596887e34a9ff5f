"""Train and evaluate against a real MLflow tracking server over HTTP, then read the metrics back.

Why: users point `tracking.uri` at a shared `mlflow server`; the file/sqlite stores the other
tests use do not exercise the REST client, proxied artifact upload (`--serve-artifacts`) or the
re-opening of a run by id over HTTP. The server runs as a subprocess on a free local port with a
sqlite backend and an artifact folder in the test's temporary directory; every wait is bounded.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _evalkit as evalkit  # noqa: E402  registered by conftest.py



def _mlflow_command() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.is_file() else [shutil.which("mlflow") or "mlflow"]


@pytest.fixture()
def mlflow_server(tmp_path):
    port = evalkit.free_port()
    log = open(tmp_path / "server.log", "wb")
    cmd = [*_mlflow_command(), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path}/db.sqlite",
           "--artifacts-destination", str(tmp_path / "art"), "--serve-artifacts", "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        evalkit.wait_until_up(f"{url}/health", proc, tmp_path / "server.log", "mlflow server", 90, poll_s=0.5)
        yield url
    finally:
        evalkit.stop_process_group(proc)
        log.close()


def test_train_and_evaluate_over_http_tracking_server(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.evaluate import run_evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = evalkit.build_cache(tmp_path / "cache", seed=6)
        trained = evalkit.train_tiny(cache, tmp_path / "runs", mlflow_server, method="ce", run_name="http-run")
        assert trained.tracking_uri == mlflow_server
        result = run_evaluate(str(trained.run_dir), split="test", n_bootstrap=100)
    finally:
        torch.set_num_threads(before)

    assert result.run_id == trained.run_id  # the training run was re-opened over HTTP
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    logged = run.data.metrics
    assert logged["test/balanced_accuracy"] == pytest.approx(result.metrics["balanced_accuracy"])
    assert logged["test/ece"] == pytest.approx(result.metrics["ece"])
    assert logged["test/balanced_accuracy_ci_low"] == pytest.approx(result.metrics["balanced_accuracy_ci_low"])
    assert "val/balanced_accuracy" in logged  # training's own metrics are in the same run
    report = {a.path for a in client.list_artifacts(trained.run_id, "report")}
    assert "report/report.html" in report
    # the artifact went through the server's proxy into its artifact folder
    assert list((tmp_path / "art").rglob("report.html"))
