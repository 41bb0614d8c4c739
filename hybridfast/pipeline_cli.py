"""``hybridfast discover`` and ``hybridfast train-vectors``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .io import read_jsonl, write_jsonl


def _load_models(spec: str, which: str, seed: int, tokenizer: str | None, dtype: str):
    """``tiny`` -> the bundled tiny pair (tokenizer trained on the bundled sample); otherwise
    ``from_pretrained`` on a path or hub id."""
    if spec == "tiny":
        from .tiny import tiny_pair, tiny_tokenizer
        tok = tiny_tokenizer()
        base, think = tiny_pair(tok, seed=seed)
        return (base if which == "base" else think), tok, "tiny-" + which
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dt = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[dtype]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dt).to(dev).eval()
    return model, AutoTokenizer.from_pretrained(tokenizer or spec), spec


def discover_main(argv=None):
    from .datasets import load_problems
    from .taxonomy import discover, generate_traces, write_discovery
    ap = argparse.ArgumentParser(prog="hybridfast discover",
                                 description="traces -> sentence activations -> top-k SAE taxonomy")
    ap.add_argument("--model", default="tiny", help="thinking model: path, hub id, or 'tiny'")
    ap.add_argument("--tokenizer")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--data", default="gsm8k", help="gsm8k | math500 | a JSONL path")
    ap.add_argument("--split", default="train")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--traces", help="reuse a traces.jsonl instead of generating")
    ap.add_argument("--max-new-tokens", type=int, default=1000)
    ap.add_argument("--layers", type=int, nargs="+", default=[2])
    ap.add_argument("--K", type=int, nargs="+", default=[5])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/taxonomy")
    a = ap.parse_args(argv)
    model, tok, mid = _load_models(a.model, "thinking", a.seed, a.tokenizer, a.dtype)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.traces:
        traces = read_jsonl(a.traces)
    else:
        ds = a.data if a.data in ("gsm8k", "math500") else "gsm8k"
        probs = load_problems(ds, a.split, path=None if a.data in ("gsm8k", "math500") else a.data,
                              limit=a.limit)
        traces = generate_traces(model, tok, [p["question"] for p in probs],
                                 max_new_tokens=a.max_new_tokens, progress=True)
    write_jsonl(out / "traces.jsonl", traces)
    sweep = []
    for L in a.layers:
        for K in a.K:
            sae, tax, ann = discover(traces, model, tok, layer=L, n_latents=K, k=min(a.k, K),
                                     seed=a.seed, progress=True)
            folder = write_discovery(out / f"sae-L{L}-K{K}", sae, tax, ann, traces, layer=L, model_id=mid)
            sweep.append(dict(layer=L, K=K, folder=str(folder), **{k: v for k, v in tax["metrics"].items()
                                                                     if k != "counts"}))
            print(json.dumps(sweep[-1]))
    (out / "sweep.json").write_text(json.dumps(sweep, indent=1))
    print(f"taxonomy written to {out}")


def train_vectors_main(argv=None):
    from .io import load_sae, save_vectors
    from .taxonomy import build_vector_examples, read_annotations, train_steering_vectors
    ap = argparse.ArgumentParser(prog="hybridfast train-vectors",
                                 description="bias + K category steering vectors in one batched run")
    ap.add_argument("--base", default="tiny", help="base model: path, hub id, or 'tiny'")
    ap.add_argument("--tokenizer")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--sae", required=True, help="an SAE folder written by `hybridfast discover`")
    ap.add_argument("--traces", help="traces.jsonl (default: next to the SAE folder)")
    ap.add_argument("--steer-layer", type=int, required=True)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=2048)
    ap.add_argument("--min-target-words", type=int, default=7)
    ap.add_argument("--min-bias-words", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/vectors")
    a = ap.parse_args(argv)
    base, tok, mid = _load_models(a.base, "base", a.seed, a.tokenizer, a.dtype)
    sae = load_sae(a.sae)
    tpath = Path(a.traces) if a.traces else Path(a.sae).parent / "traces.jsonl"
    traces = read_jsonl(tpath)
    ann = read_annotations(a.sae)
    tax = json.loads((Path(a.sae) / "taxonomy.json").read_text())
    K = sae.n_latents
    exs, bias_exs = build_vector_examples(traces, ann, base, tok, K, n_train=a.n_train,
                                          min_target_words=a.min_target_words,
                                          min_bias_words=a.min_bias_words, seed=a.seed)
    vec = train_steering_vectors(base, exs, bias_exs, K, a.steer_layer, epochs=a.epochs,
                                 batch_size=a.batch_size, seed=a.seed,
                                 names=[c["name"] for c in tax["categories"]],
                                 checkpoint_dir=Path(a.out) / "checkpoint", progress=True)
    save_vectors(a.out, vec, steer_layer=a.steer_layer, model_id=mid)
    print(f"vectors written to {a.out} ({len(exs)} category examples, {len(bias_exs)} bias examples)")
