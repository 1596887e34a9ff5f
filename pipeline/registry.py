"""Name -> factory table for training methods (timm-style registry).

Why: a config names a method by string (`method.name: ecl`); adding a method means writing one
factory in `pipeline/methods.py` (its `BUILTIN_METHODS` table), never editing an if/else chain; code
outside the package adds one with `@register_method("name")`.

Example:
    >>> from pipeline.registry import create_method, list_methods
    >>> list_methods("*ce")
    ['ce', 'weighted_ce']
    >>> method = create_method(cfg.method, class_counts)   # cfg from pipeline.config.load_config
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np

from .errors import ConfigError
from .methods import BUILTIN_METHODS

if TYPE_CHECKING:  # the config module is only needed for type checkers here
    from .config import MethodConfig

__all__ = ["register_method", "create_method", "list_methods", "is_method"]

F = TypeVar("F", bound=Callable[..., Any])

_METHODS: dict[str, Callable[..., Any]] = dict(BUILTIN_METHODS)


def register_method(name: str) -> Callable[[F], F]:
    """Decorator: register `factory(method_cfg, class_counts, **kwargs) -> Method` under `name`.

    Raises:
        ValueError: the name is already taken (two methods must not silently shadow each other).
    """

    def decorator(factory: F) -> F:
        if name in _METHODS and _METHODS[name] is not factory:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__module__}")
        _METHODS[name] = factory
        return factory

    return decorator


def list_methods(pattern: str | None = None) -> list[str]:
    """Registered method names, sorted, optionally filtered by a shell pattern (`"*ce"`)."""
    names = sorted(_METHODS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def is_method(name: str) -> bool:
    """True when `name` is registered."""
    return name in _METHODS


def create_method(method_cfg: "MethodConfig", class_counts: np.ndarray, **kwargs: Any) -> Any:
    """Build the method named by `method_cfg.name`.

    Args:
        method_cfg: the resolved `method` section (`pipeline.config.load_config` fills its defaults).
        class_counts: [C] training class counts (the logit adjustment and class weights need them).
        **kwargs: passed to the factory (for example `feature_dim=`, `proj_dim=` to check shapes early).
    Returns:
        A `pipeline.methods.Method`.
    Raises:
        ConfigError: unknown name, with the closest registered name and the full list.
    """
    name = method_cfg.name
    factory = _METHODS.get(name)
    if factory is None:
        valid = sorted(_METHODS)
        close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"method.name: unknown method {name!r}.{hint} Registered methods: {', '.join(valid)}.")
    return factory(method_cfg, class_counts, **kwargs)
