"""``hybridfast demo``: the whole pipeline on the embedded real model, SmolLM2-135M-Instruct, on
CPU in minutes: traces -> taxonomy (SAE, example sentences per category) -> steering vectors ->
hybrid generation (paper and routed) -> power sampling (MH and SMC) -> grading -> report.

One model plays both sides, made to differ the way the papers' pairs do: the *thinking* side reads
the question in its chat template with a step-by-step instruction, the *base* side reads the
plain task prompt without a chat template. ``--tiny`` runs the same pipeline on tiny bundled
random-weight models in seconds (meaningless accuracy; it exercises every code path).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

__all__ = ["main", "run_demo"]


#: what the thinking side is asked to do on top of the question (the base side gets no chat template)
THINKING_INSTRUCTION = "\nLet's think step by step."
#: layers for the real model (30 blocks): the SAE reads the residual after block 10, steering
#: enters block 12
REAL_LAYERS = dict(sae_layer=10, steer_layer=12)
TINY_LAYERS = dict(sae_layer=2, steer_layer=1)


def _setup(model: str, seed: int):
    """``(base, thinking, tokenizer, layers, description)``."""
    if model == "tiny":
        from .tiny import tiny_pair, tiny_tokenizer
        tok = tiny_tokenizer()
        base, think = tiny_pair(tok, seed=seed, layers=4, hidden_size=64)
        return base, think, tok, TINY_LAYERS, "tiny random-weight pair (meaningless accuracy)"
    from .models import load_model
    m, tok = load_model(model)
    return m, m, tok, REAL_LAYERS, (f"{model} as both sides (thinking: chat template + "
                                    f"step-by-step instruction; base: plain task prompt)")


def run_demo(out_dir="runs/demo", n_train=24, n_eval=8, max_new_tokens=160, seed=0, progress=True,
             model="smollm2-135m", trace_tokens=96, vector_epochs=4, vector_examples=64):
    from .datasets import load_problems
    from .metrics import report_markdown, summarize
    from .eval import grade_rows
    from .hybrid import HybridModel
    from .io import load_sae, load_vectors, save_vectors, write_jsonl
    from .power import PowerSampler
    from .prompts import base_prompt, thinking_prompt
    from .report import mh_fields, token_fields, write_views
    from .taxonomy import (build_vector_examples, discover, generate_traces,
                           train_steering_vectors, write_discovery)

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
        base, think, tok, layers, setup_note = _setup(model, seed)
        print(f"   models: {setup_note}", flush=True)
        train = load_problems("gsm8k", "train", limit=n_train)
        evalp = load_problems("gsm8k", "test", limit=n_eval)
    with stage("traces"):
        traces = generate_traces(think, tok, [p["question"] + THINKING_INSTRUCTION for p in train],
                                 max_new_tokens=trace_tokens, batch_size=8, progress=progress)
        write_jsonl(out / "traces.jsonl", traces)
    sae_layer, steer_layer, K = layers["sae_layer"], layers["steer_layer"], 4
    with stage("taxonomy"):
        sae, taxonomy, ann = discover(traces, think, tok, layer=sae_layer, n_latents=K, k=3,
                                      seed=seed, progress=progress,
                                      sae_kwargs=dict(batch_size=64, epochs=60))
        write_discovery(out / "sae", sae, taxonomy, ann, traces, layer=sae_layer, model_id=model)
    with stage("vectors"):
        exs, bias_exs = build_vector_examples(traces, ann, base, tok, K, min_target_words=3,
                                              min_bias_words=5, n_train=vector_examples)
        vec = train_steering_vectors(base, exs, bias_exs, K, steer_layer, epochs=vector_epochs,
                                     batch_size=16,
                                     names=[c["name"] for c in taxonomy["categories"]],
                                     progress=progress, checkpoint_dir=out / "vectors-ckpt",
                                     restart=True)   # every demo run regenerates all its inputs
        save_vectors(out / "vectors", vec, steer_layer=steer_layer, model_id=model)
    sae_p, vec_p = load_sae(out / "sae"), load_vectors(out / "vectors")
    bp = [base_prompt(p["question"]) for p in evalp]
    tp = [thinking_prompt(tok, p["question"] + THINKING_INSTRUCTION) for p in evalp]
    results = []

    def add(method, i, text, ntok, steered_tokens=0, seconds=0.0, **trace):
        results.extend(grade_rows("gsm8k", [evalp[i]], [dict(output=text, tokens=ntok, steered_tokens=steered_tokens,
                                                             **trace)], method, seconds))

    from .engine import Engine
    with stage("baselines"):
        for name, m, prompts in (("base", base, bp), ("thinking", think, tp)):
            ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            g = Engine(m).generate(ids, max_new_tokens, eos_token_id=tok.eos_token_id)
            for i, s in enumerate(g.sequences()):
                add(name, i, tok.decode(s, skip_special_tokens=True), len(s), seconds=g.seconds / len(ids))
    with stage("hybrid"):
        for mode in ("paper", "routed"):
            hm = HybridModel(base, think, sae_p, vec_p, sae_layer=sae_layer, steer_layer=steer_layer,
                             mode=mode, base_tokenizer=tok, thinking_tokenizer=tok,
                             coefficients=None if mode == "paper" else 0.5)
            o = hm.generate(bp, tp, max_new_tokens, eos_token_id=tok.eos_token_id)
            for i, r in enumerate(o.results):
                add(f"hybrid-{mode}", i, r.text, len(r.ids), sum(r.steered), o.seconds / len(bp),
                    **token_fields(r, tok, vec_p.names))
    with stage("power"):
        # power sampling samples the base side: the base prompt, compared with base greedy
        pp = [tok(p, add_special_tokens=False)["input_ids"] for p in bp]
        for method in ("mh", "smc"):
            ps = PowerSampler(base, alpha=4.0, block_size=16, n_mcmc=2, max_new_tokens=max_new_tokens,
                              method=method, n_particles=8, tokenizer=tok, eos_token_id=tok.eos_token_id)
            res = ps.sample(pp, generator=torch.Generator().manual_seed(seed))
            for r in res:
                add(f"power-{method}", r.prompt_index, r.text, len(r.ids),
                    seconds=ps.last_stats["seconds"] / len(pp), **mh_fields(r))
    with stage("report"):
        write_jsonl(out / "results.jsonl", results)
        summary = summarize(results)
        summary["stages_seconds"] = stages
        summary["models"] = setup_note
        summary["layers"] = dict(sae_layer=sae_layer, steer_layer=steer_layer)
        summary["taxonomy_examples"] = {c["name"]: c["top"][:3] for c in taxonomy["categories"]}
        summary["taxonomy"] = dict(metrics=taxonomy["metrics"],
                                   categories=[dict(id=c["id"], name=c["name"], count=c["count"])
                                               for c in taxonomy["categories"]])
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "report.md").write_text(report_markdown(summary) + "\n" + write_views(out, summary, results))
    print(f"report: {out / 'report.md'}  (trace viewer: {out / 'traces.html'})")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="hybridfast demo", description=__doc__)
    ap.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=24,
                    help="GSM8K train problems traced for the taxonomy (default: %(default)s)")
    ap.add_argument("--n-eval", type=int, default=8,
                    help="GSM8K test problems every method answers (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=160,
                    help="answer length for every method (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: %(default)s)")
    ap.add_argument("--model", default="smollm2-135m",
                    help="named model, GGUF file/folder, HF path or hub id (default: %(default)s)")
    ap.add_argument("--tiny", action="store_true", help="tiny random-weight models (seconds)")
    ap.add_argument("--trace-tokens", type=int, default=96,
                    help="length of each thinking trace (default: %(default)s)")
    ap.add_argument("--vector-epochs", type=int, default=4,
                    help="steering-vector training epochs (default: %(default)s)")
    ap.add_argument("--vector-examples", type=int, default=64,
                    help="training examples for the vectors (default: %(default)s)")
    a = ap.parse_args(argv)
    run_demo(a.out, a.n_train, a.n_eval, a.max_new_tokens, a.seed, model="tiny" if a.tiny else a.model,
             trace_tokens=a.trace_tokens, vector_epochs=a.vector_epochs,
             vector_examples=a.vector_examples)
