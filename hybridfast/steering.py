"""Steering-vector training in the base model (DESIGN.md section 1.2).

A vector is added to the residual stream entering block ``steer_layer`` at the positions whose
outputs predict the target tokens (the same positions generation steers), and trained to
maximise the likelihood of the target with logits x ``coldness`` (0.7). Adam, lr 1e-2, cosine
to 0 over ``epochs`` (50), early stopping with patience 10 (min delta 1e-3), best epoch kept.

All K category vectors train in **one batched run**: each row of a batch adds its own category's
vector plus the frozen bias vector. The base model's weights are frozen and never get gradients.
A run with ``checkpoint_dir`` saves every epoch (safetensors + JSON, atomically) and resumes
from the last completed epoch.
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


def _batches(examples, batch_size, g):
    order = torch.randperm(len(examples), generator=g).tolist()
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


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
            with torch.enable_grad(), steering_hook(model, steer_layer, lambda h: h + add.to(h.dtype)):
                logits = model(input_ids=ids, attention_mask=att).logits.float() * coldness
                tok_loss = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
                row_loss = tok_loss.sum(1) / (labels != -100).sum(1).clamp_min(1)
                loss = row_loss.mean()
                opt.zero_grad()
                loss.backward()
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
