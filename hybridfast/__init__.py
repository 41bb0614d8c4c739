"""hybridfast: a fast, exact engine for hybrid (base + thinking) steering and power sampling.

Importing this package is lean: no CUDA initialisation, no compilation, no printing, no
network. Heavy submodules load on first attribute access.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ops": ("hybridfast.ops", None),
    "Engine": ("hybridfast.engine", "Engine"),
    "HybridModel": ("hybridfast.hybrid", "HybridModel"),
    "PowerSampler": ("hybridfast.power", "PowerSampler"),
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = importlib.import_module(mod)
        val = m if attr is None else getattr(m, attr)
        globals()[name] = val
        return val
    raise AttributeError(f"module 'hybridfast' has no attribute {name!r}")
