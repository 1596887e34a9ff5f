"""MLflow store faults: a store that cannot be created, a dead server, two trainings creating one store."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import tracking
from pipeline.errors import PipelineError


def test_unwritable_sqlite_store_is_one_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PipelineError, match=r"the MLflow store sqlite:///.*a-file/mlflow\.db cannot be opened or created"):
        tracking.ensure_experiment(f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}", "x")


def test_unknown_uri_scheme_is_one_clear_error():
    """A scheme MLflow cannot store runs in fails before MLflow does (it raised a chained traceback)."""
    with pytest.raises(PipelineError, match=r"'foo://bar' has a scheme \(foo://\) MLflow cannot store runs in; use sqlite"):
        tracking.ensure_experiment("foo://bar", "x")


@pytest.mark.timeout(30)  # refused in seconds, never hangs on retries (the timeout is the check)
def test_dead_server_is_refused_by_the_probe_within_seconds():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PipelineError, match=rf"tracking server http://127\.0\.0\.1:{port} cannot be reached"):
        tracking.get_run(f"http://127.0.0.1:{port}", "0" * 32)


def test_two_processes_creating_one_new_store_at_once(tmp_path):
    """Both must succeed: MLflow's schema migration of a new sqlite store races without the lock."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # both import mlflow first, say so with a file, and start together when both files exist
    code = ("import sys, time, pathlib; from pipeline import tracking; import mlflow\n"
            "gate = pathlib.Path(sys.argv[2]); (gate / sys.argv[3]).touch()\n"
            "while len(list(gate.iterdir())) < 2: time.sleep(0.002)\n"
            "print(tracking.ensure_experiment(sys.argv[1], 'race'))\n")
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(gate), str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(ids) == 1  # one experiment, found by the second process
