"""A decode-oriented forward pass over a Hugging Face decoder (Llama / Qwen2 / Qwen3 / Mistral
families: any model whose blocks are ``model.model.layers`` with ``self_attn.{q,k,v,o}_proj``,
``mlp``, ``input_layernorm`` and ``post_attention_layernorm``).

We reuse the model's own modules (projections, norms, MLP, rotary embedding) and own only the
cache, the attention bookkeeping and the application of the rotary embedding (:func:`rotate`,
bit for bit the rotate-half ``apply_rotary_pos_emb`` of these families, in fewer ops):

* a preallocated static KV cache ``[B, 2 H_kv, S0 + T, hd]`` (keys, then values) per layer,
  written by position;
* slots ``0 .. S0-1`` are scratch slots for candidate rows (paper-mode steering), real token
  ``t`` of a row lives at slot ``S0 + t``; rotary position = ``t``;
* each row has its own length, so rows of different prompt lengths and different generated
  lengths share a batch with no padding tokens inside a sequence;
* everything that does not depend on the layer (rotary cos/sin, the attention mask, the KV
  write indices) is built once per forward pass into a :class:`StepPlan` shared by all blocks.

Layer convention (used everywhere in hybridfast): ``steer_layer = L`` adds to the residual stream
entering block ``L`` (Hugging Face ``hidden_states[L]``); ``sae_layer = L`` reads the residual
stream output by block ``L`` (``hidden_states[L + 1]``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["DecoderModel", "KVCache", "StepPlan", "Hooks", "capture", "settle_rows", "rotate", "attention_partial",
           "merge_partials", "ATTENTION"]

ATTENTION = ("sdpa", "flex")

#: residual-stream transforms by block index (see :meth:`DecoderModel.run`)
Hooks = Optional[dict]


@dataclass
class KVCache:
    """Static KV cache. ``kv[l]``: ``[B, 2 H_kv, S0 + T, hd]``, keys in heads ``:H_kv`` and values
    in heads ``H_kv:`` (one tensor, so a block writes both with one op); ``lengths[b]``: tokens
    held."""
    kv: list
    lengths: torch.Tensor
    scratch: int

    @property
    def capacity(self) -> int:
        return self.kv[0].shape[2] - self.scratch

    def index_select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding the given rows (copies; used for resampling and chains)."""
        return KVCache([t.index_select(0, rows) for t in self.kv],
                       self.lengths.index_select(0, rows), self.scratch)

    def write_rows_(self, rows: torch.Tensor, other: "KVCache") -> None:
        """In place: rows ``rows`` become ``other``'s rows (a cache with as many rows and at most
        this one's slots), KV and lengths; slots past ``other``'s are left as they are."""
        n = other.kv[0].shape[2]
        for t, o in zip(self.kv, other.kv):
            t[:, :, :n].index_copy_(0, rows, o)
        self.lengths.index_copy_(0, rows, other.lengths)

    def copy_(self, other: "KVCache") -> None:
        """In place: this cache becomes a copy of ``other`` (same shape), KV and lengths."""
        for t, o in zip(self.kv, other.kv):
            t.copy_(o)
        self.lengths.copy_(other.lengths)

    def where_rows_(self, mask: torch.Tensor, other: "KVCache") -> None:
        """In place: rows where ``mask [B]`` is true become ``other``'s rows (same shape), KV and
        lengths (an accepted proposal's rows; the others are left as they are)."""
        m = mask.view(-1, 1, 1, 1)
        for t, o in zip(self.kv, other.kv):
            torch.where(m, o, t, out=t)
        torch.where(mask, other.lengths, self.lengths, out=self.lengths)

    def settle_rows_(self, rows: torch.Tensor, accept: torch.Tensor, proposal: "KVCache") -> None:
        """In place, in this cache and in ``proposal`` (same shape): rows ``rows [n]`` of both
        become the proposal's where ``accept [n]`` is true, else this cache's (where a
        Metropolis-Hastings step ends, both caches hold its outcome; only those rows move)."""
        for t, o in zip(self.kv + [self.lengths], proposal.kv + [proposal.lengths]):
            settle_rows(t, o, rows, accept)

    def copy_rows_(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """In place: rows ``dst`` become copies of rows ``src`` (KV and lengths)."""
        for t in self.kv:
            t.index_copy_(0, dst, t.index_select(0, src))
        self.lengths.index_copy_(0, dst, self.lengths.index_select(0, src))


def settle_rows(mine: torch.Tensor, proposal: torch.Tensor, rows: torch.Tensor, accept: torch.Tensor) -> None:
    """In place, in both tensors (same shape): rows ``rows [n]`` become ``proposal``'s where
    ``accept [n]`` is true, else ``mine``'s (the outcome of a Metropolis-Hastings step, held by
    the chain and its proposal alike)."""
    a = accept.view(-1, *([1] * (mine.ndim - 1)))
    new = torch.where(a, proposal.index_select(0, rows), mine.index_select(0, rows))
    mine.index_copy_(0, rows, new)
    proposal.index_copy_(0, rows, new)


def capture(into: dict, at=None):
    """A hook (see :meth:`DecoderModel.run`) that keeps the residual stream, or ``h[at]``, in
    ``into["h"]`` and passes it on unchanged."""
    def hook(h, plan):
        into["h"] = h if at is None else h[at]
        return h, plan
    return hook


@dataclass
class StepPlan:
    """What every block of one forward pass shares, built once per pass (a decode step, a
    prefill, a candidate pass) instead of once per layer. ``B`` rows of ``R`` queries each.

    ``slots``/``rows`` index the K/V write ``cache.kv[l][rows, :, slots]``.
    """
    slots: torch.Tensor   #: [B, R] cache slot each query's K/V is written to
    rows: torch.Tensor    #: [B, R] batch row of each query
    mask: torch.Tensor    #: [B, 1, R, span] additive mask over the first span slots (0 / -inf)
    cos: torch.Tensor     #: [B, R, 2, 1, hd/2] rotary cos, first and second half
    sin: torch.Tensor     #: [B, R, 2, 1, hd/2] rotary sin, first half negated (see rotate)
    block_mask: object = None   #: FlexAttention BlockMask of the same visibility (attention="flex")

    @property
    def span(self) -> int:
        """Cache slots the queries attend over (``0 .. span-1``)."""
        return self.mask.shape[-1]


def rotate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan):
    """Rotary embedding of ``q [B, R, Hq, hd]`` and ``k [B, R, H_kv, hd]`` in four ops; returns
    ``(q, kv)``: rotated queries ``[B, R, Hq, hd]`` and rotated keys then values
    ``[B, R, 2 H_kv, hd]`` (views of one buffer).

    Bit for bit the ``x * cos + rotate_half(x) * sin`` of Llama / Qwen2 / Qwen3 / Mistral, with
    ``rotate_half(x) = [-x2 | x1]`` (``x1``, ``x2``: first and second half of a head). One
    ``cat`` lays out per row, in half-heads, ``[X1 | X2 | X1 | V]`` (``X1``/``X2``: the halves of
    every q and k head), so ``[X1 | X2]`` and its half-swap ``[X2 | X1]`` are both views and
    ``[X1 | X2] * cos + [X2 | X1] * [-sin1 | sin2]`` is the rotation (``(-a) * b == a * (-b)``
    exactly). The sum is written over ``[X2 | X1]`` in head layout, which puts the rotated keys
    right before the values.
    """
    B, R, Hq, hd = q.shape
    Hkv, h = k.shape[2], hd // 2
    n = Hq + Hkv
    halves = [q[..., :h], k[..., :h], q[..., h:], k[..., h:], q[..., :h], k[..., :h]]
    y = torch.cat(halves + [v.view(B, R, 2 * Hkv, h)], 2)
    x = y[:, :, : 2 * n].unflatten(2, (2, n))
    swapped = y[:, :, n: 3 * n].unflatten(2, (2, n))
    heads = y[:, :, n: 3 * n].unflatten(2, (n, 2)).transpose(2, 3)
    if torch.compiler.is_compiling():     # dynamo takes no non-contiguous out=; same values
        heads.copy_(x * plan.cos + swapped * plan.sin)
    else:
        torch.add(x * plan.cos, swapped * plan.sin, out=heads)
    return y[:, :, n: n + 2 * Hq].view(B, R, Hq, hd), y[:, :, n + 2 * Hq:].view(B, R, 2 * Hkv, hd)


