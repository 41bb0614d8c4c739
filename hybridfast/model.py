"""A decode-oriented forward pass over a Hugging Face decoder (Llama / Qwen2 / Qwen3 / Mistral
families: any model whose blocks are ``model.model.layers`` with ``self_attn.{q,k,v,o}_proj``,
``mlp``, ``input_layernorm`` and ``post_attention_layernorm``).

We reuse the model's own modules (projections, norms, MLP, rotary embedding, its
``apply_rotary_pos_emb``) and own only the cache and the attention bookkeeping:

* a preallocated static KV cache ``[B, H_kv, S0 + T, hd]`` per layer, written by position;
* slots ``0 .. S0-1`` are scratch slots for candidate rows (paper-mode steering), real token
  ``t`` of a row lives at slot ``S0 + t``; rotary position = ``t``;
* each row has its own length, so rows of different prompt lengths and different generated
  lengths share a batch with no padding tokens inside a sequence.

Layer convention (used everywhere in hybridfast): ``steer_layer = L`` adds to the residual stream
entering block ``L`` (Hugging Face ``hidden_states[L]``); ``sae_layer = L`` reads the residual
stream output by block ``L`` (``hidden_states[L + 1]``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DecoderModel", "KVCache"]


@dataclass
class KVCache:
    """Static KV cache. ``k[l]``/``v[l]``: ``[B, H_kv, S0 + T, hd]``; ``lengths[b]``: tokens held."""
    k: list
    v: list
    lengths: torch.Tensor
    scratch: int

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] - self.scratch

    def index_select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding the given rows (copies; used for resampling and chains)."""
        return KVCache([t.index_select(0, rows) for t in self.k],
                       [t.index_select(0, rows) for t in self.v],
                       self.lengths.index_select(0, rows), self.scratch)

    def copy_rows_(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """In place: rows ``dst`` become copies of rows ``src`` (KV and lengths)."""
        for t in self.k + self.v:
            t.index_copy_(0, dst, t.index_select(0, src))
        self.lengths.index_copy_(0, dst, self.lengths.index_select(0, src))


class DecoderModel:
    """Our forward pass over a ``transformers`` causal LM's modules (weights stay where they are)."""

    def __init__(self, hf_model):
        inner = getattr(hf_model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(hf_model, "lm_head"):
            raise TypeError(f"{type(hf_model).__name__}: expected a causal LM with "
                            f"model.model.layers and lm_head (Llama/Qwen2-style decoder)")
        cfg = hf_model.config
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise NotImplementedError("sliding-window attention is not supported by the engine")
        attn0 = layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn0, name):
                raise TypeError(f"{type(attn0).__name__} has no {name}: unsupported architecture")
        self.hf = hf_model
        self.config = cfg
        self.embed = inner.embed_tokens
        self.layers = list(layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = hf_model.lm_head
        self.n_layers = len(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden_size = cfg.hidden_size
        self.vocab_size = self.lm_head.out_features
        self.scaling = getattr(attn0, "scaling", self.head_dim ** -0.5)
        self._rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        p = next(hf_model.parameters())
        self.device, self.dtype = p.device, p.dtype

    # ------------------------------------------------------------------ cache
    def new_cache(self, batch: int, capacity: int, scratch: int = 0,
                  layers: int | None = None) -> KVCache:
        """Zeroed cache for ``batch`` rows of ``capacity`` tokens (+ ``scratch`` slots); with
        ``layers`` only the first blocks get storage (a truncated router)."""
        shape = (batch, self.n_kv, scratch + capacity, self.head_dim)
        z = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        n = self.n_layers if layers is None else layers
        return KVCache([z() for _ in range(n)], [z() for _ in range(n)],
                       torch.zeros(batch, dtype=torch.int64, device=self.device), scratch)

    # ------------------------------------------------------------------ pieces
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()

    def _qkv(self, layer, x, pos):
        attn = layer.self_attn
        B, R = x.shape[:2]
        q = attn.q_proj(x).view(B, R, -1, self.head_dim)
        k = attn.k_proj(x).view(B, R, -1, self.head_dim)
        v = attn.v_proj(x).view(B, R, -1, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self.rotary(x, pos)
        q, k = self._rope(q, k, cos, sin)
        return q, k, v

    def block(self, i: int, h: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
              mask: torch.Tensor, cache: KVCache, span: int, write: torch.Tensor | None = None):
        """Run decoder block ``i`` on ``h [B, R, d]``.

        ``pos [B, R]``: rotary positions; ``slots [B, R]``: cache slots the new K/V go to
        (rows with ``write`` False are not written); ``mask [B, 1, R, span]``: which of the first
        ``span`` cache slots each query sees.
        """
        layer = self.layers[i]
        x = layer.input_layernorm(h)
        q, k, v = self._qkv(layer, x, pos)
        kc, vc = cache.k[i], cache.v[i]
        B = h.shape[0]
        bidx = torch.arange(B, device=h.device)[:, None].expand_as(slots)
        if write is None:
            kc[bidx, :, slots] = k.transpose(1, 2)
            vc[bidx, :, slots] = v.transpose(1, 2)
        else:
            kc[bidx[write], :, slots[write]] = k.transpose(1, 2)[write]
            vc[bidx[write], :, slots[write]] = v.transpose(1, 2)[write]
        o = F.scaled_dot_product_attention(q, kc[:, :, :span], vc[:, :, :span], attn_mask=mask,
                                           scale=self.scaling, enable_gqa=self.n_kv != self.n_heads)
        o = o.transpose(1, 2).reshape(*h.shape[:2], -1)
        h = h + layer.self_attn.o_proj(o)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    # ------------------------------------------------------------------ prefill / decode
    def prefill_plan(self, lengths: torch.Tensor, S: int, cache: KVCache, span: int):
        """Positions, slots and causal mask for writing ``S`` (padded) tokens from slot 0."""
        dev = lengths.device
        pos = torch.arange(S, device=dev)[None, :].expand(lengths.shape[0], S)
        slots = pos + cache.scratch
        j = torch.arange(span, device=dev)
        mask = (j[None, None, :] >= cache.scratch) & (j[None, None, :] <= slots[:, :, None])
        return pos, slots, mask[:, None]

    def decode_plan(self, cache: KVCache, n_extra: int, span: int):
        """Plan for one new position per row plus ``n_extra`` candidate queries per row.

        Query 0 is the real token at position ``lengths[b]`` (written to its slot); query
        ``i >= 1`` is a candidate that sees the same past plus its own K/V in scratch slot
        ``i - 1`` (never the real token's slot).
        """
        L = cache.lengths
        B, R = L.shape[0], 1 + n_extra
        dev = L.device
        pos = L[:, None].expand(B, R)
        r = torch.arange(R, device=dev)
        slots = torch.where(r[None, :] == 0, L[:, None] + cache.scratch, (r - 1).clamp_min(0)[None, :])
        j = torch.arange(span, device=dev)[None, None, :]
        real = (j >= cache.scratch) & (j < (L[:, None, None] + cache.scratch))
        own = j == slots[:, :, None]
        mask = real | own
        return pos, slots, mask[:, None]

    def candidate_plan(self, cache: KVCache, pos: torch.Tensor, n: int, span: int):
        """Plan for ``n`` candidate queries per row at position ``pos [B]`` whose real token is
        already cached: they see slots before it plus their own scratch slot."""
        B = pos.shape[0]
        dev = pos.device
        p = pos[:, None].expand(B, n)
        slots = torch.arange(n, device=dev)[None, :].expand(B, n)
        j = torch.arange(span, device=dev)[None, None, :]
        mask = ((j >= cache.scratch) & (j < (pos[:, None, None] + cache.scratch))) | \
            (j == slots[:, :, None])
        return p, slots, mask[:, None]

    def run(self, h, pos, slots, mask, cache, span, start: int, stop: int, write=None):
        for i in range(start, stop):
            h = self.block(i, h, pos, slots, mask, cache, span, write)
        return h
