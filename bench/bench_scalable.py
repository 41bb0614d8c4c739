"""Scalable power sampling vs block-wise MH vs Power-SMC vs plain decoding (temperature 1/alpha),
per problem and per output token: seconds, token-forwards and peak K/V cache bytes, with the
scalable sampler's candidate/proposal/rollout rows reading one shared copy of each prefix
(``prefix_kv="shared"``, cascade attention) or holding their own copies (``"copy"``).

    python bench/bench_scalable.py                                       # SmolLM2-135M, GSM8K prompts, CPU
    python bench/bench_scalable.py --config qwen2.5-1.5b --dtype bf16 --T 64 --horizon 32 \\
        --n-candidates 8 --n-rollouts 8 --problems 8                     # bundled 1.5B config (random weights), GPU
    python bench/bench_scalable.py --smoke                               # tiny random model, seconds

Peak K/V bytes: the scalable sampler reports the cache tensors it holds at once (the batch's
cache plus the candidate/proposal and rollout rows); for MH, SMC and plain decoding the bytes of
the caches they allocate (MH: the chains' cache and the proposal cache; SMC: one row per
particle; plain: one row per problem). On CUDA ``cuda_max_allocated`` is the measured peak of all
allocations during the run (weights included). Each timed run follows an untimed warm-up.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_output_flags, env_info, result_path, show_warnings_once, sync, table, write  # noqa: E402

from hybridfast.engine import Engine  # noqa: E402
from hybridfast.errors import ArgumentParser  # noqa: E402
from hybridfast.model import DecoderModel  # noqa: E402
from hybridfast.models import DEFAULT_MODEL, load_model  # noqa: E402
from hybridfast.power import PowerSampler  # noqa: E402
from hybridfast.scalable import expected_token_forwards  # noqa: E402
from hybridfast.tiny import bundled_config, model_from_config  # noqa: E402

SMOKE = dict(config="tiny-qwen2", problems=2, T=6, prompt_len=8, n_candidates=2, n_rollouts=2, horizon=3,
             n_proposals=3, block=3, n_mcmc=1, particles=4, repeats=1)


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="bench_scalable", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="a named model, GGUF, Hugging Face folder or hub id (default: %(default)s)")
    ap.add_argument("--config", help="a bundled config with random weights instead of --model (e.g. qwen2.5-1.5b)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="model dtype (default: stored dtype; --config: fp32)")
    ap.add_argument("--problems", type=int, default=2,
                    help="problems (GSM8K questions with --model, random prompts with --config; default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=64, help="--config: prompt tokens (default: %(default)s)")
    ap.add_argument("--T", type=int, default=16, help="tokens per answer at most (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=4.0, help="sample from p^alpha (default: %(default)s)")
    ap.add_argument("--n-candidates", type=int, default=4, help="scalable: candidates K (default: %(default)s)")
    ap.add_argument("--n-rollouts", type=int, default=4, help="scalable: rollouts M per candidate (default: %(default)s)")
    ap.add_argument("--horizon", type=int, default=8, help="scalable: rollout tokens H at most (default: %(default)s)")
    ap.add_argument("--n-proposals", type=int, default=8,
                    help="scalable block variant: proposals L per block (default: %(default)s)")
    ap.add_argument("--block", type=int, default=4,
                    help="block size of MH and of the scalable block variant (default: %(default)s)")
    ap.add_argument("--n-mcmc", type=int, default=2, help="MH steps per block (default: %(default)s)")
    ap.add_argument("--particles", type=int, default=8, help="SMC particles per problem (default: %(default)s)")
    ap.add_argument("--variants", nargs="+", default=["token", "block"], choices=["token", "block"],
                    help="scalable variants to run (default: %(default)s)")
    ap.add_argument("--prefix-kv", nargs="+", default=["shared", "copy"], choices=["shared", "copy"],
                    help="how scalable rows read the prefix K/V (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row, median reported (default: %(default)s)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="time the first run too (CPU runs of large models, where a warm-up only doubles the cost)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random model and tiny settings (overrides the flags above): checks the script runs")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add_output_flags(ap)
    return ap


def _model(a):
    """``(model, prompts, eos_token_id, name)``: GSM8K questions in the base task template for a
    real model (its EOS ends answers; SmolLM2-Instruct ends at once after the power template, as
    the demo found), random prompts and no EOS for a bundled config."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16).get(a.dtype)
    if a.config:
        cfg = bundled_config(a.config)
        model = model_from_config(cfg, seed=a.seed, dtype=dtype or torch.float32, device=dev)
        g = torch.Generator().manual_seed(a.seed)
        prompts = torch.randint(3, cfg["vocab_size"], (a.problems, a.prompt_len), generator=g).tolist()
        return model, prompts, -1, a.config
    from hybridfast.datasets import load_problems
    from hybridfast.prompts import base_prompt
    model, tok = load_model(a.model, dtype=dtype, device=dev)
    questions = [p["question"] for p in load_problems("gsm8k", "test", limit=a.problems)]
    prompts = [tok(base_prompt(q), add_special_tokens=False)["input_ids"] for q in questions]
    return model, prompts, tok.eos_token_id, os.path.basename(a.model.rstrip("/")).lower()


def _kv_bytes(m: DecoderModel, rows: int, slots: int) -> int:
    return rows * slots * m.n_layers * 2 * m.n_kv * m.head_dim * m.dtype.itemsize