def attention_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float):
    """Softmax attention of ``q [B, R, Hq, hd]`` over one part of the keys, ``k``/``v``
    ``[B, H_kv, S, hd]`` (query head ``h`` reads key head ``h // (Hq / H_kv)``), under the additive
    ``mask [B, R or 1, S]`` (0 / -inf; every query must see at least one slot). Returns the output
    normalised over this part, ``[B, R, Hq, hd]``, and the log-sum-exp of its scaled scores,
    ``[B, R, Hq]`` (at least float32): what :func:`merge_partials` needs to combine parts."""
    B, R, Hq, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qh = q.reshape(B, R, Hkv, g, hd).permute(0, 2, 1, 3, 4).reshape(B, Hkv, R * g, hd)
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(qh, k.transpose(-1, -2)).to(acc).view(B, Hkv, R, g, S) * scale
    s = s + mask[:, None, :, None, :]
    lse = torch.logsumexp(s, -1)
    w = torch.exp(s - lse[..., None]).to(v.dtype).view(B, Hkv, R * g, S)
    o = torch.matmul(w, v).view(B, Hkv, R, g, hd).permute(0, 2, 1, 3, 4).reshape(B, R, Hq, hd)
    return o, lse.permute(0, 2, 1, 3).reshape(B, R, Hq)


