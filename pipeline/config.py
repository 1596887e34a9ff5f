"""Typed run configuration: YAML files under configs/ validated into pydantic sections.

Why pydantic with `extra="forbid"`: a typo (`trian.lr`) or a bad value (`method.name: ecll`) must
fail before any work starts, naming the key, the value and what is allowed, with close-match
suggestions. `--set a.b=value` overrides any key (the value is parsed as YAML, so numbers, lists
and booleans work). Every run writes its resolved config (`save_config`) and logs it flattened.

Method names and method-dependent defaults (BCL's beta = 0.35, ECL's alpha = 0.7, ...) belong to
the method registry (`pipeline.registry`), declared where each method is registered: `method.name`
is checked against it (so a method registered at run time is accepted), the method-dependent keys
are left as None here and filled from it by `resolve_method_defaults`, so the resolved config shows
the values actually used.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic_core import PydanticCustomError

from data_prep import PREPARE_CHOICES, PREPARE_RULES, PrepareOptions, atomic_write_text, check_options

from . import methods as _builtin_methods  # noqa: F401  registers the built-in methods with the registry
from .errors import ConfigError
from .registry import list_methods, method_spec

__all__ = [
    "PrepareConfig", "AugmentConfig", "DataConfig", "ModelConfig", "MethodConfig", "TrainConfig",
    "EvalConfig", "TrackingConfig", "RunConfig", "load_config", "parse_overrides", "save_config",
    "flatten_config", "public_config", "resolve_method_defaults",
]


REDACTED = "<redacted>"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _PrepareSection(_Section):
    def to_options(self, **overrides: Any) -> PrepareOptions:
        """These settings (and the CLI's `overrides`) as the `data_prep.PrepareOptions` every `prepare_*` takes.

        Raises:
            DataPrepError: an override breaks a rule of `data_prep.options` (the CLI prints it).
        """
        options = PrepareOptions(**{**self.model_dump(), **overrides})
        check_options(options)
        return options


def _prepare_fields() -> dict[str, Any]:
    """PrepareConfig's fields from `data_prep.options`: the same names, defaults, bounds and choices.

    Why generated: the options were defined twice with different bounds (short_side >= 8 in
    data_prep, >= 16 here); now `data_prep.options.PREPARE_RULES` is the one place to change them.
    """
    hints = typing.get_type_hints(PrepareOptions)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(PrepareOptions):
        annotation = Literal[PREPARE_CHOICES[f.name]] if f.name in PREPARE_CHOICES else hints[f.name]  # type: ignore[valid-type]
        out[f.name] = (annotation, Field(f.default, **PREPARE_RULES.get(f.name, {})))
    return out


#: How `ecl prepare` builds a cache (dermoscopy, generic images and CT); fields as data_prep.PrepareOptions.
PrepareConfig = create_model("PrepareConfig", __base__=_PrepareSection, __module__=__name__, **_prepare_fields())
PrepareConfig.__doc__ = "How `ecl prepare` builds a cache: the fields, defaults and bounds of data_prep.PrepareOptions."


class AugmentConfig(_Section):
    """Albumentations settings of the three training views (docs/method.md, "Model", views)."""

    crop_scale_min: float = Field(0.35, gt=0, le=1, description="random resized crop: smallest area fraction")
    hflip: bool = True
    vflip: bool = Field(True, description="dermoscopy has no up/down; turn off for CT")
    color_jitter: float = Field(0.4, ge=0, le=1)
    color_jitter_p: float = Field(0.8, ge=0, le=1)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    strong_ops: int = Field(2, ge=0, le=6, description="RandAugment-like: ops per image on view 0")
    strong_magnitude: int = Field(9, ge=0, le=30)


class DataConfig(_Section):
    cache: str = Field("", description="prepared cache folder (from `ecl prepare`)")
    image_size: int = Field(224, ge=16)
    num_workers: int | None = Field(None, ge=0, description="loader processes; None = auto from the cores and the device (pipeline.threads)")
    pin_memory: bool = True
    persistent_workers: bool = True
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class ModelConfig(_Section):
    backbone: str = "resnet50"
    pretrained_file: str | None = Field(None, description="local weights file; never downloaded")
    proj_dim: int | None = Field(None, ge=2, description="projection size d_z; None = backbone width d")
    prototype_head: Literal["linear", "mlp"] | None = Field(None, description="None = the method's default")
    classifier_scale: float = Field(30.0, gt=0)
    drop_rate: float = Field(0.0, ge=0, lt=1)


class MethodConfig(_Section):
    """The training method (`pipeline.registry`). Keys typed `... | None` are method-dependent: None
    means "the method's registered default", filled by `resolve_method_defaults`."""

    name: str = Field("ecl", description="a registered method (pipeline.registry.list_methods())")
    temperature: float = Field(0.07, gt=0)
    la_tau: float = Field(1.0, ge=0)
    mix: Literal["ecl", "bcl"] | None = None
    lam: float | None = Field(None, ge=0, le=1)
    alignment: Literal["duality", "gram"] | None = None
    alpha: float | None = Field(None, ge=0)
    beta: float | None = Field(None, ge=0)
    gamma: float | None = Field(None, ge=0)
    loss_weight_normalisation: Literal["first_epoch", "first_epoch_lc", "none"] | None = None
    focal_gamma: float = Field(2.0, ge=0)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        # asked at validation time, so a method registered after this module was imported is accepted
        names = list_methods()
        if name not in names:
            expected = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}" if len(names) > 1 else repr(names[0])
            raise PydanticCustomError("unknown_method", "not a registered method; choose one of {expected}",
                                      {"expected": expected})
        return name


class TrainConfig(_Section):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=2)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: int = Field(2, ge=0)
    grad_clip: float | None = Field(5.0, gt=0)
    sampler: Literal["random", "class_balanced", "sqrt"] = "random"
    amp: Literal["auto", "none", "bf16", "fp16"] = Field("auto", description="auto = bf16 on CUDA, none on CPU")
    channels_last: bool | None = Field(None, description="None = on for CUDA")
    compile: bool = False
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None = auto: $OMP_NUM_THREADS, else the cores left after the loader workers")
    finite_check_every: int = Field(32, ge=1, description="steps between checks that the loss is finite (one host sync per check)")
    output_dir: str = "runs"
    run_name: str | None = None
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap steps per epoch (smoke tests)")
    init_from: str | None = Field(None, description="checkpoint path or MLflow run/model URI to fine-tune from")


class EvalConfig(_Section):
    n_bootstrap: int = Field(1000, ge=100)
    bootstrap_seed: int = 0
    n_bins: int = Field(15, ge=2)
    temperature_scaling: bool = True
    min_subgroup_size: int = Field(30, ge=1, description="smaller subgroups are flagged as too small")
    batch_size: int = Field(128, ge=1)
    saliency_per_class: int = Field(2, ge=0, le=10, description="Grad-CAM images per class in the report, "
                                    "correct and wrong each; 0 = no saliency section")


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="None = env MLFLOW_TRACKING_URI, else sqlite in the output folder")
    experiment: str = "ecl"
    registered_model: str | None = Field(None, description="register the final model under this name")


class RunConfig(_Section):
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = RunConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


_SECRET_KEYS = {"prepare.salt"}


def redact_overrides(overrides: list[str]) -> list[str]:
    """`--set` arguments as they may be printed: the value of a secret key (the salt) replaced."""
    out = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        dotted = ".".join(p for p in key.strip().split(".") if p)
        secret = any(dotted == k or dotted.startswith(k + ".") for k in _SECRET_KEYS)
        out.append(f"{key}={REDACTED}" if sep and secret else item)
    return out


def _describe(err: dict, data: dict) -> str:
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc)
    if key in _SECRET_KEYS:  # never echo a secret, even a malformed one
        return f"{key}: the value is invalid ({err['msg']}); give the salt as a plain string."
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(loc[-1], allowed, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr('.'.join(loc[:-1] + (c,))) for c in close)}?" if close else ""
        return f"unknown key '{key}'.{hint} Allowed keys here: {', '.join(allowed)}."
    value = err.get("input")
    msg = err["msg"]
    if err["type"] in ("literal_error", "unknown_method"):
        expected = err.get("ctx", {}).get("expected", "")
        options = [o.strip().strip("'") for o in expected.replace(" or ", ",").split(",") if o.strip()]
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{key}: {value!r} is not allowed; choose one of {expected}.{hint}"
    return f"{key}: {value!r} is invalid: {msg}."


def _validate(data: dict, source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e, data) for e in exc.errors()]
        raise ConfigError(f"{source}: " + " ".join(lines)) from None


def parse_overrides(overrides: list[str] | None) -> dict:
    """Turn ['train.lr=0.1', 'model.backbone=resnet18'] into a nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides or []:
        shown = redact_overrides([item])[0]
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=0.05")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {shown!r}: the key is empty")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else None
        except yaml.YAMLError:
            value = raw
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {shown!r}: '{p}' is a value, not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_method_defaults(cfg: RunConfig) -> RunConfig:
    """Fill the None fields of `method` and `model.prototype_head` with the method's registered defaults.

    Raises:
        ConfigError: `method.name` is not registered (a config built without validation).
    """
    spec = method_spec(cfg.method.name)
    data = cfg.model_dump()
    for key, value in spec.defaults.items():
        if data["method"].get(key) is None:
            data["method"][key] = value
    if data["model"]["prototype_head"] is None:
        data["model"]["prototype_head"] = spec.prototype_head
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:  # the user's values were valid before: a registered default is not
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}={e['input']!r}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"method {spec.name!r} registers an invalid default ({bad}); fix its register_method "
                          f"call in {spec.factory.__module__}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Load YAML (optional), apply `base` then `--set` overrides, validate and resolve defaults.

    A relative `data.cache` is made absolute (against the working folder), so that the config a
    run stores still finds its cache when the run is evaluated from elsewhere; `train.run_name`
    must be a plain folder name. Messages never repeat the value of `prepare.salt`.

    Raises:
        ConfigError: unreadable file, unknown key (with suggestions) or invalid value.
    """
    data: dict = dict(base or {})
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist. Pass a YAML file from configs/, e.g. configs/demo_dermoscopy.yaml.")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                              f"save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, method, train, ...)")
        data = _merge(data, loaded)
    over = parse_overrides(overrides)
    if over:
        data = _merge(data, over)
        source = f"{source} with --set {' '.join(redact_overrides(overrides or []))}"
    cfg = resolve_method_defaults(_validate(data, source))
    _check_run_name(cfg, source)
    if cfg.data.cache and not Path(cfg.data.cache).expanduser().is_absolute():
        # stored with the run: a relative path would point elsewhere when evaluated from another folder
        cfg.data.cache = str(Path(cfg.data.cache).expanduser().resolve())
    return cfg


def _check_run_name(cfg: RunConfig, source: str) -> None:
    """train.run_name is one folder name inside train.output_dir: refuse one that climbs out of it.

    Why: the run folder is `output_dir / run_name`; `../../x` or an absolute path would write a
    run (and later delete or overwrite files) outside the folder the user chose.
    """
    name = cfg.train.run_name
    if name is None:
        return
    p = Path(name)
    if not name.strip() or p.is_absolute() or len(p.parts) != 1 or name in (".", "..") or "\\" in name:
        raise ConfigError(f"{source}: train.run_name {name!r} must be a plain folder name (no '/', '..' or absolute "
                          f"path): the run is created inside train.output_dir ({cfg.train.output_dir}).")


def public_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data, with secrets (the pseudonym salt) redacted.

    Why: configs are saved beside every run and logged to MLflow; the salt must never leave
    the user's own config or environment, or pseudonyms could be reversed by brute force.
    """
    data = cfg.model_dump(mode="json")
    if data["prepare"].get("salt"):
        data["prepare"]["salt"] = REDACTED
    return data


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (secrets redacted) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(public_config(cfg), sort_keys=False))


def flatten_config(cfg: RunConfig | dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}, for MLflow params."""
    data = public_config(cfg) if isinstance(cfg, RunConfig) else cfg
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out
