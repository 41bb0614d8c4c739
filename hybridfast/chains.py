"""The state of a batch of sampling chains (MH chains, SMC particles): one typed object instead of
loose tensors, so that copying a proposal, accepting it, admitting new chains into rows and
resampling particles are one call each.

Row ``b`` holds one chain: its prompt then its generated tokens in ``tokens``, the per-token
log-probs ``lp`` (base model, temperature 1) and ``lq`` (the proposal actually used), whether the
generated tokens end with EOS, and the generated length ``lengths[b]``. With ``steer=`` the
thinking model reads its own prompt followed by the same generated tokens (``tt``, ``Pt``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .engine import pad_prompts
from .model import settle_rows

__all__ = ["Chains"]


@dataclass
class Chains:
    """``N`` chains, one per row (see the module docstring)."""
    tokens: torch.Tensor     #: [N, width] int64: prompt, generated tokens, padding
    lp: torch.Tensor         #: [N, n_gen] float32: log p of generated token i (temperature 1)
    lq: torch.Tensor         #: [N, n_gen] float32: its log-prob under the proposal
    eos: torch.Tensor        #: [N] bool: the generated tokens end with EOS
    lengths: torch.Tensor    #: [N] int64: generated tokens L
    P: torch.Tensor          #: [N] int64: prompt lengths
    tt: Optional[torch.Tensor] = None   #: [N, twidth] thinking prompt + the same generated tokens
    Pt: Optional[torch.Tensor] = None   #: [N] thinking prompt lengths

    @classmethod
    def from_prompts(cls, prompts: Sequence[Sequence[int]], *, pad: int, n_gen: int, width: int,
                     device, thinking: Optional[Sequence[Sequence[int]]] = None,
                     twidth: int = 0) -> "Chains":
        """Fresh chains (nothing generated) for ``prompts``, rows ``width`` tokens wide, room for
        ``n_gen`` log-probs; with ``thinking``, the thinking prompts in rows ``twidth`` wide."""
        tokens, P = _padded(prompts, pad, width, device)
        n = len(prompts)
        tt, Pt = _padded(thinking, pad, twidth, device) if thinking is not None else (None, None)
        return cls(tokens, torch.zeros(n, n_gen, device=device), torch.zeros(n, n_gen, device=device),
                   torch.zeros(n, dtype=torch.bool, device=device),
                   torch.zeros(n, dtype=torch.int64, device=device), P, tt, Pt)

    def _tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def clone(self) -> "Chains":
        return dataclasses.replace(self, **{k: v.clone() for k, v in self._tensors().items()})

    def select(self, rows: torch.Tensor) -> "Chains":
        """New chains: row ``i`` is a copy of row ``rows[i]``."""
        return dataclasses.replace(self, **{k: v.index_select(0, rows) for k, v in self._tensors().items()})

    def write_(self, where: torch.Tensor, other: "Chains") -> None:
        """In place. ``where`` a bool mask ``[N]``: rows where it is true take ``other``'s row
        (same number of rows); ``where`` int64 row indices: those rows take ``other``'s rows in
        order (``other`` has one row per index)."""
        for k, t in self._tensors().items():
            o = getattr(other, k)
            if where.dtype == torch.bool:
                torch.where(where.view(-1, *([1] * (t.ndim - 1))), o, t, out=t)
            else:
                t.index_copy_(0, where, o)

    def settle_(self, rows: torch.Tensor, accept: torch.Tensor, proposal: "Chains") -> None:
        """In place, in these chains and in ``proposal``: rows ``rows [n]`` of both become the
        proposal's where ``accept [n]`` is true, else these chains' (the outcome of a
        Metropolis-Hastings step, held by both)."""
        for k, t in self._tensors().items():
            settle_rows(t, getattr(proposal, k), rows, accept)

    def append_(self, tok: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor,
                active: torch.Tensor) -> None:
        """Rows where ``active`` get one generated token ``tok`` with its log-probs (positions
        past a row's buffer are clamped to its last slot, written only by inactive rows)."""
        rows = torch.arange(tok.shape[0], device=tok.device)
        L = self.lengths
        _put(self.tokens, rows, self.P + L, tok, active)
        if self.tt is not None:
            _put(self.tt, rows, self.Pt + L, tok, active)
        _put(self.lp, rows, L, lp, active)
        _put(self.lq, rows, L, lq, active)
        self.lengths = L + active.long()


def _padded(prompts, pad: int, width: int, device):
    ids, P = pad_prompts(prompts, pad, device)
    tokens = torch.full((len(prompts), width), pad, dtype=torch.int64, device=device)
    tokens[:, : ids.shape[1]] = ids
    return tokens, P


def _put(buf: torch.Tensor, rows: torch.Tensor, col: torch.Tensor, value: torch.Tensor,
         active: torch.Tensor) -> None:
    col = col.clamp_max(buf.shape[1] - 1)
    buf[rows, col] = torch.where(active, value, buf[rows, col])
