"""In-memory forms of the two artifacts the hybrid model consumes: an SAE encoder (the router)
and a steering-vector table. Plain tensors / dicts are accepted wherever these are.

Persistence (safetensors + JSON, atomic writes, validation) lives in :mod:`hybridfast.io`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["SAEParams", "SteeringVectors", "as_sae", "as_vectors"]


@dataclass
class SAEParams:
    """Encoder half of a top-k SAE used as a router.

    ``z = (normalize(x - x_mean) - b_dec) @ W_enc + b_enc``; category = argmax z.
    """
    W_enc: torch.Tensor                 #: [d_r, K] encoder weights (input-major)
    b_enc: torch.Tensor                 #: [K] encoder bias
    b_dec: torch.Tensor                 #: [d_r] decoder bias, subtracted before encoding
    x_mean: Optional[torch.Tensor] = None   #: [d_r] centring mean (from training), or None
    normalize: bool = False             #: L2-normalise rows (after centring) before encoding
    W_dec: Optional[torch.Tensor] = None    #: [K, d_r] decoder (training / reconstruction only)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.W_enc.ndim != 2:
            raise ValueError(f"SAE W_enc must be [d_r, K], got {tuple(self.W_enc.shape)}")
        d_r, K = self.W_enc.shape
        if tuple(self.b_enc.shape) != (K,):
            raise ValueError(f"SAE b_enc must be [K={K}], got {tuple(self.b_enc.shape)}")
        if tuple(self.b_dec.shape) != (d_r,):
            raise ValueError(f"SAE b_dec must be [d_r={d_r}], got {tuple(self.b_dec.shape)}")
        if self.x_mean is not None and tuple(self.x_mean.shape) != (d_r,):
            raise ValueError(f"SAE x_mean must be [d_r={d_r}], got {tuple(self.x_mean.shape)}")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[1]

    def to(self, device=None, dtype=None) -> "SAEParams":
        f = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return SAEParams(f(self.W_enc), f(self.b_enc), f(self.b_dec), f(self.x_mean),
                         self.normalize, f(self.W_dec), dict(self.meta))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Full pre-activation ``z [N, K]`` (float32)."""
        u = x.float()
        if self.x_mean is not None:
            u = u - self.x_mean.float()
        if self.normalize:
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (u - self.b_dec.float()) @ self.W_enc.float() + self.b_enc.float()

    def categorize(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x).argmax(-1)


@dataclass
class SteeringVectors:
    """K category vectors plus a shared bias vector, in the base model's residual space."""
    V: torch.Tensor                     #: [K, d]
    bias: Optional[torch.Tensor] = None #: [d] added alongside every category vector
    names: Optional[list] = None        #: category names (default ``idx{j}``)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.V.ndim != 2:
            raise ValueError(f"steering table V must be [K, d], got {tuple(self.V.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (self.V.shape[1],):
            raise ValueError(f"steering bias must be [d={self.V.shape[1]}], got {tuple(self.bias.shape)}")
        if self.names is None:
            self.names = [f"idx{j}" for j in range(self.V.shape[0])]
        if len(self.names) != self.V.shape[0]:
            raise ValueError(f"{len(self.names)} category names for {self.V.shape[0]} vectors")

    def index(self, name) -> int:
        if isinstance(name, int):
            if not 0 <= name < len(self.names):
                raise KeyError(f"unknown category {name}: valid ids are 0..{len(self.names) - 1}")
            return name
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown category {name!r}; known: {self.names}") from None


def as_sae(sae) -> SAEParams:
    """Accept an :class:`SAEParams`, an object with W_enc/b_enc/b_dec, or a dict of tensors."""
    if isinstance(sae, SAEParams):
        return sae
    if isinstance(sae, dict):
        return SAEParams(sae["W_enc"], sae["b_enc"], sae["b_dec"], sae.get("x_mean"),
                         bool(sae.get("normalize", False)), sae.get("W_dec"))
    if hasattr(sae, "sae_params"):
        return sae.sae_params()
    if all(hasattr(sae, a) for a in ("W_enc", "b_enc", "b_dec")):
        return SAEParams(sae.W_enc, sae.b_enc, sae.b_dec, getattr(sae, "x_mean", None),
                         bool(getattr(sae, "normalize", False)))
    raise TypeError(f"cannot use {type(sae).__name__} as an SAE: need W_enc, b_enc, b_dec")


def as_vectors(vectors) -> SteeringVectors:
    """Accept :class:`SteeringVectors`, a [K, d] tensor, a ``(V, bias)`` pair or a dict."""
    if isinstance(vectors, SteeringVectors):
        return vectors
    if isinstance(vectors, torch.Tensor):
        return SteeringVectors(vectors)
    if isinstance(vectors, (tuple, list)) and len(vectors) == 2:
        return SteeringVectors(vectors[0], vectors[1])
    if isinstance(vectors, dict):
        if "V" in vectors:
            return SteeringVectors(vectors["V"], vectors.get("bias"), vectors.get("names"))
        bias = vectors.get("bias")
        names = [k for k in vectors if k != "bias"]
        return SteeringVectors(torch.stack([vectors[k].reshape(-1) for k in names]),
                               None if bias is None else bias.reshape(-1), names)
    raise TypeError(f"cannot use {type(vectors).__name__} as steering vectors")
