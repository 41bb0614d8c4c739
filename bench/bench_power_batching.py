"""MH chains (or SMC particle groups), static vs continuous batching: seconds, decoded tokens/s,
token-forwards and the fraction of decode row-steps spent on rows whose chain had nothing to do.

    python bench/bench_power_batching.py                     # SmolLM2-135M, GSM8K prompts, CPU
    python bench/bench_power_batching.py --config qwen2.5-1.5b --problems 32 --rows 8
    python bench/bench_power_batching.py --method smc --T 160   # SMC: 8 particles per problem
    python bench/bench_power_batching.py --smoke             # seconds (tiny model), checks the script

*Static*: the problems run ``rows`` chains at a time in lockstep rounds, each group until its
slowest chain ends (what ``hybridfast eval --method power-mh`` did first). *Continuous*:
``PowerSampler.sample(..., rows=R)`` keeps ``R`` chains live, steps every row on its own (each
extension or MH step settles when it ends) and admits the next problem into a row as soon as its
chain ends (SMC: ``rows`` particle groups; a group's rows are refilled once all its particles
ended, checked every ``sync_every`` steps). Chains are sampled, so the two schedules draw different (equally valid) chains:
compare rates and counts, not tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_model, env_info, parse_with_smoke, result_path, sync, table, write  # noqa: E402

from hybridfast.datasets import load_problems  # noqa: E402
from hybridfast.models import DEFAULT_MODEL  # noqa: E402
from hybridfast.power import PowerSampler  # noqa: E402
from hybridfast.prompts import BASE_TEMPLATE, base_prompt  # noqa: E402

SMOKE = dict(config="tiny-qwen2", problems=6, rows=2, T=8, block=4)
COUNTS = ("decoded_tokens", "token_forwards", "row_steps", "idle_row_steps", "host_syncs")


def prompts_for(a, model, tok) -> list[list[int]]:
    if tok is None:
        g = torch.Generator().manual_seed(a.seed)
        return torch.randint(3, model.config.vocab_size, (a.problems, a.prompt_len), generator=g).tolist()
    qs = [p["question"] for p in load_problems("gsm8k", limit=a.problems)]
    return [tok(base_prompt(q, BASE_TEMPLATE), add_special_tokens=False)["input_ids"] for q in qs]


def schedule(ps: PowerSampler, prompts, rows: int, continuous: bool, seed: int) -> dict:
    """Counts summed over the run's sample calls, plus seconds."""
    groups = [prompts] if continuous else [prompts[i: i + rows] for i in range(0, len(prompts), rows)]
    counts = dict.fromkeys(COUNTS, 0)
    sync()
    t0 = time.perf_counter()
    for i, group in enumerate(groups):
        ps.sample(group, rows=rows if continuous else None, generator=torch.Generator().manual_seed(seed + i))
        for k in COUNTS:
            counts[k] += ps.last_stats[k]
    sync()
    return dict(seconds=time.perf_counter() - t0, **counts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model path, hub id or named default")
    ap.add_argument("--config", help="a bundled config with random weights instead of --model (no EOS)")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--rows", type=int, default=8, help="chains live at once")
    ap.add_argument("--T", type=int, default=96, help="max new tokens per chain")
    ap.add_argument("--block", type=int, default=24, help="MH block size")
    ap.add_argument("--n-mcmc", type=int, default=2)
    ap.add_argument("--method", default="mh", choices=["mh", "smc"])
    ap.add_argument("--particles", type=int, default=8, help="SMC: particles per problem")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--prompt-len", type=int, default=48, help="--config: random prompt tokens")
    ap.add_argument("--seed", type=int, default=0)
    a = parse_with_smoke(ap, argv, SMOKE)
    name = "power-batching-" + ("smc-" if a.method == "smc" else "")
    out = result_path(ap, a, name + (a.config or os.path.basename(a.model.rstrip("/")).lower()))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, eos = bench_model(a, dev)
    prompts = prompts_for(a, model, tok)
    ps = PowerSampler(model, method=a.method, alpha=a.alpha, block_size=a.block, n_mcmc=a.n_mcmc,
                      n_particles=a.particles, max_new_tokens=a.T, eos_token_id=eos)
    rows = []
    with torch.inference_mode():
        ps.sample(prompts[: a.rows], generator=torch.Generator().manual_seed(a.seed))   # warm-up
        for continuous in (False, True):
            r = schedule(ps, prompts, a.rows, continuous, a.seed)
            rows.append(dict(schedule="continuous" if continuous else "static", rows=a.rows,
                             problems=len(prompts), decoded_tok_s=r["decoded_tokens"] / r["seconds"],
                             idle_fraction=r["idle_row_steps"] / max(1, r["row_steps"]), **r))
            print(rows[-1], flush=True)
    print(table(rows, ["schedule", "rows", "seconds", "decoded_tok_s", "token_forwards", "row_steps",
                       "idle_fraction", "host_syncs"]))
    write(out.stem, dict(env=env_info(), args=vars(a), rows=rows), out)


if __name__ == "__main__":
    main()
