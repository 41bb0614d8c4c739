"""``hybridfast power-sample``: JSONL in (``id`` + ``prompt`` or ``question``), JSONL out, one line
per finished prompt, appended as it goes; re-running skips finished ids (resumable)."""
from __future__ import annotations

import argparse
import zlib

import torch


def main(argv=None):
    from .eval import ResultsLog
    from .io import read_jsonl
    from .pipeline_cli import _load_models
    from .power import PowerSampler
    from .prompts import power_prompt
    ap = argparse.ArgumentParser(prog="hybridfast power-sample", description=__doc__)
    ap.add_argument("input", help="JSONL with 'prompt' (used as is) or 'question' (templated)")
    ap.add_argument("output")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--block-size", type=int, default=192)
    ap.add_argument("--n-mcmc", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=3072)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--method", default="mh", choices=["mh", "smc"])
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--official", action="store_true", help="the official code's biased procedure")
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch (chains advance together)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rows = read_jsonl(a.input)
    for i, r in enumerate(rows):
        r.setdefault("id", str(i))
        if "prompt" not in r and "question" not in r:
            raise SystemExit(f"{a.input}:{i + 1}: needs a 'prompt' or 'question' field")
    log = ResultsLog(a.output)
    done = {r["id"] for r in log.rows()}
    todo = [r for r in rows if r["id"] not in done]
    model, tok, _ = _load_models(a.model, "base", a.seed, None, a.dtype)
    ps = PowerSampler(model, alpha=a.alpha, block_size=a.block_size, n_mcmc=a.n_mcmc,
                      max_new_tokens=a.max_new_tokens, top_k=a.top_k, method=a.method,
                      n_particles=a.particles, official=a.official, tokenizer=tok)
    from tqdm.auto import tqdm
    for i in tqdm(range(0, len(todo), a.batch), desc="power-sample"):
        chunk = todo[i: i + a.batch]
        prompts = [r.get("prompt") or power_prompt(r["question"]) for r in chunk]
        # seeded from the first id of the batch (deterministic across runs; a resumed run may
        # batch differently, so its samples are valid but not bit-identical to an unbroken run)
        g = torch.Generator(device=ps.m.device).manual_seed(a.seed * 1_000_003 + zlib.crc32(chunk[0]["id"].encode()))
        res = ps.sample(prompts, generator=g)
        log.append([dict(id=r["id"], prompt=p, output=x.text, ids=x.ids, logp=x.logp, logq=x.logq,
                         **{k: v for k, v in x.stats.items() if isinstance(v, (int, float))})
                    for r, p, x in zip(chunk, prompts, res)])
    print(f"{len(todo)} sampled, {len(done)} already done -> {a.output}")
