"""One precedence for the MLflow store, one parser for run references."""
from __future__ import annotations

from pathlib import Path

import os
import pytest

from pipeline.errors import PipelineError
from pipeline.store import DEFAULT_OUTPUT_DIR, RunRef, resolve_run_ref, resolve_store

ROOT = Path(__file__).resolve().parents[2]
RID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return monkeypatch


def test_precedence_flag_then_env_then_stored_then_sqlite_beside(no_env, tmp_path):
    beside = tmp_path / "runs"
    default = f"sqlite:///{beside.resolve() / 'mlflow.db'}"
    assert resolve_store(None, stored=None, beside=beside, create=True) == default
    assert beside.is_dir()  # created for a store training or evaluation will open
    assert resolve_store(None, stored="sqlite:///stored.db", beside=beside) == "sqlite:///stored.db"
    no_env.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    # the environment beats what the checkpoint recorded (evaluate used to do it the other way round)
    assert resolve_store(None, stored="sqlite:///stored.db", beside=beside) == "http://env:5000"
    assert resolve_store("sqlite:///flag.db", stored="sqlite:///stored.db", beside=beside) == "sqlite:///flag.db"
    no_env.setenv("MLFLOW_TRACKING_URI", "")  # set but empty counts as unset
    assert resolve_store(None, stored="sqlite:///stored.db") == "sqlite:///stored.db"


def test_lookup_without_create_needs_an_existing_store(no_env, tmp_path):
    with pytest.raises(PipelineError, match=r"no MLflow tracking store is known and there is no .*mlflow\.db: "
                                            r"pass --tracking-uri, set MLFLOW_TRACKING_URI"):
        resolve_store(None, beside=tmp_path)
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert resolve_store(None, beside=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    with pytest.raises(PipelineError, match="no MLflow tracking store is known: pass --tracking-uri"):
        resolve_store(None)


@pytest.mark.parametrize("ref", [RID, f"runs:/{RID}", f"runs:/{RID}/", f"runs:/{RID}/checkpoints/checkpoint-best.pt",
                                 f"  {RID}\n"])
def test_run_id_spellings(no_env, ref):
    assert resolve_run_ref(ref, "sqlite:///x.db") == RunRef(run_id=RID, tracking_uri="sqlite:///x.db")


@pytest.mark.parametrize("ref", ["runs/isic-ecl", RID[:-1], RID + "0", RID.upper(), "run:/" + RID, "checkpoint.pt"])
def test_non_mlflow_references_are_none(no_env, ref):
    assert resolve_run_ref(ref, "sqlite:///x.db") is None


def test_run_id_store_defaults_to_runs_folder_in_the_working_directory(no_env, tmp_path):
    no_env.chdir(tmp_path)
    with pytest.raises(PipelineError, match="no MLflow tracking store is known"):
        resolve_run_ref(RID)
    (tmp_path / DEFAULT_OUTPUT_DIR).mkdir()
    (tmp_path / DEFAULT_OUTPUT_DIR / "mlflow.db").write_bytes(b"")
    assert resolve_run_ref(RID).tracking_uri == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    no_env.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_run_ref(RID).tracking_uri == "http://env:5000"


def test_registered_model_is_followed_to_its_run(no_env, tmp_path):
    from mlflow import MlflowClient

    from pipeline import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.start_run(uri, "store-test") as run_id:
        pass
    client = MlflowClient(tracking_uri=uri)  # a version registered straight from the run: no model upload
    client.create_registered_model("tiny")
    client.create_model_version("tiny", f"runs:/{run_id}/model", run_id=run_id)
    assert resolve_run_ref("models:/tiny/1", uri) == RunRef(run_id=run_id, tracking_uri=uri)
    assert resolve_run_ref("models:/tiny/latest", uri).run_id == run_id
    with pytest.raises(PipelineError, match="registered model 'models:/nope/1' was not found in sqlite"):
        resolve_run_ref("models:/nope/1", uri)


def test_only_the_store_module_reads_the_tracking_environment_variable():
    """Every command finds its store through resolve_store: no module keeps a rule of its own."""
    readers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py")
                     if 'environ.get("MLFLOW_TRACKING_URI")' in p.read_text(encoding="utf-8")
                     or 'environ["MLFLOW_TRACKING_URI"]' in p.read_text(encoding="utf-8"))
    # tracking.py only puts back what mlflow.set_tracking_uri overwrote (tracking._use_store)
    assert readers == ["pipeline/store.py", "pipeline/tracking.py"]
    tracking_src = (ROOT / "pipeline" / "tracking.py").read_text(encoding="utf-8")
    assert tracking_src.count('environ.get("MLFLOW_TRACKING_URI")') == 1


def test_a_tracked_call_leaves_the_environment_variable_as_it_was(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI; left there it would outrank every checkpoint's store."""
    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.ensure_experiment(f"sqlite:///{tmp_path}/a.db", "x")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mine.db")
    tracking.ensure_experiment(f"sqlite:///{tmp_path}/b.db", "x")
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mine.db"
