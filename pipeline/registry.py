"""Method registry: each training method's name, factory, views, loss terms and defaults, in one place.

Why: a config names a method by string (`method.name: ecl`), and the registry is what decides which
names exist. Like timm's `default_cfgs` beside each model entrypoint, a method declares where it is
registered everything the rest of the pipeline must know about it: how many views it trains on,
which loss terms it can use (with the `method.*` weight that scales each and the network heads each
trains) and its defaults for the method-dependent keys. `pipeline.config` validates `method.name`
against this table and fills defaults from it; `pipeline.train` asks it which heads to build.
Adding a method is one decorated factory (docs/architecture.md, "Adding a method").

Example:
    >>> from pipeline.registry import create_method, list_methods, method_spec
    >>> list_methods("*ce")
    ['ce', 'weighted_ce']
    >>> method_spec("bcl").defaults["beta"]
    0.35
    >>> method = create_method(cfg.method, class_counts)   # cfg from pipeline.config.load_config
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TypeVar

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:  # for type checkers only: config imports this module, never the reverse at run time
    from .config import MethodConfig

__all__ = [
    "HEADS", "WEIGHT_KEYS", "COMMON_DEFAULTS", "Term", "MethodSpec", "register_method", "method_spec",
    "list_methods", "create_method", "heads_used", "unknown_method_message",
]

F = TypeVar("F", bound=Callable[..., Any])

# The network heads a loss term can train (pipeline.models.EclNetwork).
HEADS = ("classifier", "projection", "prototypes")
# The `method.*` keys that scale loss terms.
WEIGHT_KEYS = ("alpha", "beta", "gamma")

# What a method gets for each method-dependent key (a `method.*` field typed `None` in
# pipeline.config.MethodConfig, plus `model.prototype_head`) that it does not declare itself.
COMMON_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    alpha=1.0, beta=0.0, gamma=0.0, mix="ecl", lam=0.5, alignment="duality", loss_weight_normalisation="none",
))
COMMON_PROTOTYPE_HEAD = "linear"


@dataclass(frozen=True)
class Term:
    """One loss term: the `method.*` weight that scales it and the network heads it back-propagates into.

    A term whose weight resolves to 0 is not computed, and the heads only it trains are not built.
    """

    name: str
    weight: str
    heads: frozenset[str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", frozenset(self.heads))
        if self.weight not in WEIGHT_KEYS:
            raise ValueError(f"term {self.name!r}: weight must be one of {', '.join(WEIGHT_KEYS)}, got {self.weight!r}")
        unknown = sorted(self.heads - set(HEADS))
        if unknown:
            raise ValueError(f"term {self.name!r}: unknown head(s) {unknown}; heads are {', '.join(HEADS)}")


@dataclass(frozen=True)
class MethodSpec:
    """Everything a registered method declares: the single source of its defaults.

    Attributes:
        name: the `method.name` that selects it.
        factory: `factory(method_cfg, class_counts, **kwargs) -> Method`, called with every
            method-dependent key resolved.
        n_views: views per image the data loader must produce (1 or 3 in the built-in methods).
        terms: the loss terms it may compute (those with a positive weight are active).
        defaults: a value for every method-dependent `method.*` key (COMMON_DEFAULTS, then its own).
        prototype_head: default `model.prototype_head` ("linear" or "mlp").
    """

    name: str
    factory: Callable[..., Any]
    n_views: int
    terms: tuple[Term, ...]
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType(dict(COMMON_DEFAULTS)))
    prototype_head: str = COMMON_PROTOTYPE_HEAD

    def term_weights(self) -> dict[str, str]:
        """{term name: the `method.*` key that scales it}."""
        return {t.name: t.weight for t in self.terms}


# Filled by `register_method`. The built-in methods register when `pipeline.methods` is imported,
# which `pipeline.config` does: this module imports neither, so the three never import each other.
_METHODS: dict[str, MethodSpec] = {}


def _checked_defaults(name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """COMMON_DEFAULTS overlaid with the method's own; only method-dependent keys may be set.

    Their values are checked against the config's field types by `pipeline.config` (when the
    method's spec is resolved, and for every registered method in tests/pipeline/test_registry.py).
    """
    unknown = sorted(set(defaults) - set(COMMON_DEFAULTS))
    if unknown:
        raise ValueError(f"method {name!r}: defaults may set only the method-dependent keys "
                         f"({', '.join(COMMON_DEFAULTS)}); {unknown} have one default for every method "
                         f"(pipeline.config.MethodConfig)")
    return {**COMMON_DEFAULTS, **defaults}


def register_method(name: str, *, n_views: int, terms: Iterable[Term], defaults: Mapping[str, Any] | None = None,
                    prototype_head: str = COMMON_PROTOTYPE_HEAD) -> Callable[[F], F]:
    """Decorator: register `factory(method_cfg, class_counts, **kwargs) -> Method` under `name`.

    Args:
        name: the `method.name` that selects it.
        n_views: views per image it trains on.
        terms: the loss terms it may compute.
        defaults: its defaults for method-dependent `method.*` keys; the rest come from COMMON_DEFAULTS.
        prototype_head: its default `model.prototype_head`.
    Raises:
        ValueError: the name is already taken by another factory (two methods must not silently
            shadow each other), no term or a repeated term, or a default that is not a valid value.
    """
    terms = tuple(terms)
    names = [t.name for t in terms]
    if not terms or len(set(names)) != len(names):
        raise ValueError(f"method {name!r}: terms must name at least one term, each once; got {names}")
    if n_views < 1:
        raise ValueError(f"method {name!r}: n_views must be >= 1, got {n_views}")
    resolved = MappingProxyType(_checked_defaults(name, defaults or {}))

    def decorator(factory: F) -> F:
        taken = _METHODS.get(name)
        if taken is not None and taken.factory is not factory:
            raise ValueError(f"method {name!r} is already registered by {taken.factory.__module__}")
        _METHODS[name] = MethodSpec(name, factory, int(n_views), terms, resolved, prototype_head)
        return factory

    return decorator


def list_methods(pattern: str | None = None) -> list[str]:
    """Registered method names, sorted, optionally filtered by a shell pattern (`"*ce"`)."""
    names = sorted(_METHODS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def unknown_method_message(name: Any) -> str:
    """`unknown method 'ecll'. Did you mean 'ecl'? Registered methods: ...` (no key prefix)."""
    valid = list_methods()
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown method {name!r}.{hint} Registered methods: {', '.join(valid)}."


def method_spec(name: str) -> MethodSpec:
    """The spec registered under `name`.

    Raises:
        ConfigError: unknown name, with the closest registered name and the full list.
    """
    spec = _METHODS.get(name)
    if spec is None:
        raise ConfigError(f"method.name: {unknown_method_message(name)}")
    return spec


def create_method(method_cfg: "MethodConfig", class_counts: np.ndarray, **kwargs: Any) -> Any:
    """Build the method named by `method_cfg.name`.

    Args:
        method_cfg: the `method` section; keys still None get the method's registered defaults
            (`pipeline.config.load_config` has already filled them).
        class_counts: [C] training class counts (the logit adjustment and class weights need them).
        **kwargs: passed to the factory (for example `feature_dim=`, `proj_dim=` to check shapes early).
    Returns:
        A `pipeline.methods.Method`.
    Raises:
        ConfigError: unknown name, with the closest registered name and the full list.
        ValueError: the factory built something its registration does not describe (another
            view count, or a term it did not declare).
    """
    spec = method_spec(method_cfg.name)
    unset = {k: v for k, v in spec.defaults.items() if getattr(method_cfg, k, None) is None}
    cfg = method_cfg.model_copy(update=unset) if unset else method_cfg
    method = spec.factory(cfg, class_counts, **kwargs)
    undeclared = sorted(set(method.base_weights) - set(spec.term_weights()))
    if method.n_views != spec.n_views or undeclared:
        raise ValueError(f"method {spec.name!r}: its factory built {method.n_views} view(s) with terms "
                         f"{sorted(method.base_weights)}, but it is registered with n_views={spec.n_views} and "
                         f"terms {sorted(spec.term_weights())}; make register_method(...) match the factory")
    return method


def heads_used(name: str, terms: Iterable[str]) -> dict[str, bool]:
    """{head: some active term trains it} for every head in HEADS.

    A term the method did not declare (or a method not registered) counts as using every head, which
    keeps its heads and DDP's unused-parameter search: safe rather than fast.
    """
    spec = _METHODS.get(name)
    declared = {t.name: t.heads for t in spec.terms} if spec is not None else {}
    terms = set(terms)
    if not terms <= set(declared):
        return {head: True for head in HEADS}
    used = set().union(*(declared[t] for t in terms))
    return {head: head in used for head in HEADS}
