"""Hybrid generation: the base model writes, the thinking model reads along, an SAE on the
thinking model's activations picks a reasoning category and that category's vector steers the
base model (DESIGN.md sections 1.3 and 1.4).

Layer convention: ``sae_layer = L`` reads the residual stream output by block ``L``
(``hidden_states[L + 1]``, except that Hugging Face applies the final norm to the last block's
entry there, which the router does not); ``steer_layer = L`` adds to the residual stream
entering block ``L`` (``hidden_states[L]``). Steering applies from the last prompt position on.

Modes
-----
``paper`` (default): every step routes from the thinking model's ``sae_layer`` residual (argmax,
no threshold); if the thinking model's greedy token equals the unsteered base token it is
emitted, otherwise each coefficient ``c`` gives a candidate (base argmax with
``c * (bias + V[cat])`` added at ``steer_layer`` at the last position) and the candidate with
the highest thinking log-probability is emitted (ties: first coefficient). The cache keeps the
unsteered computation. Candidates are extra query rows from ``steer_layer`` up, sharing the
lower layers and the cached past. ``windows`` other than ``(1,)`` use the exact recompute path
(:func:`hybridfast.baselines.paper_mode_recompute`, O(T^2)).

``routed``: ``route_steer`` with a threshold and per-category coefficients inside the base
model's residual pass; the steered computation is cached; the thinking model runs only up to
``sae_layer`` (no upper layers, no LM head).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from . import ops
from .artifacts import as_sae, as_vectors
from .compiled import compile_step
from .engine import Engine, eos_ids, pad_id, pad_prompts, sample
from .model import KVCache, capture
from .ops.rng import RandomStream
from .scheduler import Request, Scheduler

__all__ = ["HybridModel", "HybridResult", "HybridOutput", "RoutedMode", "PaperMode"]

PAPER_COEFFICIENTS = tuple(round(0.1 * i, 1) for i in range(1, 11))


@dataclass
class HybridResult:
    """One problem's output."""
    ids: list                      #: generated token ids (EOS included when reached)
    text: Optional[str]            #: decoded text when a tokenizer was given
    category: list                 #: per token: routed category (-1: below threshold)
    steered: list                  #: per token: whether steering changed the computation used
    coef: list                     #: per token: coefficient used (0.0 when not steered)

    @property
    def steered_fraction(self) -> float:
        return sum(self.steered) / max(1, len(self.steered))


@dataclass
class HybridOutput:
    results: list
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)

    def __getitem__(self, i):
        return self.results[i]

    def __len__(self):
        return len(self.results)

    @property
    def steered_fraction(self) -> float:
        """Per-problem mean of steered/total tokens (the papers' definition)."""
        return sum(r.steered_fraction for r in self.results) / max(1, len(self.results))

    @property
    def steered_fraction_tokens(self) -> float:
        """Token-weighted steered fraction."""
        n = sum(len(r.steered) for r in self.results)
        return sum(sum(r.steered) for r in self.results) / max(1, n)


def _ordinary_vocab(tok) -> dict:
    """``tok``'s vocabulary without its added tokens (special and chat-template ones such as
    ``<|im_end|>`` or ``<think>``)."""
    added = tok.get_added_vocab() if hasattr(tok, "get_added_vocab") else {}
    return {k: v for k, v in tok.get_vocab().items() if k not in added}


def _check_tokenizers(tb, tt):
    """The base and thinking tokenizers must agree on every ordinary token (the thinking model
    reads the base model's ids); their added tokens may differ (a distilled thinking model renames
    its special tokens and chat markers)."""
    if tb is None or tt is None:
        return
    vb, vt = _ordinary_vocab(tb), _ordinary_vocab(tt)
    if vb != vt:
        only_b = sorted(set(vb) - set(vt))[:5]
        only_t = sorted(set(vt) - set(vb))[:5]
        diff = [k for k in vb if k in vt and vb[k] != vt[k]][:5]
        raise ValueError("base and thinking tokenizers differ (the models must share a vocabulary):"
                         f" only in base {only_b}, only in thinking {only_t}, different ids {diff}")


