"""Triton kernels of hybridfast (installed as ``hybridfast.kernels``).

Importing this package imports triton; ``hybridfast.ops`` only does so when a Triton
implementation is actually requested, so ``import hybridfast`` stays lean.
"""
import sys

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the working directory is this repository's root, so this
    # folder shadows the PyPI package ``kernels`` that transformers imports. Load that one instead
    # (a module may replace itself in ``sys.modules`` while it is imported).
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ImportError("no module named 'kernels' outside the hybridfast repository "
                          "(its kernels/ folder is hybridfast.kernels)")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from .launch import launch
    from .route_steer import route_steer_triton
    from .sample_logprobs import sample_logprobs_triton

    __all__ = ["launch", "route_steer_triton", "sample_logprobs_triton"]
