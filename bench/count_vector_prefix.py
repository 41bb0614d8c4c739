"""Token-forwards of steering-vector training, counted from the example lengths (no model run,
hardware-independent): the per-batch prefix form (``share_prefixes=False``) vs shared trace
prefixes (the default), for the same examples, batches and seed.

    python bench/count_vector_prefix.py runs/demo        # a `hybridfast demo` output folder
    python bench/count_vector_prefix.py runs/demo --time-epochs 2   # and time both forms (seconds)

The folder needs traces.jsonl and sae/sentences.jsonl; examples are rebuilt with the demo's
settings (``build_vector_examples(min_target_words=3, min_bias_words=5, n_train=64)``) and the
tokenizer of ``--model``. Counts are columns x rows (padding included), per epoch, for the bias
run and the category run (the demo trains both, batch 16, 4 epochs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hybridfast.steering import PREFIX_CACHE_BYTES, PREFIX_MIN, example_batches, group_prefixes


def count(examples, *, n_categories: int, d: int, batch_size: int, epochs: int, seed: int = 0,
          kv_bytes_per_token: int = 0, budget: int = PREFIX_CACHE_BYTES) -> dict:
    """Per-epoch mean token-forwards of both forms, drawing the batches exactly as
    :func:`~hybridfast.steering.train_vectors` does (``seed``, ``n_categories`` x ``d`` init)."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(n_categories, d, generator=g)          # the vectors' init comes first
    root, used, roots = group_prefixes([tuple(e.prompt_ids[:-1]) for e in examples])
    users = [0] * len(roots)
    for r in root:
        if r >= 0:
            users[r] += 1
    kept, total = set(), 0                             # same choice as _PrefixPlan
    for r in sorted(range(len(roots)), key=lambda r: (-users[r], len(roots[r]), r)):
        if (total + len(roots[r])) * kv_bytes_per_token <= budget:
            kept.add(r)
            total += len(roots[r])
    lens = sorted(len(roots[r]) for r in kept)    # kept roots: padded passes of batch_size roots
    once_padded = sum(len(lens[i: i + batch_size]) * lens[i: i + batch_size][-1]
                      for i in range(0, len(lens), batch_size))
    old = dict(prefix_nograd=0, prefix_in_grad_pass=0, grad_pass=0)
    new = dict(prefix_nograd=0, grad_pass=0)
    for _ in range(epochs):
        for idx in example_batches(examples, batch_size, g):
            rows = [examples[i] for i in idx]
            B = len(rows)
            p = [len(e.prompt_ids) for e in rows]
            S = max(len(e.prompt_ids) + len(e.target_ids) for e in rows)
            cut = min(x - 1 for x in p)
            cut = cut if cut >= PREFIX_MIN else 0
            old["prefix_nograd"] += B * cut
            old["grad_pass"] += B * (S - cut)
            old["prefix_in_grad_pass"] += sum(x - 1 - cut for x in p)
            need = {}
            for i in idx:
                if used[i] and root[i] not in kept:
                    need[root[i]] = max(need.get(root[i], 0), used[i])
            if need:       # one padded pass over the batch's roots beyond the budget
                new["prefix_nograd"] += len(need) * max(need.values())
            suf = [len(examples[i].prompt_ids) + len(examples[i].target_ids) - 1 - used[i] for i in idx]
            new["grad_pass"] += B * max(suf)
    per = {k: v / epochs for k, v in old.items()}
    per["prefix_total"] = per["prefix_nograd"] + per["prefix_in_grad_pass"]
    nper = {k: v / epochs for k, v in new.items()}
    return dict(examples=len(examples), roots=len(roots), root_tokens=sum(map(len, roots)),
                kept_roots=len(kept), kept_root_tokens=total, kept_bytes=total * kv_bytes_per_token,
                partially_shared=sum(u < len(e.prompt_ids) - 1 for u, e in zip(used, examples)),
                shared_tokens=sum(used), prefix_tokens=sum(len(e.prompt_ids) - 1 for e in examples),
                old_per_epoch=per, new_per_epoch=nper,
                new_once=dict(prefix_nograd=total, prefix_nograd_padded=once_padded))


def time_forms(model, examples, n_categories: int, *, epochs: int, batch_size: int, steer_layer: int) -> dict:
    """Seconds of ``epochs`` epochs of category-vector training, per-batch prefixes vs shared
    trace prefixes (same seed, so the same batches), with the largest difference of the vectors."""
    import time
    from hybridfast.steering import train_vectors
    out, vecs = {}, {}
    for name, share in (("per_batch", False), ("shared", True)):
        t0 = time.perf_counter()
        r = train_vectors(model, examples, n_categories, steer_layer, epochs=epochs,
                          patience=epochs + 1, batch_size=batch_size, share_prefixes=share)
        out[name] = time.perf_counter() - t0
        vecs[name] = r.V
    out["per_batch_vs_shared"] = out["per_batch"] / out["shared"]
    out["max_abs_vector_difference"] = float((vecs["per_batch"] - vecs["shared"]).abs().max())
    out["epochs"] = epochs
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a `hybridfast demo` output folder (traces.jsonl, sae/)")
    ap.add_argument("--model", default="smollm2-135m", help="tokenizer and KV size of this model")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steer-layer", type=int, default=12, help="--time-epochs: steering layer (the demo's: 12)")
    ap.add_argument("--time-epochs", type=int, default=0,
                    help="also train the category vectors for this many epochs with each form and "
                         "report seconds (default: 0, counts only)")
    a = ap.parse_args(argv)
    from hybridfast.io import load_sae, read_jsonl
    from hybridfast.models import load_model
    from hybridfast.steering import kv_bytes_per_token
    from hybridfast.taxonomy import build_vector_examples, read_annotations
    model, tok = load_model(a.model)
    run = Path(a.run)
    traces, ann = read_jsonl(run / "traces.jsonl"), read_annotations(run / "sae")
    K = load_sae(run / "sae").n_latents
    exs, bias = build_vector_examples(traces, ann, model, tok, K, min_target_words=3, min_bias_words=5,
                                      n_train=64)
    kw = dict(d=model.config.hidden_size, batch_size=a.batch_size, epochs=a.epochs,
              kv_bytes_per_token=kv_bytes_per_token(model))
    out = dict(bias=count(bias, n_categories=1, **kw), categories=count(exs, n_categories=K, **kw))
    if a.time_epochs:
        out["seconds"] = time_forms(model, exs, K, epochs=a.time_epochs, batch_size=a.batch_size,
                                    steer_layer=a.steer_layer)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
