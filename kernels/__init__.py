"""Triton kernels of hybridfast (installed as ``hybridfast.kernels``).

Importing this package imports triton; ``hybridfast.ops`` only does so when a Triton
implementation is actually requested, so ``import hybridfast`` stays lean.
"""
from .launch import launch
from .route_steer import route_steer_triton
from .sample_logprobs import sample_logprobs_triton

__all__ = ["launch", "route_steer_triton", "sample_logprobs_triton"]
