"""The benchmark runner's bookkeeping: rows read from run folders, tables and docs sections."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.longtail.run import collect_run, load_variants, markdown_tables, summarise, write_section


def _fake_run(root: Path, name: str, method: str, test: float, vals: list[float]) -> Path:
    run = root / name
    (run / "eval-test").mkdir(parents=True)
    lines = ["epoch,train/loss,val/balanced_accuracy"] + [f"{i},1.0,{v}" for i, v in enumerate(vals)]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    payload = {"method": method,
               "metrics": {"balanced_accuracy": test, "ece": 0.1, "ece_calibrated": 0.05,
                           "few_shot_accuracy": test / 2, "many_shot_accuracy": 0.9},
               "bootstrap": {"balanced_accuracy": {"point": test, "lo": test - 0.01, "hi": test + 0.01}},
               "geometry": {"metrics": {"projection/FC": 0.5, "projection/MS": 0.2, "projection/SD": 0.1,
                                        "projection/NC1": 3.0}}}
    (run / "eval-test" / "metrics.json").write_text(json.dumps(payload))
    (run / "benchmark-timing.json").write_text(json.dumps({"train_s": 60.0, "evaluate_s": 10.0}))
    return run


def test_collect_and_summarise(tmp_path: Path):
    rows = [collect_run(_fake_run(tmp_path, f"ecl-s{s}", "ecl", t, [0.2, v, 0.3]), "ecl", s, "p")
            for s, (t, v) in enumerate([(0.70, 0.61), (0.74, 0.65)])]
    rows.append(collect_run(_fake_run(tmp_path, "ce-s0", "ce", 0.6, [0.5]), "ce", 0, "p"))
    assert rows[0]["val_bacc_best"] == 0.61 and rows[1]["val_bacc_best"] == 0.65  # best epoch, not last
    assert rows[0]["proj_FC"] == 0.5 and rows[2]["proj_FC"] is None  # ce has no projection space
    summary = {s["variant"]: s for s in summarise(rows)}
    assert summary["ecl"]["seeds"] == 2 and summary["ecl"]["test_bacc"] == [0.70, 0.74]
    table = markdown_tables(rows, "t", "cmd")
    mean, sd = np.mean([0.70, 0.74]), np.std([0.70, 0.74], ddof=1)
    assert f"| ecl | 2 | 0.630 ± 0.028 | {mean:.3f} ± {sd:.3f} |" in table
    assert "| ce | 1 | 0.500 | 0.600 |" in table
    assert "0.700 [0.690, 0.710]" in table
    assert table.index("| ecl | 2") < table.index("| ce | 1")  # sorted by mean test bacc


def test_write_section_replaces_only_its_block(tmp_path: Path):
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nprose stays\n")
    write_section(doc, "x", "first\n")
    write_section(doc, "y", "other\n")
    write_section(doc, "x", "second\n")
    text = doc.read_text()
    assert "prose stays" in text and "second" in text and "other" in text and "first" not in text


def test_variants_file_must_set_the_method(tmp_path: Path):
    assert load_variants(None, ["ce", "ecl"]) == {"ce": {"method.name": "ce"}, "ecl": {"method.name": "ecl"}}
    bad = tmp_path / "v.yaml"
    bad.write_text("variants:\n  x:\n    method.lam: 0.3\n")
    with pytest.raises(SystemExit, match="must be a mapping that sets method.name"):
        load_variants(bad, [])


def test_stale_keys_flags_a_run_trained_under_other_settings(tmp_path: Path):
    from benchmarks.longtail.run import stale_keys
    from pipeline.config import load_config, save_config

    config = Path(__file__).resolve().parents[2] / "configs" / "longtail_fmnist_cpu.yaml"
    sets = ["--set", "method.name=ecl", "--set", "train.seed=1"]
    save_config(load_config(config, overrides=sets[1::2]), tmp_path / "config.yaml")
    assert stale_keys(tmp_path, config, sets) == {}
    changed = sets + ["--set", "method.loss_weight_normalisation=none"]
    assert stale_keys(tmp_path, config, changed) == {"method.loss_weight_normalisation": ("first_epoch_lc", "none")}
    assert stale_keys(tmp_path / "absent", config, changed) == {}  # nothing trained yet


def test_claim_takes_free_and_stale_folders_but_not_live_ones(tmp_path: Path):
    import subprocess
    import sys

    from benchmarks.longtail.run import _LOCK, _claim

    assert _claim(tmp_path / "a") and _claim(tmp_path / "a")  # ours, twice
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / _LOCK).write_text(done.stdout.strip())  # that process has exited: stale
    assert _claim(tmp_path / "b")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / _LOCK).write_text(str(live.pid))
        assert not _claim(tmp_path / "c")
    finally:
        live.kill()
        live.wait()
