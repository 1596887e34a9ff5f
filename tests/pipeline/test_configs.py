"""Every shipped YAML in configs/ loads, validates, lists only non-default keys, and comments each key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import RunConfig, flatten_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
EXPECTED = {"demo_dermoscopy", "demo_ct", "ct_resnet18_ecl"} | {
    f"isic2019_resnet50_{m}" for m in ("ce", "la", "supcon", "bcl", "ecl")}


def _leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_expected_configs_are_shipped():
    assert EXPECTED <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    if path.stem.startswith("isic2019_resnet50_"):
        assert cfg.method.name == path.stem.rsplit("_", 1)[1]
        assert cfg.model.backbone == "resnet50" and cfg.data.image_size == 224
    if path.stem.startswith("demo_"):
        assert cfg.model.backbone == "test_resnet" and cfg.train.device == "cpu"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_holds_only_non_default_keys(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    defaults = flatten_config(RunConfig())
    # method.name is always spelled out: a config file names the method it trains
    same = [k for k, v in _leaves(raw).items() if defaults[k] == v and k != "method.name"]
    assert same == [], f"{path.name} repeats typed defaults: {same}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_key_is_commented(path):
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and not s.startswith("#") and not s.endswith(":"):
            assert "#" in s, f"{path.name}: key without a comment: {line!r}"


def test_isic_configs_share_one_schedule():
    """Methods are compared under one schedule: only method.* and BCL's head width may differ."""
    flats = {p.stem: flatten_config(load_config(p)) for p in CONFIGS if p.stem.startswith("isic2019_")}
    base = flats["isic2019_resnet50_ce"]
    for name, flat in flats.items():
        diff = {k for k in flat if flat[k] != base[k] and not k.startswith("method.")}
        assert diff <= {"model.proj_dim", "model.prototype_head"}, (name, diff)
