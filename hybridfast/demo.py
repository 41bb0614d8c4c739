"""``hybridfast demo``: the whole pipeline on tiny bundled random-weight models, on CPU, in a few
minutes: traces -> taxonomy (SAE) -> steering vectors -> hybrid generation (paper and routed) ->
power sampling (MH and SMC) -> grading -> report. Random weights give meaningless accuracy; the
demo exercises every code path and writes every artifact a real run writes.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

__all__ = ["main", "run_demo"]


def wilson(k: int, n: int, z: float = 1.96):
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def gap_recovery(acc_h, acc_b, acc_t):
    if acc_t == acc_b:
        return None
    return max(0.0, (acc_h - min(acc_b, acc_t)) / abs(acc_t - acc_b))


def run_demo(out_dir="runs/demo", n_train=24, n_eval=4, max_new_tokens=48, seed=0, progress=True):
    from .datasets import load_problems
    from .grading import extract_answer, grade
    from .hybrid import HybridModel
    from .io import load_sae, load_vectors
    from .power import PowerSampler
    from .prompts import base_prompt, power_prompt, thinking_prompt
    from .taxonomy import (build_vector_examples, discover, generate_traces, save_steering,
                           train_steering_vectors, write_discovery)
    from .tiny import tiny_pair, tiny_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    stages = {}

    def stage(name):
        class S:
            def __enter__(self):
                self.t = time.perf_counter()
                print(f"== {name}", flush=True)

            def __exit__(self, *a):
                stages[name] = round(time.perf_counter() - self.t, 2)
                print(f"   {name}: {stages[name]} s", flush=True)
        return S()

    with stage("setup"):
        tok = tiny_tokenizer()
        base, think = tiny_pair(tok, seed=seed, layers=4, hidden_size=64)
        train = load_problems("gsm8k", "train", limit=n_train)
        evalp = load_problems("gsm8k", "test", limit=n_eval)
    with stage("traces"):
        traces = generate_traces(think, tok, [p["question"] for p in train],
                                 max_new_tokens=96, batch_size=8, progress=progress)
        (out / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    sae_layer, steer_layer, K = 2, 1, 4
    with stage("taxonomy"):
        sae, taxonomy, ann = discover(traces, think, tok, layer=sae_layer, n_latents=K, k=3,
                                      seed=seed, progress=progress,
                                      sae_kwargs=dict(batch_size=64, epochs=60))
        write_discovery(out / "sae", sae, taxonomy, ann, traces, layer=sae_layer, model_id="tiny-thinking")
    with stage("vectors"):
        exs, bias_exs = build_vector_examples(traces, ann, base, tok, K, min_target_words=3,
                                              min_bias_words=5, n_train=64)
        vec = train_steering_vectors(base, exs, bias_exs, K, steer_layer, epochs=4, batch_size=16,
                                     names=[c["name"] for c in taxonomy["categories"]],
                                     progress=progress, checkpoint_dir=out / "vectors-ckpt")
        save_steering(out / "vectors", vec, steer_layer, model_id="tiny-base")
    sae_p, vec_p = load_sae(out / "sae"), load_vectors(out / "vectors")
    bp = [base_prompt(p["question"]) for p in evalp]
    tp = [thinking_prompt(tok, p["question"]) for p in evalp]
    results = []

    def add(method, i, text, ntok, steered=0, seconds=0.0):
        pred = extract_answer("gsm8k", text)
        results.append(dict(problem=evalp[i]["id"], method=method, output=text, extracted=pred,
                            correct=grade("gsm8k", pred, evalp[i]["gold"]), tokens=ntok,
                            steered_tokens=steered, seconds=seconds))

    from .engine import Engine
    with stage("baselines"):
        for name, m, prompts in (("base", base, bp), ("thinking", think, tp)):
            ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            g = Engine(m).generate(ids, max_new_tokens, eos_token_id=tok.eos_token_id)
            for i, s in enumerate(g.sequences()):
                add(name, i, tok.decode(s, skip_special_tokens=True), len(s), seconds=g.seconds / len(ids))
    hybrid_records = {}
    with stage("hybrid"):
        for mode in ("paper", "routed"):
            hm = HybridModel(base, think, sae_p, vec_p, sae_layer=sae_layer, steer_layer=steer_layer,
                             mode=mode, base_tokenizer=tok, thinking_tokenizer=tok,
                             coefficients=None if mode == "paper" else 0.5)
            o = hm.generate(bp, tp, max_new_tokens, eos_token_id=tok.eos_token_id)
            for i, r in enumerate(o.results):
                add(f"hybrid-{mode}", i, r.text, len(r.ids), sum(r.steered), o.seconds / len(bp))
            hybrid_records[mode] = [dict(ids=r.ids, tokens=[tok.decode([t]) for t in r.ids],
                                         category=r.category, steered=r.steered) for r in o.results]
    with stage("power"):
        pp = [tok(power_prompt(p["question"]), add_special_tokens=False)["input_ids"] for p in evalp]
        for method in ("mh", "smc"):
            ps = PowerSampler(base, alpha=4.0, block_size=16, n_mcmc=2, max_new_tokens=max_new_tokens,
                              method=method, n_particles=8, tokenizer=tok, eos_token_id=tok.eos_token_id)
            res = ps.sample(pp, generator=torch.Generator().manual_seed(seed))
            for r in res:
                add(f"power-{method}", r.prompt_index, r.text, len(r.ids),
                    seconds=ps.last_stats["seconds"] / len(pp))
    with stage("report"):
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        summary = summarize(results)
        summary["stages_seconds"] = stages
        summary["taxonomy"] = dict(metrics=taxonomy["metrics"],
                                   categories=[dict(id=c["id"], name=c["name"], count=c["count"])
                                               for c in taxonomy["categories"]])
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "report.md").write_text(report_markdown(summary))
        from .report import trace_viewer_html
        (out / "traces.html").write_text(trace_viewer_html(hybrid_records, vec_p.names))
    print(f"report: {out / 'report.md'}  (trace viewer: {out / 'traces.html'})")
    return summary


def summarize(results):
    methods = sorted({r["method"] for r in results})
    s = {}
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        k = sum(r["correct"] for r in rs)
        toks = sum(r["tokens"] for r in rs)
        secs = sum(r["seconds"] for r in rs)
        s[m] = dict(n=len(rs), accuracy=k / len(rs), ci95=wilson(k, len(rs)),
                    unparseable=sum(r["extracted"] is None for r in rs),
                    steered_fraction=sum(r["steered_tokens"] / max(1, r["tokens"]) for r in rs) / len(rs),
                    steered_fraction_tokens=sum(r["steered_tokens"] for r in rs) / max(1, toks),
                    tokens=toks, tokens_per_s=toks / secs if secs else None)
    out = dict(methods=s)
    if "base" in s and "thinking" in s:
        out["gap_recovery"] = {m: gap_recovery(s[m]["accuracy"], s["base"]["accuracy"],
                                               s["thinking"]["accuracy"])
                               for m in s if m.startswith("hybrid")}
    return out


def report_markdown(summary) -> str:
    lines = ["# hybridfast run report", "",
             "Random-weight demo models: accuracies are meaningless; the table shows the pipeline works.", "",
             "| method | n | accuracy | 95% CI | unparseable | steered (per-problem) | steered (tokens) | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in summary["methods"].items():
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else ""
        lines.append(f"| {m} | {r['n']} | {r['accuracy']:.3f} | [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] "
                     f"| {r['unparseable']} | {r['steered_fraction']:.3f} | {r['steered_fraction_tokens']:.3f} | {tps} |")
    if summary.get("gap_recovery"):
        lines += ["", "Gap recovery (clipped at 0; undefined when base = thinking): " +
                  ", ".join(f"{k}: {v if v is None else round(v, 3)}" for k, v in summary["gap_recovery"].items())]
    if summary.get("stages_seconds"):
        lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in summary["stages_seconds"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="hybridfast demo", description=__doc__)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--n-eval", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    run_demo(a.out, a.n_train, a.n_eval, a.max_new_tokens, a.seed)
