"""The benchmark scripts live outside the installed packages: make `benchmarks` importable.

Appended (not prepended) to sys.path, so `pipeline` and `data_prep` still resolve to the installed
package, as in every other test.
"""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