class HybridModel:
    """Base model steered by a thinking model's SAE categories. See the module docstring."""

    def __init__(self, base, thinking, sae, vectors, *, sae_layer: int, steer_layer: int,
                 mode: str = "paper", coefficients=None, threshold: Optional[float] = None,
                 windows: Sequence[int] = (1,), base_tokenizer=None, thinking_tokenizer=None,
                 sync_every: int = 16, compile=False, attention: str = "sdpa"):
        if mode not in ("paper", "routed"):
            raise ValueError(f"mode must be 'paper' or 'routed', got {mode!r}")
        self.base = Engine(base, sync_every=sync_every, compile=compile, attention=attention)
        self.thinking = Engine(thinking, sync_every=sync_every, compile=compile, attention=attention)
        #: the routed decode step, compiled when ``compile=`` asks (see hybridfast.compiled)
        self._routed_step = compile_step(self._routed_step_eager, self.base.compile_options)
        self._paper_step = compile_step(self._paper_step_eager, self.base.compile_options)
        mb, mt = self.base.m, self.thinking.m
        self.sae = as_sae(sae)
        self.vectors = as_vectors(vectors)
        self.mode = mode
        self.sae_layer, self.steer_layer = int(sae_layer), int(steer_layer)
        if not 0 <= self.sae_layer < mt.n_layers:
            raise ValueError(f"sae_layer={sae_layer} out of range: the thinking model has "
                             f"{mt.n_layers} blocks (valid 0..{mt.n_layers - 1})")
        if not 0 <= self.steer_layer < mb.n_layers:
            raise ValueError(f"steer_layer={steer_layer} out of range: the base model has "
                             f"{mb.n_layers} blocks (valid 0..{mb.n_layers - 1})")
        if self.sae.d_in != mt.hidden_size:
            raise ValueError(f"SAE input size {self.sae.d_in} does not match the thinking model's "
                             f"hidden size {mt.hidden_size}")
        K, d = self.vectors.V.shape
        if d != mb.hidden_size:
            raise ValueError(f"steering vectors have width {d} but the base model's hidden size "
                             f"is {mb.hidden_size}")
        if K != self.sae.n_latents:
            raise ValueError(f"{K} steering vectors for an SAE with {self.sae.n_latents} latents "
                             f"(one vector per category is needed)")
        if mb.vocab_size != mt.vocab_size and (base_tokenizer is None or thinking_tokenizer is None):
            raise ValueError(f"base vocabulary ({mb.vocab_size}) and thinking vocabulary "
                             f"({mt.vocab_size}) differ; the models must share a tokenizer")
        _check_tokenizers(base_tokenizer, thinking_tokenizer)
        self.tok_b, self.tok_t = base_tokenizer, thinking_tokenizer
        #: the scheduler's counts (:attr:`Scheduler.stats`) of the last stream or generate
        self.last_stats: dict = {}
        self.windows = tuple(int(w) for w in windows)
        if not self.windows or any(w < 0 for w in self.windows):
            raise ValueError(f"windows must be non-negative widths (0 = all positions), got {windows}")
        dev = mb.device
        self._router = self.sae.to(device=dev, dtype=torch.float32)
        #: the steering vectors [K, d] and bias on the base model's device, in its dtype
        self.V = self.vectors.V.to(device=dev, dtype=mb.dtype)
        self.bias = None if self.vectors.bias is None else self.vectors.bias.to(device=dev, dtype=mb.dtype)
        if mode == "paper":
            coefficients = PAPER_COEFFICIENTS if coefficients is None else coefficients
            self.coefs = torch.as_tensor(list(coefficients), dtype=torch.float32, device=dev).reshape(-1)
            if self.coefs.numel() < 1:
                raise ValueError("paper mode needs at least one coefficient")
            self.threshold = -math.inf if threshold is None else float(threshold)
        else:
            coefficients = 1.0 if coefficients is None else coefficients
            c = torch.as_tensor(coefficients, dtype=torch.float32, device=dev).reshape(-1)
            if c.numel() == 1:
                c = c.expand(K).clone()
            if c.numel() != K:
                raise ValueError(f"routed mode needs one coefficient or one per category (K={K}), "
                                 f"got {c.numel()}")
            self.coefs = c
            self.threshold = 0.0 if threshold is None else float(threshold)

    # ------------------------------------------------------------------ helpers
    def route(self, h, x, coefs_expand: bool = False, validate: bool = False):
        """route_steer with this model's SAE, vectors and coefficients. The first call of a
        generation (the prefill, eager) validates shapes; decode steps skip the checks."""
        r = self._router
        return ops.route_steer(h, x.to(torch.float32), r.W_enc, r.b_enc, r.b_dec, self.V,
                               None if coefs_expand else self.coefs, bias=self.bias,
                               x_mean=r.x_mean, normalize=r.normalize, threshold=self.threshold,
                               coefs=self.coefs if coefs_expand else None, check_nan=False,
                               validate=validate)

    def encode_prompts(self, prompts, tok):
        """Token ids of ``prompts`` (strings through ``tok``, a side's tokenizer; ids as given)."""
        if len(prompts) and isinstance(prompts[0], str):
            if tok is None:
                raise ValueError("string prompts need base_tokenizer/thinking_tokenizer")
            return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return [list(map(int, p)) for p in prompts]

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def generate(self, base_prompts, thinking_prompts, max_new_tokens: int = 256, *,
                 eos_token_id=None, temperature: float = 0.0, top_k=None,
                 generator: Optional[torch.Generator] = None, steer: bool = True,
                 rows: Optional[int] = None) -> HybridOutput:
        """Generate for a batch of problems; prompts are strings (with tokenizers) or id lists.

        ``steer=False`` (routed mode) runs the same lockstep computation without the steering op:
        the unsteered baseline that benchmarks compare against. ``rows=N`` decodes N problems at
        a time with continuous batching (default: one row per problem)."""
        t0 = time.perf_counter()
        if self.mode == "paper" and self.windows != (1,):     # (stream checks the other paths' arguments)
            self._check_paper_args(temperature, steer)
            from .baselines import paper_mode_recompute
            pb, pt = self._prompts(base_prompts, thinking_prompts, max_new_tokens)
            return paper_mode_recompute(self, pb, pt, max_new_tokens, eos_token_id=eos_token_id)
        done = dict(r for group in self.stream(
            base_prompts, thinking_prompts, max_new_tokens, rows=rows, eos_token_id=eos_token_id,
            temperature=temperature, top_k=top_k, generator=generator, steer=steer) for r in group)
        return HybridOutput([done[i] for i in range(len(done))], time.perf_counter() - t0,
                            self.last_stats)

    def stream(self, base_prompts, thinking_prompts, max_new_tokens: int = 256, *,
               rows: Optional[int] = None, eos_token_id=None, temperature: float = 0.0, top_k=None,
               generator: Optional[torch.Generator] = None,
               steer: bool = True) -> Iterator[list[tuple[int, HybridResult]]]:
        """:meth:`generate` with continuous batching over ``rows`` rows (default: one per
        problem), yielding ``(problem index, result)`` pairs of each sync point that finished
        some."""
        pb, pt = self._prompts(base_prompts, thinking_prompts, max_new_tokens)
        if self.mode == "paper" and self.windows != (1,):
            raise ValueError(f"windows={self.windows} runs the exact recompute path: use generate")
        self._check_paper_args(temperature, steer)
        mode = PaperMode(self) if self.mode == "paper" else \
            RoutedMode(self, temperature, top_k, generator, steer)
        rows = rows or len(pb)
        sched = self.scheduler(mode, rows, max(map(len, pb)) + max_new_tokens,
                               max(map(len, pt)) + max_new_tokens, eos_token_id,
                               compact=rows < len(pb))
        reqs = [Request((b, t), max_new_tokens, i) for i, (b, t) in enumerate(zip(pb, pt))]
        for group in sched.groups(reqs):
            yield [(c.index, self._result(c)) for c in group]
        self.last_stats = sched.stats

    def _check_paper_args(self, temperature, steer):
        """Paper mode has no sampling and no unsteered variant: refuse what it would ignore."""
        if self.mode != "paper":
            return
        if temperature != 0:
            raise ValueError("paper mode is greedy (temperature=0), as in the paper's code")
        if not steer:
            raise ValueError("steer=False is the routed mode's unsteered baseline; paper mode always "
                             "steers (decode the base model alone with Engine for its baseline)")

    def _prompts(self, base_prompts, thinking_prompts, max_new_tokens):
        """Both sides' prompts as id lists, checked."""
        pb = self.encode_prompts(base_prompts, self.tok_b)
        pt = self.encode_prompts(thinking_prompts, self.tok_t)
        if len(pb) != len(pt):
            raise ValueError(f"{len(pb)} base prompts but {len(pt)} thinking prompts")
        if len(pb) == 0:
            raise ValueError("no prompts given")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return pb, pt

    def scheduler(self, mode, rows: int, capacity_b: int, capacity_t: int,
                  eos_token_id=None, compact: bool = True) -> Scheduler:
        """A continuous-batching scheduler of ``mode`` (:class:`PaperMode` or :class:`RoutedMode`)
        over ``rows`` rows; requests carry (base prompt, thinking prompt)."""
        eos = eos_ids(self.base.hf, eos_token_id)
        return Scheduler(mode, rows=rows, capacities=[capacity_b, capacity_t], eos=eos,
                         pad=pad_id(eos), sync_every=self.base.sync_every, compact=compact)

    def _result(self, c) -> HybridResult:
        cat = c.fields["category"]
        if -2 in cat:
            raise ValueError(f"NaN in the thinking model's layer-{self.sae_layer} activations "
                             f"(problem {c.index}, token {cat.index(-2)})")
        text = self.tok_b.decode(c.tokens, skip_special_tokens=True) if self.tok_b is not None else None
        return HybridResult(c.tokens, text, cat, [bool(x) for x in c.fields["steered"]],
                            c.fields["coef"])


    # ------------------------------------------------------------------ paper mode
    def _paper_step_eager(self, tok, len_b, kv_b, len_t, kv_t, scratch: int, span_b: int,
                          span_t: int):
        """One paper-mode decode step (the function ``compile=`` compiles): the thinking model's
        full step gives its logits and the routing activations; the base model runs its lower
        blocks once, then the real row plus one candidate row per coefficient from
        ``steer_layer`` up (candidates write only their scratch slots). Both caches' lengths
        advance in place. Returns ``(logits_b [B, V], logits_c [B, C, V], logits_t [B, V],
        category [B])``."""
        mb, mt = self.base.m, self.thinking.m
        L, Ls = self.steer_layer, self.sae_layer
        ct, cb = KVCache(kv_t, len_t, 0), KVCache(kv_b, len_b, scratch)
        x, cat = {}, {}
        h = mt.forward(tok[:, None], mt.decode_plan(ct, 0, span_t), ct, {Ls + 1: capture(x)})
        len_t.add_(1)
        logits_t = mt.logits(h[:, 0])

        def candidates(h, plan):          # the real row plus one candidate row per coefficient
            cand, cat["c"] = self.route(h[:, 0], x["h"][:, 0], True)
            return torch.cat([h, cand], 1), mb.decode_plan(cb, scratch, span_b)
        rows = mb.forward(tok[:, None], mb.decode_plan(cb, 0, span_b), cb, {L: candidates})
        len_b.add_(1)
        lg = mb.logits(rows)
        return lg[:, 0], lg[:, 1:], logits_t, cat["c"]

    def _choose(self, logits_b, logits_c, logits_t, cat):
        """The gate and the candidate search. A row whose category is below the threshold
        (``cat < 0``) emits the unsteered base token with coefficient 0, as the recompute does."""
        think_tok = logits_t.argmax(-1)
        base_tok = logits_b.argmax(-1)
        cand_tok = logits_c.argmax(-1)                                  # [B, C]
        lpt = torch.log_softmax(logits_t, -1)
        score = lpt.gather(1, cand_tok)                                 # [B, C]
        best = score.argmax(-1)                                         # first on ties
        chosen = cand_tok.gather(1, best[:, None])[:, 0]
        steer = (think_tok != base_tok) & (cat >= 0)
        tok = torch.where(steer, chosen, base_tok)
        coef = torch.where(steer, self.coefs[best], torch.zeros_like(self.coefs[best]))
        return tok, steer, coef

    # ------------------------------------------------------------------ routed mode
    def _route_or_not(self, h, x, do_steer: bool, validate: bool = False):
        if do_steer:
            return self.route(h, x, False, validate)
        return h, torch.full((h.shape[0],), -1, dtype=torch.int64, device=h.device)

    def routed_forward(self, tok_b, tok_t, cb: KVCache, ct: KVCache, span_b: int, span_t: int,
                       do_steer: bool = True):
        """One routed forward at each row's current cache lengths (not advanced): the truncated
        thinking router reads ``tok_t``, the base model reads ``tok_b`` with ``route_steer``
        entering ``steer_layer``. Returns ``(logits [B, V], category [B])``."""
        mb, mt = self.base.m, self.thinking.m
        x = mt.forward(tok_t[:, None], mt.decode_plan(ct, 0, span_t), ct, stop=self.sae_layer + 1)[:, 0]
        cat = {}

        def steer(h, plan):
            h, cat["c"] = self._route_or_not(h[:, 0], x, do_steer)
            return h[:, None], plan
        h = mb.forward(tok_b[:, None], mb.decode_plan(cb, 0, span_b), cb, {self.steer_layer: steer})
        return mb.logits(h[:, 0]), cat["c"]

    def _routed_step_eager(self, tok, len_b, kv_b, len_t, kv_t, span_b: int, span_t: int,
                           do_steer: bool):
        """One routed decode step (the function ``compile=`` compiles): :meth:`routed_forward`
        on ``tok``, then both caches' lengths advance in place."""
        out = self.routed_forward(tok, tok, KVCache(kv_b, len_b, 0), KVCache(kv_t, len_t, 0),
                                  span_b, span_t, do_steer)
        len_t.add_(1)
        len_b.add_(1)
        return out


