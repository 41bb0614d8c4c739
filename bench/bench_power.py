"""Power-sampling benchmark: the official procedure vs our MH (reuse, batched) vs SMC vs plain
batched decoding, with token-forward counts.

    python bench/bench_power.py                      # tiny model on CPU (scaled-down T, B, N)
    python bench/bench_power.py --config qwen2.5-7b --dtype bf16 --T 3072 --block 192 --chains 8 32
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_output_flags, env_info, result_path, show_warnings_once, table, write  # noqa: E402

from hybridfast.baselines import power_official  # noqa: E402
from hybridfast.engine import Engine  # noqa: E402
from hybridfast.errors import ArgumentParser  # noqa: E402
from hybridfast.power import PowerSampler, expected_mh_token_forwards  # noqa: E402
from hybridfast.tiny import bundled_config, model_from_config  # noqa: E402


def main(argv=None):
    ap = ArgumentParser(prog="hybridfast bench-power", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-qwen2",
                    help="bundled model config (random weights; default: %(default)s)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model dtype (default: %(default)s)")
    ap.add_argument("--T", type=int, default=64, help="tokens per sample (default: %(default)s)")
    ap.add_argument("--block", type=int, default=16, help="MH block size (default: %(default)s)")
    ap.add_argument("--n-mcmc", type=int, default=4, help="MH steps per block (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=4.0, help="sample from p^alpha (default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: %(default)s)")
    ap.add_argument("--chains", type=int, nargs="+", default=[8, 32],
                    help="batched chain counts (default: %(default)s)")
    ap.add_argument("--particles", type=int, default=16, help="SMC particles (default: %(default)s)")
    ap.add_argument("--skip-official", action="store_true", help="skip the official procedure (slow)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    add_output_flags(ap)
    a = ap.parse_args(argv)
    out = result_path(ap, a, f"power-{a.config}")
    show_warnings_once()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cfg = bundled_config(a.config)
    model = model_from_config(cfg, seed=0, dtype=dtype, device=dev)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg["vocab_size"], (a.prompt_len,), generator=g).tolist()
    kw = dict(alpha=a.alpha, block_size=a.block, n_mcmc=a.n_mcmc, max_new_tokens=a.T, eos_token_id=-1)
    rows = []

    def record(name, B, problems, seconds, decoded, forwards):
        rows.append(dict(method=name, chains=B, seconds=seconds, s_per_problem=seconds / problems,
                         decoded_tokens=decoded, token_forwards=forwards,
                         decoded_tok_s=decoded / seconds))

    gen = lambda: torch.Generator(device=dev).manual_seed(1)  # noqa: E731

    def timed(fn):
        """Median wall time of ``a.repeats`` runs (after the caller's warm-up), last result."""
        ts, out = [], None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2], out
    if not a.skip_official:
        dt, (_, st) = timed(lambda: power_official(
            model, prompt, alpha=a.alpha, block_size=a.block, n_mcmc=a.n_mcmc, max_new_tokens=a.T,
            eos_token_id=-1, generator=torch.Generator().manual_seed(1)))
        record("official_generate_recompute", 1, 1, dt, st["decoded_tokens"], st["token_forwards"])
    runs = [(1, False, "keep"), (1, True, "keep"), (1, True, "reprefill")]
    runs += [(c, True, rj) for c in a.chains for rj in ("keep", "reprefill")]
    for B, reuse, rj in runs:
        ps = PowerSampler(model, reuse=reuse, reject=rj, **kw)
        ps.sample([prompt], n_chains=B, generator=gen())  # warm-up
        dt, _ = timed(lambda: ps.sample([prompt], n_chains=B, generator=gen()))
        name = "mh_recompute" if not reuse else ("mh_reuse" if rj == "keep" else "mh_reuse_reprefill")
        record(name, B, B, dt, ps.last_stats["decoded_tokens"], ps.last_stats["token_forwards"])
    for B in a.chains:
        eng = Engine(model)
        eng.generate([prompt] * B, a.T, temperature=1 / a.alpha, eos_token_id=-1, generator=gen())
        dt, out = timed(lambda: eng.generate([prompt] * B, a.T, temperature=1 / a.alpha, eos_token_id=-1,
                                             generator=gen()))
        record("plain_decode", B, B, dt, int(out.lengths.sum()), out.token_forwards)
    smc = PowerSampler(model, method="smc", n_particles=a.particles, **kw)
    smc.sample([prompt], generator=gen())
    dt, _ = timed(lambda: smc.sample([prompt], generator=gen()))
    record(f"smc_{a.particles}_particles", a.particles, 1, dt,
           smc.last_stats["decoded_tokens"], smc.last_stats["token_forwards"])
    by = {(r["method"], r["chains"]): r for r in rows}
    ratios = {}
    if ("official_generate_recompute", 1) in by:
        off = by[("official_generate_recompute", 1)]["s_per_problem"]
        for r in rows:
            if r["method"].startswith("mh"):
                ratios[f"{r['method']}_B{r['chains']}_vs_official_per_problem"] = off / r["s_per_problem"]
    for c in a.chains:
        ratios[f"mh_B{c}_per_decoded_token_vs_plain_decode"] = \
            by[("plain_decode", c)]["decoded_tok_s"] / by[("mh_reuse", c)]["decoded_tok_s"]
    for c in [1] + a.chains:
        ratios[f"reject_keep_vs_reprefill_time_B{c}"] = \
            by[("mh_reuse_reprefill", c)]["seconds"] / by[("mh_reuse", c)]["seconds"]
    ratios["reuse_vs_recompute_token_forwards_B1"] = \
        by[("mh_recompute", 1)]["token_forwards"] / by[("mh_reuse", 1)]["token_forwards"]
    expected = dict(reuse=expected_mh_token_forwards(a.T, a.block, a.n_mcmc, a.prompt_len),
                    recompute=expected_mh_token_forwards(a.T, a.block, a.n_mcmc, a.prompt_len, reuse=False))
    print(table(rows, ["method", "chains", "seconds", "s_per_problem", "decoded_tokens",
                       "token_forwards", "decoded_tok_s"]))
    for k, v in ratios.items():
        print(f"{k}: {v:.3g}")
    write(f"power-{a.config}", dict(env=env_info(), args=vars(a), rows=rows, ratios=ratios,
                                    expected_token_forwards_per_chain=expected), out)


if __name__ == "__main__":
    main()
