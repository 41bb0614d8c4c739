"""Eager vs compiled decode steps on a real model (default: the embedded SmolLM2-135M-Instruct),
next to Hugging Face ``generate``: tokens/s of plain, routed, paper, MH and SMC at each batch size,
plus ``lockstep``: the routed computation without the steering op (base step + the thinking
side's truncated router), so ``routed_vs_lockstep`` is the cost of routing and steering alone.

    python bench/bench_compile.py                                   # SmolLM2, CPU, B = 1 8 32
    python bench/bench_compile.py --config qwen2.5-1.5b --batch 1 8 --new-tokens 8   # random weights
    python bench/bench_compile.py --model Qwen/Qwen2.5-1.5B --batch 1 8 32 --dtype bf16   # GPU

One model plays both hybrid sides unless ``--thinking`` names another (random SAE and vectors of
the right shapes: speed does not depend on what they encode). Each timed run follows an untimed one (allocation, compilation);
compile time is reported separately.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_output_flags, env_info, result_path, sync, table, write  # noqa: E402

from hybridfast import HybridModel, PowerSampler  # noqa: E402
from hybridfast.engine import Engine  # noqa: E402
from hybridfast.models import DEFAULT_MODEL, load_model  # noqa: E402
from hybridfast.tiny import bundled_config, model_from_config  # noqa: E402


def timed(fn):
    """(seconds of the first call, seconds of a second call)."""
    t0 = time.perf_counter()
    fn()
    sync()
    t1 = time.perf_counter()
    fn()
    sync()
    return t1 - t0, time.perf_counter() - t1


def runners(model, thinking, compile, K=8):
    cfg = model.config
    n, d = cfg.num_hidden_layers, cfg.hidden_size
    dev, dt = next(model.parameters()).device, next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    dr = thinking.config.hidden_size
    sae = dict(W_enc=torch.randn(dr, K, generator=g).to(dev), b_enc=torch.zeros(K, device=dev),
               b_dec=torch.zeros(dr, device=dev))
    vec = ((torch.randn(K, d, generator=g) * 0.5).to(dev, dt), torch.zeros(d, device=dev, dtype=dt))
    kw = dict(sae_layer=thinking.config.num_hidden_layers // 3, steer_layer=n // 2 - 2, compile=compile)
    return (Engine(model, compile=compile),
            HybridModel(model, thinking, sae, vec, mode="routed", threshold=0.0, **kw),
            HybridModel(model, thinking, sae, vec, coefficients=[0.5, 1.0], **kw))


def run(model, thinking, batches, T, modes, prompt_len=48):
    rows = []
    V = min(model.config.vocab_size, thinking.config.vocab_size)
    g = torch.Generator().manual_seed(1)
    variants = {False: runners(model, thinking, False), True: runners(model, thinking, True)}
    for B in batches:
        prompts = torch.randint(10, V, (B, prompt_len), generator=g).tolist()
        for compiled, (eng, hr, hp) in variants.items():
            power = dict(alpha=4.0, block_size=max(1, T // 4), n_mcmc=2, max_new_tokens=T,
                         eos_token_id=-1, compile=compiled)
            ps = dict(mh=PowerSampler(model, **power),
                      smc=PowerSampler(model, method="smc", n_particles=4, **power))
            fns = dict(plain=lambda: eng.generate(prompts, T, eos_token_id=-1),
                       routed=lambda: hr.generate(prompts, prompts, T, eos_token_id=-1),
                       lockstep=lambda: hr.generate(prompts, prompts, T, eos_token_id=-1, steer=False),
                       paper=lambda: hp.generate(prompts, prompts, T, eos_token_id=-1),
                       mh=lambda: ps["mh"].sample(prompts, generator=torch.Generator().manual_seed(2)),
                       smc=lambda: ps["smc"].sample(prompts, generator=torch.Generator().manual_seed(2)))
            for name in modes:
                first, dt = timed(fns[name])
                # power modes: tokens decoded (proposals, particles), the work per second
                toks = ps[name].last_stats["decoded_tokens"] if name in ps else B * T
                rows.append(dict(B=B, mode=name, compiled=compiled, tok_s=toks / dt,
                                 first_call_s=first, seconds=dt))
                print(rows[-1], flush=True)
        if "hf_generate" not in [r["mode"] for r in rows if r["B"] == B]:
            ids = torch.tensor(prompts, device=next(model.parameters()).device)
            first, dt = timed(lambda: model.generate(ids, max_new_tokens=T, min_new_tokens=T,
                                                     do_sample=False, pad_token_id=0))
            rows.append(dict(B=B, mode="hf_generate", compiled=False, tok_s=B * T / dt, seconds=dt))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--thinking", help="the thinking side (path, id or named default; default: --model)")
    ap.add_argument("--config", help="a bundled config with random weights instead of --model (e.g. qwen2.5-1.5b)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["plain", "lockstep", "routed", "paper", "mh", "smc"])
    ap.add_argument("--dtype", default=None, choices=[None, "fp32", "bf16"])
    add_output_flags(ap)
    a = ap.parse_args(argv)
    out = result_path(ap, a, "compile-" + (a.config or os.path.basename(a.model.rstrip("/")).lower()))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16).get(a.dtype)
    if a.config:
        if a.thinking:
            ap.error("--thinking goes with --model, not --config")
        model = thinking = model_from_config(bundled_config(a.config), dtype=dtype or torch.float32, device=dev)
    else:
        model, _ = load_model(a.model, dtype=dtype, device=dev)
        thinking = load_model(a.thinking, dtype=dtype, device=dev)[0] if a.thinking else model
    with torch.inference_mode():
        rows = run(model, thinking, a.batch, a.new_tokens, a.modes)
    for r in rows:
        base = next((x for x in rows if x["B"] == r["B"] and x["mode"] == "plain"
                     and x["compiled"] == r["compiled"]), None)
        eager = next((x for x in rows if x["B"] == r["B"] and x["mode"] == r["mode"]
                      and not x["compiled"]), None)
        if base:
            r["vs_plain"] = r["tok_s"] / base["tok_s"]
        if eager and r["compiled"]:
            r["compiled_vs_eager"] = r["tok_s"] / eager["tok_s"]
        lock = next((x for x in rows if x["B"] == r["B"] and x["mode"] == "lockstep"
                     and x["compiled"] == r["compiled"]), None)
        if lock and r["mode"] == "routed":
            r["routed_vs_lockstep"] = r["tok_s"] / lock["tok_s"]
    print(table(rows, ["B", "mode", "compiled", "tok_s", "vs_plain", "routed_vs_lockstep",
                       "compiled_vs_eager", "first_call_s"]))
    write(out.stem, dict(env=env_info(), args=vars(a), rows=rows), out)


if __name__ == "__main__":
    main()