class RoutedMode:
    """Routed hybrid decoding as a :class:`~hybridfast.scheduler.Mode`: caches (base, truncated
    thinking router); state ``(logits [R, V], category [R])``."""

    def __init__(self, hm: HybridModel, temperature: float, top_k, generator, do_steer: bool = True):
        self.hm, self.temperature, self.top_k, self.do_steer = hm, temperature, top_k, do_steer
        self.rng = RandomStream(generator, hm.base.m.device) if temperature != 0 else None

    def new_caches(self, rows, capacities):
        hm = self.hm
        return [hm.base.new_cache(rows, capacities[0]),
                hm.thinking.new_cache(rows, capacities[1], layers=hm.sae_layer + 1)]

    def prefill(self, prompts, caches):
        hm = self.hm
        cb, ct = caches
        pad = 0
        ids_t, len_t = pad_prompts(prompts[1], pad, hm.thinking.m.device)
        _, x = hm.thinking.prefill(ids_t, len_t, ct, stop_layer=hm.sae_layer + 1,
                                   capture_layer=hm.sae_layer)
        rec = {}

        def steer(hl):
            out, rec["cat"] = hm._route_or_not(hl[:, 0], x, self.do_steer, validate=True)
            return out[:, None]
        ids_b, len_b = pad_prompts(prompts[0], pad, hm.base.m.device)
        logits, _ = hm.base.prefill(ids_b, len_b, cb, steer_layer=hm.steer_layer, steer=steer)
        return logits, rec["cat"]

    def choose(self, state):
        logits, cat = state
        tok, _, _ = sample(logits, self.temperature, self.top_k, self.rng)
        coef = self.hm.coefs[cat.clamp_min(0)]
        return tok, dict(category=cat.clone(), steered=cat >= 0,      # clone: a CUDA graph's next replay
                         coef=torch.where(cat >= 0, coef, torch.zeros_like(coef)))   # overwrites its outputs

    def step(self, tok, caches, spans):
        hm = self.hm
        cb, ct = caches
        return hm._routed_step(tok, cb.lengths, cb.kv, ct.lengths, ct.kv, hm.base.span(cb, spans[0]),
                               hm.thinking.span(ct, spans[1]), self.do_steer)