def _measure(fn, repeats: int, warmup: bool = True):
    """``(median seconds of repeats timed runs after a warm-up, last result, CUDA peak bytes or None)``."""
    if warmup:
        fn()
    times, out = [], None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return sorted(times)[len(times) // 2], out, peak


def run(a) -> tuple[list, dict]:
    model, prompts, eos, name = _model(a)
    m = DecoderModel(model)
    n, S = len(prompts), max(len(p) for p in prompts)
    gen = lambda: torch.Generator().manual_seed(a.seed + 1)  # noqa: E731
    rows = []

    def record(method, seconds, output_tokens, forwards, peak_kv, cuda_peak, **extra):
        rows.append(dict(method=method, problems=n, seconds=seconds, s_per_problem=seconds / n,
                         output_tokens=output_tokens, s_per_output_token=seconds / max(1, output_tokens),
                         token_forwards=forwards, forwards_per_output_token=forwards / max(1, output_tokens),
                         peak_kv_bytes=peak_kv, peak_kv_bytes_per_problem=peak_kv / n, cuda_max_allocated=cuda_peak,
                         **extra))
        print(rows[-1], flush=True)

    eng = Engine(model)
    dt, out, cuda = _measure(lambda: eng.generate(prompts, a.T, temperature=1 / a.alpha, eos_token_id=eos,
                                                   generator=gen()), a.repeats, not a.no_warmup)
    record("plain", dt, int(out.lengths.sum()), out.token_forwards, _kv_bytes(m, n, S + a.T), cuda)
    power = dict(alpha=a.alpha, max_new_tokens=a.T, eos_token_id=eos)
    mh = PowerSampler(model, block_size=a.block, n_mcmc=a.n_mcmc, **power)
    dt, out, cuda = _measure(lambda: mh.sample(prompts, generator=gen()), a.repeats, not a.no_warmup)
    record("mh", dt, sum(len(r.ids) for r in out), mh.last_stats["token_forwards"],
           2 * _kv_bytes(m, n, S + a.T + 1), cuda)
    smc = PowerSampler(model, method="smc", n_particles=a.particles, **power)
    dt, out, cuda = _measure(lambda: smc.sample(prompts, generator=gen()), a.repeats, not a.no_warmup)
    record("smc", dt, sum(len(r.ids) for r in out), smc.last_stats["token_forwards"],
           _kv_bytes(m, n * a.particles, S + a.T + 1), cuda)
    scalable = dict(n_candidates=a.n_candidates, n_rollouts=a.n_rollouts, horizon=a.horizon,
                    n_proposals=a.n_proposals, block_size=a.block)
    for variant in a.variants:
        for prefix_kv in a.prefix_kv:
            ps = PowerSampler(model, method="scalable", variant=variant, prefix_kv=prefix_kv, **scalable, **power)
            dt, out, cuda = _measure(lambda: ps.sample(prompts, generator=gen()), a.repeats, not a.no_warmup)
            st = ps.last_stats
            no_eos = sum(expected_token_forwards(a.T, len(p), variant=variant, **scalable) for p in prompts)
            record(f"scalable-{variant}-{prefix_kv}", dt, st["output_tokens"], st["token_forwards"],
                   st["peak_cache_bytes"], cuda, copied_kv_bytes=st["copied_cache_bytes"],
                   rollout_tokens=st["rollout_tokens"], proposal_tokens=st["proposal_tokens"],
                   expected_token_forwards_without_eos=no_eos)
    by = {r["method"]: r for r in rows}
    ratios = {}
    for variant in a.variants:
        shared, copy = by.get(f"scalable-{variant}-shared"), by.get(f"scalable-{variant}-copy")
        if shared and copy:
            ratios[f"{variant}_copy_vs_shared_peak_kv_bytes"] = copy["peak_kv_bytes"] / shared["peak_kv_bytes"]
            ratios[f"{variant}_copy_vs_shared_copied_kv_bytes"] = copy["copied_kv_bytes"] / shared["copied_kv_bytes"]
            ratios[f"{variant}_copy_vs_shared_seconds"] = copy["seconds"] / shared["seconds"]
        for method in ("mh", "smc", "plain"):
            s = shared or copy
            if s:
                ratios[f"{variant}_vs_{method}_forwards_per_output_token"] = \
                    s["forwards_per_output_token"] / by[method]["forwards_per_output_token"]
                ratios[f"{variant}_vs_{method}_s_per_output_token"] = \
                    s["s_per_output_token"] / by[method]["s_per_output_token"]
    return rows, dict(model=name, ratios=ratios)


def main(argv=None):
    ap = _parser()
    a = ap.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            setattr(a, k, v)
    out = result_path(ap, a, "scalable-" + (a.config or os.path.basename(a.model.rstrip("/")).lower()))
    show_warnings_once()
    with torch.inference_mode():
        rows, info = run(a)
    print(table(rows, ["method", "seconds", "s_per_output_token", "output_tokens", "token_forwards",
                       "forwards_per_output_token", "peak_kv_bytes", "copied_kv_bytes"]))
    for k, v in info["ratios"].items():
        print(f"{k}: {v:.4g}")
    write(out.stem, dict(env=env_info(), args=vars(a), rows=rows, **info), out)


if __name__ == "__main__":
    main()
