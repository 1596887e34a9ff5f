from __future__ import annotations

import dataclasses

import pytest
import yaml

from pipeline.config import (
    MethodConfig, PrepareConfig, RunConfig, flatten_config, load_config, parse_overrides, save_config,
)
from pipeline.errors import ConfigError
from pipeline.registry import COMMON_DEFAULTS, list_methods, method_spec

_DEFAULTS_3V = dict(temperature=0.07, la_tau=1.0, focal_gamma=2.0)
_ONE_VIEW = dict(_DEFAULTS_3V, mix="ecl", lam=0.5, alignment="duality", alpha=1.0, beta=0.0, gamma=0.0,
                 loss_weight_normalisation="none")
# Every method.* value and model.prototype_head each built-in method resolved to on main before the defaults
# moved into the registry (computed there with load_config(base={"method": {"name": m}})): pinned, so
# moving defaults around can never change a run.
RESOLVED_BEFORE_REGISTRY = {
    "ce": dict(_ONE_VIEW, prototype_head="linear"),
    "la": dict(_ONE_VIEW, prototype_head="linear"),
    "focal": dict(_ONE_VIEW, prototype_head="linear"),
    "weighted_ce": dict(_ONE_VIEW, prototype_head="linear"),
    "supcon": dict(_ONE_VIEW, beta=0.35, prototype_head="linear"),
    "bcl": dict(_ONE_VIEW, mix="bcl", beta=0.35, prototype_head="mlp"),
    "ecl": dict(_DEFAULTS_3V, mix="ecl", lam=0.5, alignment="duality", alpha=0.7, beta=0.3, gamma=0.5,
                loss_weight_normalisation="first_epoch_lc", prototype_head="mlp"),
}


def test_load_config_defaults_resolve_method():
    cfg = load_config()
    assert cfg.method.name == "ecl"
    assert (cfg.method.alpha, cfg.method.beta, cfg.method.gamma) == (0.7, 0.3, 0.5)
    assert cfg.method.mix == "ecl" and cfg.method.lam == 0.5 and cfg.method.alignment == "duality"
    # chosen on the long-tailed benchmark's validation split (docs/method.md, docs/benchmarks.md)
    assert cfg.method.loss_weight_normalisation == "first_epoch_lc"
    assert cfg.model.prototype_head == "mlp"


def test_load_config_bcl_defaults():
    cfg = load_config(overrides=["method.name=bcl"])
    assert cfg.method.mix == "bcl" and cfg.method.beta == 0.35 and cfg.method.gamma == 0.0
    assert cfg.model.prototype_head == "mlp"


def test_load_config_explicit_value_beats_method_default():
    cfg = load_config(overrides=["method.name=bcl", "method.beta=0.5", "model.prototype_head=linear"])
    assert cfg.method.beta == 0.5 and cfg.model.prototype_head == "linear"


def test_parse_overrides_types_and_nesting():
    assert parse_overrides(["train.lr=0.1", "data.augment.vflip=false", "model.backbone=resnet18"]) == {
        "train": {"lr": 0.1}, "data": {"augment": {"vflip": False}}, "model": {"backbone": "resnet18"}}


def test_load_config_typo_in_section_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'\. Did you mean 'train'"):
        load_config(overrides=["trian.lr=1"])


def test_load_config_typo_in_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.backbon'\. Did you mean 'model\.backbone'\?"):
        load_config(overrides=["model.backbon=resnet18"])


def test_load_config_bad_choice_lists_allowed():
    with pytest.raises(ConfigError, match=r"method\.name: 'ecll' is not allowed; choose one of .*'ecl'.*Did you mean 'ecl'\?"):
        load_config(overrides=["method.name=ecll"])


def test_load_config_bad_value_names_key():
    with pytest.raises(ConfigError, match=r"train\.lr: -1 is invalid"):
        load_config(overrides=["train.lr=-1"])


def test_load_config_typo_in_yaml_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'train\.epoch'\. Did you mean 'train\.epochs'"):
        load_config(path)


def test_load_config_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/config.yaml")


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["train.lr"])