class PaperMode:
    """Paper-mode hybrid decoding as a :class:`~hybridfast.scheduler.Mode` (greedy): caches (base
    with one scratch slot per coefficient, full thinking model); state ``(logits_b [R, V],
    logits_c [R, C, V], logits_t [R, V], category [R])``."""

    def __init__(self, hm: HybridModel):
        self.hm = hm
        self.C = hm.coefs.numel()

    def new_caches(self, rows, capacities):
        hm = self.hm
        return [hm.base.new_cache(rows, capacities[0], scratch=self.C),
                hm.thinking.new_cache(rows, capacities[1])]

    def prefill(self, prompts, caches):
        """Base prefill unsteered (keeping the residual entering ``steer_layer`` at the last
        prompt position), thinking prefill in full, then the first step's candidates: the
        layers from ``steer_layer`` up as one query row per coefficient."""
        hm = self.hm
        mb = hm.base.m
        cb, ct = caches
        ids_b, len_b = pad_prompts(prompts[0], 0, mb.device)
        ids_t, len_t = pad_prompts(prompts[1], 0, hm.thinking.m.device)
        hcap = {}

        def grab(hl):
            hcap["h"] = hl[:, 0].clone()
            return hl
        logits_b, _ = hm.base.prefill(ids_b, len_b, cb, steer_layer=hm.steer_layer, steer=grab)
        logits_t, x = hm.thinking.prefill(ids_t, len_t, ct, capture_layer=hm.sae_layer)
        cand, cat = hm.route(hcap["h"], x, True, validate=True)
        plan = mb.candidate_plan(cb, len_b - 1, self.C, cb.scratch + ids_b.shape[1])
        logits_c = mb.logits(mb.run(cand, plan, cb, hm.steer_layer))
        return logits_b, logits_c, logits_t, cat

    def choose(self, state):
        logits_b, logits_c, logits_t, cat = state
        tok, steer, coef = self.hm._choose(logits_b, logits_c, logits_t, cat)
        return tok, dict(category=cat.clone(), steered=steer, coef=coef)   # clone: see RoutedMode.choose

    def step(self, tok, caches, spans):
        hm = self.hm
        cb, ct = caches
        return hm._paper_step(tok, cb.lengths, cb.kv, ct.lengths, ct.kv, self.C,
                              hm.base.span(cb, spans[0]), hm.thinking.span(ct, spans[1]))
