"""Tokens/sec of hybrid generation modes vs baselines (random-weight models from bundled configs).

    python bench/bench_hybrid.py                         # tiny model, CPU
    python bench/bench_hybrid.py --config qwen2.5-1.5b --batch 1 8 32 --dtype bf16   # GPU

Modes: base-only decode, lockstep unsteered (base + truncated thinking router, no steering op),
routed (fused route_steer), routed via naive hooks (model.generate + .item() routing, one
problem at a time), paper mode (gate + candidate rows).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (add_output_flags, count_syncs, env_info, result_path, show_warnings_once,  # noqa: E402
                    table, write)

from hybridfast import HybridModel  # noqa: E402
from hybridfast.baselines import routed_generate_hooks  # noqa: E402
from hybridfast.engine import Engine  # noqa: E402
from hybridfast.errors import ArgumentParser  # noqa: E402
from hybridfast.tiny import bundled_config, model_from_config  # noqa: E402


def run(config, batches, new_tokens, prompt_len, dtype, K, naive_max_batch, seed=0):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = bundled_config(config)
    base = model_from_config(cfg, seed=seed, dtype=dtype, device=dev)
    think = model_from_config(cfg, seed=seed + 1, dtype=dtype, device=dev)
    n = cfg["num_hidden_layers"]
    d = cfg["hidden_size"]
    sae_layer, steer_layer = n // 2, n // 3
    g = torch.Generator().manual_seed(0)
    sae = dict(W_enc=torch.randn(d, K, generator=g).to(dev), b_enc=torch.zeros(K).to(dev),
               b_dec=torch.zeros(d).to(dev))
    vec = ((torch.randn(K, d, generator=g) * 0.05).to(dev, dtype), (torch.randn(d, generator=g) * 0.01).to(dev, dtype))
    coefs = torch.rand(K, generator=g).tolist()
    rows = []
    V = cfg["vocab_size"]
    for B in batches:
        prompts = torch.randint(3, V, (B, prompt_len), generator=g).tolist()
        tprompts = torch.randint(3, V, (B, prompt_len + 3), generator=g).tolist()
        eng = Engine(base)
        hr = HybridModel(base, think, sae, vec, sae_layer=sae_layer, steer_layer=steer_layer,
                         mode="routed", coefficients=coefs, threshold=0.0)
        hp = HybridModel(base, think, sae, vec, sae_layer=sae_layer, steer_layer=steer_layer,
                         coefficients=[0.25, 0.5, 1.0])
        modes = {
            "base_only": lambda: eng.generate(prompts, new_tokens, eos_token_id=-1),
            "lockstep_unsteered": lambda: hr.generate(prompts, tprompts, new_tokens, eos_token_id=-1, steer=False),
            "routed_fused": lambda: hr.generate(prompts, tprompts, new_tokens, eos_token_id=-1),
            "paper": lambda: hp.generate(prompts, tprompts, new_tokens, eos_token_id=-1),
        }
        if B <= naive_max_batch:
            modes["routed_naive_hooks"] = lambda: routed_generate_hooks(
                base, think, sae, vec, sae_layer=sae_layer, steer_layer=steer_layer,
                base_prompts=prompts, thinking_prompts=tprompts, coefficients=coefs,
                threshold=0.0, max_new_tokens=new_tokens, eos_token_id=-1)
        r = dict(config=config, B=B, new_tokens=new_tokens)
        for name, fn in modes.items():
            fn()  # warm-up (allocations, kernel compilation)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, syncs = count_syncs(fn)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            r[f"{name}_tok_s"] = B * new_tokens / dt
            if syncs is not None:
                r[f"{name}_syncs_per_tok"] = syncs / (B * new_tokens)
        r["routed_vs_unsteered"] = r["routed_fused_tok_s"] / r["lockstep_unsteered_tok_s"]
        if "routed_naive_hooks_tok_s" in r:
            r["fused_vs_naive"] = r["routed_fused_tok_s"] / r["routed_naive_hooks_tok_s"]
        rows.append(r)
    return rows


def main(argv=None):
    ap = ArgumentParser(prog="hybridfast bench", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-qwen2",
                    help="bundled model config (random weights; default: %(default)s)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (default: %(default)s)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="model dtype (default: %(default)s)")
    ap.add_argument("--K", type=int, default=15, help="SAE categories (default: %(default)s)")
    ap.add_argument("--naive-max-batch", type=int, default=32,
                    help="largest batch the naive hooks baseline runs (default: %(default)s)")
    add_output_flags(ap)
    a = ap.parse_args(argv)
    out = result_path(ap, a, f"hybrid-{a.config}")
    show_warnings_once()
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[a.dtype]
    rows = run(a.config, a.batch, a.new_tokens, a.prompt_len, dtype, a.K, a.naive_max_batch)
    cols = ["config", "B", "base_only_tok_s", "lockstep_unsteered_tok_s", "routed_fused_tok_s",
            "routed_naive_hooks_tok_s", "paper_tok_s", "routed_vs_unsteered", "fused_vs_naive"]
    print(table(rows, cols))
    write(f"hybrid-{a.config}", dict(env=env_info(), args=vars(a), rows=rows), out)
    return rows


if __name__ == "__main__":
    main()
