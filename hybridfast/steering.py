"""Steering-vector training in the base model (DESIGN.md section 1.2).

A vector is added to the residual stream entering block ``steer_layer`` at the positions whose
outputs predict the target tokens (the same positions generation steers), and trained to
maximise the likelihood of the target with logits x ``coldness`` (0.7). Adam, lr 1e-2, cosine
to 0 over ``epochs`` (50), early stopping with patience 10 (min delta 1e-3), best epoch kept.

All K category vectors train in **one batched run**: each row of a batch adds its own category's
vector plus the frozen bias vector. The base model's weights are frozen and never get gradients.
A run with ``checkpoint_dir`` saves every epoch (safetensors + JSON, atomically) and resumes
from the last completed epoch.

Cost: a row's positions before its first steered position (its prompt less the last token, the
*prefix*) are never steered, so their KV does not depend on the vectors. Examples drawn from one
trace have prefixes that are prefixes of each other (task prompt + thinking text up to sentence
i), so by default (``share_prefixes=True``) each distinct trace's longest needed prefix (a
*root*) is encoded once without autograd, and every example of that trace takes its prefix KV as
a slice of the root's. Sharing is decided on token ids alone: an example shares the longest run
of leading token ids that agrees with its root (prompts are tokenized separately, so the last
tokens before a boundary may differ; those few tokens then run, unsteered, in the gradient pass).
The roots' KV caches are kept across epochs while they fit ``prefix_cache_bytes`` (default
1 GiB; the roots used by the most examples first); the roots beyond the budget are re-encoded in
every batch that needs them (once per root per batch, up to the longest prefix the batch needs).
Only the last prompt token and the target then run with gradients; logits and the loss are
computed at the target positions only (not over the whole vocabulary at every prompt position).
Batches are drawn from length-sorted windows of the shuffled examples, which cuts padding.
``share_prefixes=False`` is the previous form: each batch encodes the columns before its earliest
steered position once without autograd and runs the rest of every row with gradients. Both forms
give the same losses and gradients up to float rounding. Models with sliding-window or other
non-full attention layers use the previous form.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .baselines import steering_hook
from .io import atomic_write_text, load_tensors, save_tensors

__all__ = ["VectorExample", "train_vectors", "VectorTrainResult"]


@dataclass
class VectorExample:
    prompt_ids: list
    target_ids: list
    category: int = 0


@dataclass
class VectorTrainResult:
    V: torch.Tensor                 #: [K, d] best vector per category
    best_loss: list                 #: per category
    epochs: int
    history: list = field(default_factory=list)   #: per epoch, per-category mean loss
    steps: int = 0
    #: token-forwards (columns x rows, padding included) done by this call: ``prefix`` without
    #: autograd (prefix encodings), ``grad`` in the passes with gradients
    token_forwards: dict = field(default_factory=dict)


def example_batches(examples, batch_size, g, window: int = 8):
    """Shuffled batches; within windows of ``window`` batches the rows are sorted by length so a
    batch holds rows of similar length (little padding, a long shared prefix)."""
    order = torch.randperm(len(examples), generator=g).tolist()
    size = lambda i: len(examples[i].prompt_ids) + len(examples[i].target_ids)  # noqa: E731
    span = batch_size * window
    out = []
    for w in range(0, len(order), span):
        chunk = sorted(order[w: w + span], key=size)
        out += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    return out


#: shared prefixes shorter than this run with the rest (a separate pass costs more than it saves)
PREFIX_MIN = 32


def _cache_kwarg(model) -> str:
    """The name ``transformers`` gives the KV-cache argument (``cache`` from 5.x on)."""
    import inspect
    params = inspect.signature(type(model.model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _target_loss(model, ids, att, steer, labels, add, steer_layer, coldness):
    """Per-row mean cross-entropy of the targets with ``add [B, S, d]`` entering
    ``steer_layer``. The columns before the first steered position of every row are encoded
    once without autograd into a KV cache; logits only at target positions."""
    from transformers import DynamicCache
    cut = int(steer.argmax(1).min())               # first steered column of the earliest row
    if cut < PREFIX_MIN:                           # too short to pay for a second pass
        cut = 0
    kw = {}
    if cut > 0:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model.model(input_ids=ids[:, :cut], attention_mask=att[:, :cut], use_cache=True,
                        **{_cache_kwarg(model): cache})
        kw = {_cache_kwarg(model): cache, "use_cache": True}
    add = add[:, cut:]
    with torch.enable_grad(), steering_hook(model, steer_layer, lambda h: h + add.to(h.dtype)):
        hid = model.model(input_ids=ids[:, cut:], attention_mask=att, **kw).last_hidden_state
        lab = labels[:, cut:]
        tgt = lab != -100
        logits = model.lm_head(hid[tgt]).float() * coldness            # [n_targets, V]
        tok_loss = torch.nn.functional.cross_entropy(logits, lab[tgt], reduction="none")
        rows = tgt.nonzero()[:, 0]
        row_sum = torch.zeros(ids.shape[0], device=ids.device).index_add(0, rows, tok_loss)
        return row_sum / tgt.sum(1).clamp_min(1), ids.shape[0] * cut, ids.shape[0] * (ids.shape[1] - cut)


def collate_examples(examples, idx, pad, dev):
    rows = [examples[i] for i in idx]
    S = max(len(r.prompt_ids) + len(r.target_ids) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.int64)
    att = torch.zeros(len(rows), S, dtype=torch.int64)
    steer = torch.zeros(len(rows), S)
    labels = torch.full((len(rows), S), -100, dtype=torch.int64)
    for r, ex in enumerate(rows):
        p, t = len(ex.prompt_ids), len(ex.target_ids)
        ids[r, : p + t] = torch.tensor(list(ex.prompt_ids) + list(ex.target_ids))
        att[r, : p + t] = 1
        steer[r, p - 1: p + t - 1] = 1.0          # positions predicting the target tokens
        labels[r, p - 1: p + t - 1] = torch.tensor(list(ex.target_ids))
    cats = torch.tensor([ex.category for ex in rows])
    return ids.to(dev), att.to(dev), steer.to(dev), labels.to(dev), cats.to(dev)


# ----------------------------------------------------------------------------- shared prefixes

#: default budget for the root prefix KV caches kept across epochs (bytes)
PREFIX_CACHE_BYTES = 1 << 30


def _lcp(a, b) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def group_prefixes(prefixes, *, max_tail: int = 16):
    """Roots for token-id prefixes: ``(root, used, roots)`` where ``roots`` is a list of token
    tuples, ``root[i]`` the root example i takes its KV from (-1 for an empty prefix) and
    ``used[i]`` how many of its leading tokens agree with that root (the KV it can reuse).

    Sorted lexicographically, a sequence that is a prefix of any other is a prefix of its
    successor, so one backward pass finds the *leaves* (sequences no other extends) and the leaf
    each sequence is a prefix of. Leaves become roots, longest first, except that a leaf agreeing
    with a neighbouring leaf's root in all but at most ``max_tail`` final tokens (and in at least
    half its length) takes that root, the rest of its prefix being left to the gradient pass: the
    same trace tokenized differently at a sentence boundary. Each sequence then uses the root of
    its leaf as far as their token ids agree."""
    n = len(prefixes)
    seqs = [tuple(x) for x in prefixes]
    order = [i for i in sorted(range(n), key=lambda i: seqs[i]) if seqs[i]]
    leaf = {}
    for j in range(len(order) - 1, -1, -1):
        i = order[j]
        if j + 1 < len(order):
            nxt = order[j + 1]
            if seqs[nxt][: len(seqs[i])] == seqs[i]:
                leaf[i] = leaf[nxt]
                continue
        leaf[i] = i
    leaves = [i for i in order if leaf[i] == i]
    roots, root_of = [], {}
    for k in sorted(range(len(leaves)), key=lambda k: (-len(seqs[leaves[k]]), k)):
        s, best, best_r = seqs[leaves[k]], -1, -1
        for nb in (k - 1, k + 1):
            if 0 <= nb < len(leaves) and leaves[nb] in root_of:
                r = root_of[leaves[nb]]
                m = _lcp(s, roots[r])
                if m > best:
                    best, best_r = m, r
        if best >= 0 and len(s) - best <= max_tail and 2 * best >= len(s):
            root_of[leaves[k]] = best_r
        else:
            roots.append(s)
            root_of[leaves[k]] = len(roots) - 1
    root, used = [-1] * n, [0] * n
    for i in order:
        root[i] = root_of[leaf[i]]
        used[i] = _lcp(seqs[i], roots[root[i]])
    return root, used, roots


def _full_attention_only(config) -> bool:
    types = getattr(config, "layer_types", None) or []
    return not getattr(config, "use_sliding_window", False) and all(t == "full_attention" for t in types)


def kv_bytes_per_token(model) -> int:
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dtype = next(model.parameters()).dtype
    return c.num_hidden_layers * 2 * heads * head_dim * torch.finfo(dtype).bits // 8


def _cache_layers(cache):
    """``[(keys, values)]`` per layer, each ``[B, H, S, D]``."""
    if hasattr(cache, "layers"):
        return [(lay.keys, lay.values) for lay in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _make_cache(model, kv):
    """A ``DynamicCache`` holding ``kv [n_layers, 2, B, S, H, D]``."""
    from transformers import DynamicCache
    pairs = [(kv[l, 0].transpose(1, 2), kv[l, 1].transpose(1, 2)) for l in range(kv.shape[0])]
    try:
        return DynamicCache(pairs, config=model.config)
    except TypeError:                                     # older transformers
        return DynamicCache.from_legacy_cache(tuple(pairs))


@torch.no_grad()
def _encode(model, seqs, pad, dev):
    """KV of each token sequence (no autograd): ``[n_layers, 2, n, max_len, H, D]``, right-padded."""
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.int64)
    att = torch.zeros(len(seqs), L, dtype=torch.int64)
    for r, x in enumerate(seqs):
        ids[r, : len(x)] = torch.tensor(x)
        att[r, : len(x)] = 1
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    model.model(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=True,
                **{_cache_kwarg(model): cache})
    return torch.stack([torch.stack([k, v]) for k, v in _cache_layers(cache)]).transpose(3, 4)


class _PrefixPlan:
    """Which root each example's prefix KV comes from, and the roots kept across epochs.
    ``encoded`` counts the prefix token-forwards done (columns, padding included)."""

    def __init__(self, model, examples, *, budget_bytes: int, batch_size: int, pad_id: int):
        self.pad = pad_id
        self.root, self.used, self.roots = group_prefixes(
            [tuple(int(x) for x in e.prompt_ids[: len(e.prompt_ids) - 1]) for e in examples])
        users = [0] * len(self.roots)
        for r in self.root:
            if r >= 0:
                users[r] += 1
        per_tok = kv_bytes_per_token(model)
        self.offset, total = {}, 0            # kept roots: token offset in the store
        for r in sorted(range(len(self.roots)), key=lambda r: (-users[r], len(self.roots[r]), r)):
            if (total + len(self.roots[r])) * per_tok <= budget_bytes:
                self.offset[r] = total
                total += len(self.roots[r])
        self.encoded = 0
        self.store = None
        if self.offset:
            dev = next(model.parameters()).device
            kept = sorted(self.offset, key=lambda r: len(self.roots[r]))
            for i in range(0, len(kept), batch_size):
                chunk = kept[i: i + batch_size]
                kv = _encode(model, [self.roots[r] for r in chunk], pad_id, dev)
                self.encoded += kv.shape[2] * kv.shape[3]
                if self.store is None:
                    self.store = kv.new_empty(kv.shape[:2] + (total,) + kv.shape[4:])
                for j, r in enumerate(chunk):
                    o, n = self.offset[r], len(self.roots[r])
                    self.store[:, :, o: o + n] = kv[:, :, j, :n]

    def batch_kv(self, model, idx, width: int, dev):
        """``[n_layers, 2, B, width, H, D]``: row b holds the KV of its first ``used`` prefix
        tokens (the rest is garbage, masked by the caller)."""
        B = len(idx)
        kept = [b for b, i in enumerate(idx) if self.used[i] > 0 and self.root[i] in self.offset]
        other = [b for b, i in enumerate(idx) if self.used[i] > 0 and self.root[i] not in self.offset]
        out = None
        if kept:
            pos = torch.arange(width)
            src = torch.stack([(self.offset[self.root[idx[b]]] + pos).clamp_max(
                self.offset[self.root[idx[b]]] + self.used[idx[b]] - 1) for b in kept])
            kv = self.store[:, :, src.flatten().to(self.store.device)]
            kv = kv.view(kv.shape[:2] + (len(kept), width) + kv.shape[3:])
            if len(kept) == B:
                out = kv
            else:
                out = kv.new_zeros(kv.shape[:2] + (B,) + kv.shape[3:])
                out[:, :, kept] = kv
        if other:                        # roots beyond the budget: encode once for this batch
            need = {}
            for b in other:
                r = self.root[idx[b]]
                need[r] = max(need.get(r, 0), self.used[idx[b]])
            local = list(need)
            kv = _encode(model, [self.roots[r][: need[r]] for r in local], self.pad, dev)
            self.encoded += kv.shape[2] * kv.shape[3]
            if out is None:
                out = kv.new_zeros(kv.shape[:2] + (B, width) + kv.shape[4:])
            where = {r: j for j, r in enumerate(local)}
            for b in other:
                n = self.used[idx[b]]
                out[:, :, b, :n] = kv[:, :, where[self.root[idx[b]]], :n]
        return out


def _shared_loss(model, plan, examples, idx, add_rows, steer_layer, coldness, dev):
    """Per-row mean cross-entropy of the targets with ``add_rows [B, d]`` added entering
    ``steer_layer`` at the target positions; the prefix KV comes from ``plan``."""
    rows = [examples[i] for i in idx]
    used = [plan.used[i] for i in idx]
    P = max(used)
    suf = [list(ex.prompt_ids[u:]) + list(ex.target_ids[:-1]) for ex, u in zip(rows, used)]
    B, S = len(rows), max(len(x) for x in suf)
    ids = torch.full((B, S), plan.pad, dtype=torch.int64)
    att = torch.zeros(B, P + S, dtype=torch.int64)
    pos = torch.zeros(B, S, dtype=torch.int64)
    steer = torch.zeros(B, S)
    labels = torch.full((B, S), -100, dtype=torch.int64)
    for r, (ex, u, x) in enumerate(zip(rows, used, suf)):
        ids[r, : len(x)] = torch.tensor(x)
        att[r, :u] = 1
        att[r, P: P + len(x)] = 1
        pos[r] = u + torch.arange(S)
        a, t = len(ex.prompt_ids) - 1 - u, len(ex.target_ids)
        steer[r, a: a + t] = 1.0
        labels[r, a: a + t] = torch.tensor(list(ex.target_ids))
    ids, att, pos, steer, labels = (x.to(dev) for x in (ids, att, pos, steer, labels))
    kw = {}
    if P > 0:
        kw = {_cache_kwarg(model): _make_cache(model, plan.batch_kv(model, idx, P, dev)), "use_cache": True}
    add = steer[:, :, None] * add_rows[:, None, :]
    with torch.enable_grad(), steering_hook(model, steer_layer, lambda h: h + add.to(h.dtype)):
        hid = model.model(input_ids=ids, attention_mask=att, position_ids=pos, **kw).last_hidden_state
        tgt = labels != -100
        logits = model.lm_head(hid[tgt]).float() * coldness            # [n_targets, V]
        tok_loss = torch.nn.functional.cross_entropy(logits, labels[tgt], reduction="none")
        rows_i = tgt.nonzero()[:, 0]
        row_sum = torch.zeros(B, device=dev).index_add(0, rows_i, tok_loss)
        return row_sum / tgt.sum(1).clamp_min(1), B * S


def train_vectors(model, examples: list[VectorExample], n_categories: int, steer_layer: int, *,
                  bias: torch.Tensor | None = None, epochs: int = 50, lr: float = 1e-2,
                  coldness: float = 0.7, patience: int = 10, min_delta: float = 1e-3,
                  batch_size: int = 8, seed: int = 0, pad_id: int = 0, checkpoint_dir=None,
                  progress: bool = False, max_epochs_this_call: int | None = None,
                  share_prefixes: bool = True, prefix_cache_bytes: int = PREFIX_CACHE_BYTES) -> VectorTrainResult:
    """Train ``n_categories`` vectors at once (see module docstring).

    ``share_prefixes`` encodes each trace's longest prefix once and slices every example's prefix
    KV from it; the roots' KV stays in memory across epochs up to ``prefix_cache_bytes`` (bytes,
    default 1 GiB; 0 keeps none), and roots beyond that budget are re-encoded in each batch that
    needs them. ``share_prefixes=False`` encodes each batch's common leading columns per batch.
    Neither changes the result beyond float rounding."""
    if not examples:
        raise ValueError("no training examples")
    bad_cat = [e.category for e in examples if not 0 <= e.category < n_categories]
    if bad_cat:
        raise ValueError(f"unknown category {bad_cat[0]} (valid 0..{n_categories - 1})")
    for i, e in enumerate(examples):
        if not e.prompt_ids or not e.target_ids:
            raise ValueError(f"example {i} has an empty prompt or target")
    n_layers = model.config.num_hidden_layers
    if not 0 <= steer_layer < n_layers:
        raise ValueError(f"steer_layer={steer_layer} out of range (model has {n_layers} blocks)")
    dev = next(model.parameters()).device
    d = model.config.hidden_size
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    V0 = torch.randn(n_categories, d, generator=g)
    V = torch.nn.Parameter((V0 / V0.norm(dim=1, keepdim=True)).to(dev))
    opt = torch.optim.Adam([V], lr=lr)
    best_V = V.detach().clone()
    best = [math.inf] * n_categories
    bad = [0] * n_categories
    hist, start_epoch, steps = [], 0, 0
    bias_t = None if bias is None else bias.to(dev, torch.float32).detach()
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    if ck is not None and (ck / "checkpoint.json").exists():
        st = json.loads((ck / "checkpoint.json").read_text())
        t = load_tensors(ck / "checkpoint.safetensors")
        if tuple(t["V"].shape) != (n_categories, d):
            raise ValueError(f"{ck}: checkpoint V has shape {tuple(t['V'].shape)}, expected {(n_categories, d)}")
        with torch.no_grad():
            V.copy_(t["V"].to(dev))
        best_V = t["best_V"].to(dev)
        opt.state[V] = dict(step=torch.tensor(float(st["adam_step"])), exp_avg=t["exp_avg"].to(dev),
                            exp_avg_sq=t["exp_avg_sq"].to(dev))
        start_epoch, best, bad, hist, steps = st["epoch"], st["best"], st["bad"], st["history"], st["steps"]
        g.set_state(torch.tensor(st["rng"], dtype=torch.uint8))
    plan = None
    if share_prefixes and _full_attention_only(model.config) and start_epoch < epochs:
        plan = _PrefixPlan(model, examples, budget_bytes=prefix_cache_bytes, batch_size=batch_size,
                           pad_id=pad_id)
    n_grad = n_prefix_old = 0
    it = range(start_epoch, epochs)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"vectors K={n_categories}", initial=start_epoch, total=epochs)
    ep = start_epoch
    done_this_call = 0
    for ep in it:
        if all(b >= patience for b in bad):
            break
        for grp in opt.param_groups:   # cosine schedule to 0 over `epochs`
            grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * ep / epochs))
        tot = torch.zeros(n_categories, device=dev)
        cnt = torch.zeros(n_categories, device=dev)
        for idx in example_batches(examples, batch_size, g):
            cats = torch.tensor([examples[i].category for i in idx], device=dev)
            add = V[cats]
            if bias_t is not None:
                add = add + bias_t
            if plan is not None:
                row_loss, n = _shared_loss(model, plan, examples, idx, add, steer_layer, coldness, dev)
            else:
                ids, att, steer, labels, _ = collate_examples(examples, idx, pad_id, dev)
                add = steer[:, :, None] * add[:, None, :]
                row_loss, n_pre, n = _target_loss(model, ids, att, steer, labels, add, steer_layer, coldness)
                n_prefix_old += n_pre
            n_grad += n
            opt.zero_grad()
            with torch.enable_grad():
                row_loss.mean().backward()
            opt.step()
            steps += 1
            tot.index_add_(0, cats, row_loss.detach())
            cnt.index_add_(0, cats, torch.ones_like(row_loss))
        ep_loss = (tot / cnt.clamp_min(1)).tolist()
        hist.append(ep_loss)
        for c in range(n_categories):
            if cnt[c] == 0:
                continue
            if ep_loss[c] < best[c] - min_delta:
                best[c], bad[c] = ep_loss[c], 0
                best_V[c] = V.detach()[c]
            else:
                bad[c] += 1
        if ck is not None:
            s = opt.state[V]
            save_tensors(ck / "checkpoint.safetensors", dict(V=V.detach(), best_V=best_V,
                                                             exp_avg=s["exp_avg"], exp_avg_sq=s["exp_avg_sq"]))
            atomic_write_text(ck / "checkpoint.json", json.dumps(dict(
                epoch=ep + 1, best=best, bad=bad, history=hist, steps=steps,
                adam_step=float(s["step"]), rng=g.get_state().tolist())))
        done_this_call += 1
        if max_epochs_this_call is not None and done_this_call >= max_epochs_this_call:
            break
    for p in model.parameters():
        if p.grad is not None:
            raise RuntimeError("a base-model parameter received a gradient")
    fw = dict(prefix=plan.encoded if plan is not None else n_prefix_old, grad=n_grad)
    return VectorTrainResult(best_V.detach().cpu(), best, len(hist), hist, steps, fw)