def merge_partials(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Attention over the union of two disjoint key sets from :func:`attention_partial` over each
    (the softmax over the union, regrouped: ``o = sum_i o_i exp(lse_i - lse)``)."""
    lse = torch.logaddexp(lse1, lse2)
    o = o1.to(lse.dtype) * (lse1 - lse).exp()[..., None] + o2.to(lse.dtype) * (lse2 - lse).exp()[..., None]
    return o.to(o1.dtype)


class DecoderModel:
    """Our forward pass over a ``transformers`` causal LM's modules (weights stay where they are)."""

    def __init__(self, hf_model, attention: str = "sdpa"):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        #: "sdpa": scaled_dot_product_attention with the plan's additive mask (the CPU path);
        #: "flex": FlexAttention with a block mask (no dense mask: meant for compiled CUDA steps)
        self.attention = attention
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
        p = next(hf_model.parameters())
        self.device, self.dtype = p.device, p.dtype
        #: [-1 (first half) | +1 (second half)]: negates the first half of sin exactly
        self._sin_sign = torch.ones(self.head_dim, dtype=self.dtype, device=self.device)
        self._sin_sign[: self.head_dim // 2] = -1
        self._check_rotary(sys.modules[type(attn0).__module__].apply_rotary_pos_emb)

    def _check_rotary(self, apply_rotary_pos_emb):
        """:func:`rotate` assumes the rotate-half convention: refuse a model whose own
        ``apply_rotary_pos_emb`` disagrees with it (checked once, on random vectors)."""
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 3, n, self.head_dim, generator=g).to(self.device, self.dtype)
                   for n in (self.n_heads, self.n_kv, self.n_kv))
        pos = torch.arange(3, device=self.device)[None, :] * 7
        visible = torch.ones(1, 3, 3, dtype=torch.bool, device=self.device)
        got, _ = rotate(q, k, v, self.plan(pos, pos, visible))
        cos, sin = self.rotary(q, pos)
        want, _ = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if not torch.allclose(got.float(), want.transpose(1, 2).float(), rtol=1e-2, atol=1e-2):
            raise NotImplementedError(f"{type(self.hf).__name__}: its rotary embedding is not the "
                                      f"rotate-half convention the engine implements")

    # ------------------------------------------------------------------ cache
    def new_cache(self, batch: int, capacity: int, scratch: int = 0,
                  layers: int | None = None) -> KVCache:
        """Zeroed cache for ``batch`` rows of ``capacity`` tokens (+ ``scratch`` slots); with
        ``layers`` only the first blocks get storage (a truncated router)."""
        shape = (batch, 2 * self.n_kv, scratch + capacity, self.head_dim)
        n = self.n_layers if layers is None else layers
        return KVCache([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
                       torch.zeros(batch, dtype=torch.int64, device=self.device), scratch)

    # ------------------------------------------------------------------ pieces
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()

    def _qkv(self, layer, x, plan: StepPlan):
        """Rotated queries ``[B, R, Hq, hd]`` and the keys and values to cache (see rotate)."""
        attn = layer.self_attn
        B, R = x.shape[:2]
        q = attn.q_proj(x).view(B, R, -1, self.head_dim)
        k = attn.k_proj(x).view(B, R, -1, self.head_dim)
        v = attn.v_proj(x).view(B, R, -1, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return rotate(q, k, v, plan)

    def block(self, i: int, h: torch.Tensor, plan: StepPlan, cache: KVCache):
        """Run decoder block ``i`` on ``h [B, R, d]``: write the queries' K/V to their slots,
        attend over the first ``plan.span`` slots."""
        layer = self.layers[i]
        q, kv = self._qkv(layer, layer.input_layernorm(h), plan)
        c = cache.kv[i]
        c[plan.rows, :, plan.slots] = kv
        k, v = c[:, : self.n_kv, : plan.span], c[:, self.n_kv:, : plan.span]
        if plan.block_mask is not None:
            from torch.nn.attention.flex_attention import flex_attention
            o = flex_attention(q.transpose(1, 2), k, v, block_mask=plan.block_mask,
                               scale=self.scaling, enable_gqa=self.n_kv != self.n_heads)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=plan.mask,
                                               scale=self.scaling,
                                               enable_gqa=self.n_kv != self.n_heads)
        o = o.transpose(1, 2).reshape(*h.shape[:2], -1)
        h = h + layer.self_attn.o_proj(o)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def shared_prefix_block(self, i: int, h: torch.Tensor, plan: StepPlan, suffix: KVCache,
                            prefix: KVCache, prefix_mask: torch.Tensor):
        """Decoder block ``i`` for rows that continue a shared prefix (cascade attention).

        ``h [N * R, 1, d]``: one query for each of ``R`` rows per row of ``prefix``, row ``n * R + r``
        continuing prefix row ``n``. Their K/V are written to their own rows of ``suffix`` as
        ``plan`` says; each query attends over its prefix row's slots where ``prefix_mask [N, 1,
        span]`` is 0 and over its own suffix slots per ``plan.mask``, as two softmax partials merged
        by log-sum-exp. The ``R`` rows read one copy of the prefix instead of a copy each.
        """
        layer = self.layers[i]
        q, kv = self._qkv(layer, layer.input_layernorm(h), plan)
        c = suffix.kv[i]
        c[plan.rows, :, plan.slots] = kv
        n = self.n_kv
        o_s, lse_s = attention_partial(q, c[:, :n, : plan.span], c[:, n:, : plan.span], plan.mask[:, 0],
                                       self.scaling)
        N, span = prefix_mask.shape[0], prefix_mask.shape[-1]
        p = prefix.kv[i]
        o_p, lse_p = attention_partial(q.reshape(N, -1, *q.shape[2:]), p[:, :n, :span], p[:, n:, :span],
                                       prefix_mask, self.scaling)
        o = merge_partials(o_p.reshape(q.shape), lse_p.reshape(lse_s.shape), o_s, lse_s)
        h = h + layer.self_attn.o_proj(o.reshape(*h.shape[:2], -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def forward(self, tokens: torch.Tensor, plan: StepPlan, cache: KVCache, hooks: Hooks = None,
                stop: Optional[int] = None, block: Optional[Callable] = None) -> torch.Tensor:
        """The forward pass every decode step and prefill runs: embed ``tokens [B, R]``, then
        :meth:`run` blocks ``0 .. stop-1`` (default: all) with one shared ``plan``."""
        return self.run(self.embed(tokens), plan, cache, 0, stop, hooks, block)

    def run(self, h: torch.Tensor, plan: StepPlan, cache: KVCache, start: int = 0,
            stop: Optional[int] = None, hooks: Hooks = None,
            block: Optional[Callable] = None) -> torch.Tensor:
        """Blocks ``start .. stop-1`` on the residual stream ``h [B, R, d]``. ``hooks`` maps a
        block index ``i`` to ``hook(h, plan) -> (h, plan)``, applied to the residual entering
        block ``i`` (``i = stop``: the output of the last block run): routed steering, the
        paper mode's candidate rows (which bring their own plan), a capture. ``block`` replaces
        :meth:`block` (:meth:`shared_prefix_block` with its prefix bound). Returns the residual
        after the last block run and its hook."""
        stop = self.n_layers if stop is None else stop
        block = self.block if block is None else block
        hooks = hooks or {}
        for i in range(start, stop + 1):
            if i in hooks:
                h, plan = hooks[i](h, plan)
            if i < stop:
                h = block(i, h, plan, cache)
        return h

    # ------------------------------------------------------------------ plans
    def plan(self, pos: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor) -> StepPlan:
        """The plan for queries at rotary positions ``pos [B, R]`` writing their K/V to
        ``slots [B, R]`` and seeing the cache slots where ``visible [B, R, span]`` is True (the
        additive mask is what SDPA makes of a boolean one: 0 where visible, else -inf)."""
        B, R = pos.shape
        h = self.head_dim // 2
        mask = torch.full(visible.shape, float("-inf"), dtype=self.dtype, device=visible.device)
        mask.masked_fill_(visible, 0.0)
        cos, sin = self.rotary(mask, pos)           # [B, R, hd]; mask gives only dtype and device
        sin = sin * self._sin_sign
        rows = torch.arange(B, device=pos.device)[:, None].expand(B, R)
        return StepPlan(slots, rows, mask[:, None], cos.view(B, R, 2, 1, h), sin.view(B, R, 2, 1, h),
                        self._block_mask(visible) if self.attention == "flex" else None)

    @staticmethod
    def _block_mask(visible: torch.Tensor):
        """FlexAttention block mask of ``visible [B, R, span]`` (the same visibility)."""
        from torch.nn.attention.flex_attention import create_block_mask
        B, R, span = visible.shape
        return create_block_mask(lambda b, h, q, kv: visible[b, q, kv], B, None, R, span,
                                 device=visible.device)

    def prefill_plan(self, lengths: torch.Tensor, S: int, cache: KVCache, span: int) -> StepPlan:
        """Plan for writing ``S`` (padded) tokens from slot 0 (causal)."""
        dev = lengths.device
        pos = torch.arange(S, device=dev)[None, :].expand(lengths.shape[0], S)
        slots = pos + cache.scratch
        j = torch.arange(span, device=dev)
        visible = (j[None, None, :] >= cache.scratch) & (j[None, None, :] <= slots[:, :, None])
        return self.plan(pos, slots, visible)

    def decode_plan(self, cache: KVCache, n_extra: int, span: int) -> StepPlan:
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
        return self.plan(pos, slots, real | own)

    def candidate_plan(self, cache: KVCache, pos: torch.Tensor, n: int, span: int) -> StepPlan:
        """Plan for ``n`` candidate queries per row at position ``pos [B]`` whose real token is
        already cached: they see slots before it plus their own scratch slot."""
        B = pos.shape[0]
        dev = pos.device
        p = pos[:, None].expand(B, n)
        slots = torch.arange(n, device=dev)[None, :].expand(B, n)
        j = torch.arange(span, device=dev)[None, None, :]
        visible = ((j >= cache.scratch) & (j < (pos[:, None, None] + cache.scratch))) | \
            (j == slots[:, :, None])
        return self.plan(p, slots, visible)
