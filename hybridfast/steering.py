"""Steering-vector training in the base model (DESIGN.md section 1.2).

A vector is added to the residual stream entering block ``steer_layer`` at the positions whose
outputs predict the target tokens (the same positions generation steers), and trained to
maximise the likelihood of the target with logits x ``coldness`` (0.7). Adam, lr 1e-2, cosine
to 0 over ``epochs`` (50), early stopping with patience 10 (min delta 1e-3), best epoch kept.

All K category vectors train in **one batched run**: each row of a batch adds its own category's
vector plus the frozen bias vector. The base model's weights are frozen and never get gradients.
A run with ``checkpoint_dir`` saves every epoch (safetensors + JSON, atomically) and resumes
from the last completed epoch.

Cost: a row's positions before its first steered position do not depend on the vectors, so each
batch encodes the prefix that all its rows share up to there once, without autograd, into a KV
cache, and only the rest runs with gradients; logits and the loss are computed at the target
positions only (not over the whole vocabulary at every prompt position). Batches are drawn from
length-sorted windows of the shuffled examples, which cuts padding.
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


def _batches(examples, batch_size, g, window: int = 8):
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
        return row_sum / tgt.sum(1).clamp_min(1)


def _collate(examples, idx, pad, dev):
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


def train_vectors(model, examples: list[VectorExample], n_categories: int, steer_layer: int, *,
                  bias: torch.Tensor | None = None, epochs: int = 50, lr: float = 1e-2,
                  coldness: float = 0.7, patience: int = 10, min_delta: float = 1e-3,
                  batch_size: int = 8, seed: int = 0, pad_id: int = 0, checkpoint_dir=None,
                  progress: bool = False, max_epochs_this_call: int | None = None) -> VectorTrainResult:
    """Train ``n_categories`` vectors at once (see module docstring)."""
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
        for idx in _batches(examples, batch_size, g):
            ids, att, steer, labels, cats = _collate(examples, idx, pad_id, dev)
            add = V[cats]
            if bias_t is not None:
                add = add + bias_t
            add = steer[:, :, None] * add[:, None, :]
            row_loss = _target_loss(model, ids, att, steer, labels, add, steer_layer, coldness)
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
    return VectorTrainResult(best_V.detach().cpu(), best, len(hist), hist, steps)