def test_save_config_roundtrip_and_salt_redacted(tmp_path):
    cfg = load_config(overrides=["prepare.salt=s3cret", "train.epochs=3"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cret" not in text
    again = RunConfig.model_validate(yaml.safe_load(text))
    assert again.train.epochs == 3
    flat = flatten_config(cfg)
    assert flat["train.epochs"] == 3 and "s3cret" not in str(flat)


def test_prepare_options_mirror_prepare_config():
    from data_prep import PrepareOptions

    assert {f.name for f in dataclasses.fields(PrepareOptions)} == set(PrepareConfig.model_fields)
    assert PrepareOptions(**PrepareConfig().model_dump()) == PrepareOptions()


@pytest.mark.parametrize("name", sorted(RESOLVED_BEFORE_REGISTRY))
def test_resolved_method_defaults_are_unchanged(name):
    flat = flatten_config(load_config(base={"method": {"name": name}}))
    typed = flatten_config(RunConfig())
    got = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("method.") and k != "method.name"}
    got["prototype_head"] = flat["model.prototype_head"]
    assert got == RESOLVED_BEFORE_REGISTRY[name]
    # resolving a method touches only method.* and model.prototype_head
    assert {k for k in flat if flat[k] != typed[k]} <= {f"method.{k}" for k in got} | {"method.name", "model.prototype_head"}


@pytest.mark.parametrize("key,value", [("short_side", 15), ("ct_image_size", 15), ("workers", 0), ("train_fraction", 1.0),
                                       ("crop_mm", 0), ("channels", "rgb"), ("label_key", "mrn"), ("on_error", "ignore")])
def test_prepare_config_and_options_refuse_the_same_values(key, value):
    """One set of bounds: what the YAML config refuses, data_prep.check_options refuses too (and the reverse edge passes)."""
    from data_prep import DataPrepError, PrepareOptions, check_options

    with pytest.raises(ConfigError, match=rf"prepare\.{key}"):
        load_config(overrides=[f"prepare.{key}={value}"])
    with pytest.raises(DataPrepError, match=rf"prepare\.{key}"):
        check_options(PrepareOptions(**{key: value}))


def test_prepare_config_to_options_applies_cli_overrides():
    from data_prep import DataPrepError, PrepareOptions

    cfg = load_config(overrides=["prepare.short_side=40", "prepare.salt=s3cret"])
    opts = cfg.prepare.to_options(on_error="skip", workers=2)
    assert opts == PrepareOptions(short_side=40, salt="s3cret", on_error="skip", workers=2)
    with pytest.raises(DataPrepError, match=r"prepare\.workers is 0"):
        cfg.prepare.to_options(workers=0)


def test_every_builtin_method_is_pinned():
    assert set(RESOLVED_BEFORE_REGISTRY) <= set(list_methods())


@pytest.mark.parametrize("name", list_methods())
def test_resolved_config_takes_every_method_default_from_the_registry(name):
    spec = method_spec(name)
    cfg = load_config(base={"method": {"name": name}})
    assert {k: getattr(cfg.method, k) for k in spec.defaults} == dict(spec.defaults)
    assert cfg.model.prototype_head == spec.prototype_head
    assert None not in cfg.method.model_dump().values()


def test_common_defaults_cover_exactly_the_method_dependent_keys():
    # a new `method.*` key typed `| None` needs a common default, or it would stay None for some methods
    unset = {k for k, f in MethodConfig.model_fields.items() if f.default is None}
    assert set(COMMON_DEFAULTS) == unset


def test_method_registered_at_runtime_is_a_valid_name(monkeypatch):
    import pipeline.registry as registry
    from pipeline.methods import TERM_CE

    list_methods()  # the built-ins, before the table is swapped for a copy the test may grow
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    with pytest.raises(ConfigError, match=r"method\.name: 'runtime_ce' is not allowed; choose one of 'bcl', 'ce'"):
        load_config(overrides=["method.name=runtime_ce"])
    registry.register_method("runtime_ce", n_views=1, terms=(TERM_CE,), defaults={"alpha": 0.25})(lambda *a, **k: None)
    cfg = load_config(overrides=["method.name=runtime_ce"])
    assert cfg.method.name == "runtime_ce" and cfg.method.alpha == 0.25 and cfg.model.prototype_head == "linear"


def test_config_errors_never_repeat_the_salt():
    secret = "hunter2-very-secret"
    for overrides in (["train.lr=-1", f"prepare.salt={secret}"], [f"prepare.salt=[{secret}, x]"],
                      [f"prepare.salt.x={secret}", "train.lr=-1"]):
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides)
        assert secret not in str(info.value)
    with pytest.raises(ConfigError, match=r"prepare\.salt=<redacted>") as info:
        load_config(None, ["train.lr=-1", f"prepare.salt={secret}"])


def test_latin1_config_file_is_one_clear_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes("train:\n  run_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c\.yaml: not UTF-8 text \(byte \d+: b'\\xe9'\); save it as UTF-8"):
        load_config(p)


@pytest.mark.parametrize("name", ["../../x", "a/b", "/tmp/x", "..", "."])
def test_run_name_must_stay_inside_output_dir(name):
    with pytest.raises(ConfigError, match=r"train\.run_name .* must be a plain folder name"):
        load_config(None, [f"train.run_name={name}"])
    assert load_config(None, ["train.run_name=ok-name_1"]).train.run_name == "ok-name_1"


def test_relative_cache_path_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.cache=caches/isic"])
    assert cfg.data.cache == str(tmp_path / "caches" / "isic")
