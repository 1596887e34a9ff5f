"""Training, evaluation and reporting for imbalanced medical image classification (ECL and peers).

Submodules load on first use so `import pipeline` (and `ecl --help`) stay fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_config", "create_network", "create_method", "list_methods"]

_WHERE = {"load_config": "config", "create_network": "models", "create_method": "registry", "list_methods": "registry"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
