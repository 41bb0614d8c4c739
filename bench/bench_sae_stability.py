"""How much the taxonomy depends on the seed on real traces: the demo's traces (SmolLM2 thinking
side, GSM8K train problems, chat template + step-by-step instruction), sentence activations at
the demo's SAE layer, then :func:`hybridfast.sae.assignment_stability` (SAEs with seeds 0..n-1
on the traces minus a held-out fifth; adjusted Rand index of their categories of the held-out
sentences) for each K and SAE init.

    python bench/bench_sae_stability.py                      # demo settings: 24 problems, K = 4
    python bench/bench_sae_stability.py --problems 24 96 --K 3 4 6 8
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_output_flags, env_info, result_path, show_warnings_once, table, write  # noqa: E402

from hybridfast.activations import sentence_activations  # noqa: E402
from hybridfast.datasets import load_problems  # noqa: E402
from hybridfast.demo import REAL_LAYERS, THINKING_INSTRUCTION  # noqa: E402
from hybridfast.errors import ArgumentParser  # noqa: E402
from hybridfast.models import DEFAULT_MODEL, load_model  # noqa: E402
from hybridfast.sae import INITS, assignment_stability, preprocess  # noqa: E402
from hybridfast.taxonomy import generate_traces  # noqa: E402


def main(argv=None):
    ap = ArgumentParser(prog="bench_sae_stability.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="named model or path (default: %(default)s)")
    ap.add_argument("--problems", type=int, nargs="+", default=[24],
                    help="GSM8K train problems traced, one measurement per count (default: %(default)s, the demo's)")
    ap.add_argument("--trace-tokens", type=int, default=96, help="tokens per trace (default: %(default)s, the demo's)")
    ap.add_argument("--layer", type=int, default=REAL_LAYERS["sae_layer"],
                    help="block whose output the SAE reads (default: %(default)s, the demo's)")
    ap.add_argument("--K", type=int, nargs="+", default=[4], help="numbers of categories (default: %(default)s, "
                    "the demo's)")
    ap.add_argument("--k", type=int, default=3, help="active latents per sentence (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=3, help="SAE seeds compared, 0..n-1 (default: %(default)s)")
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS,
                    help="SAE inits to measure (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=60, help="SAE epochs (default: %(default)s, the demo's)")
    ap.add_argument("--batch-size", type=int, default=64, help="SAE batch size (default: %(default)s, the demo's)")
    add_output_flags(ap)
    a = ap.parse_args(argv)
    out = result_path(ap, a, f"sae-stability-{a.model}")
    show_warnings_once()
    model, tok = load_model(a.model)
    probs = load_problems("gsm8k", "train", limit=max(a.problems))
    traces = generate_traces(model, tok, [p["question"] + THINKING_INSTRUCTION for p in probs],
                             max_new_tokens=a.trace_tokens, batch_size=8)
    X, recs = sentence_activations(model, tok, [t["prompt"] for t in traces], [t["thinking"] for t in traces],
                                   a.layer, batch_size=8)
    trace = torch.tensor([r.trace for r in recs])
    rows = []
    for n in a.problems:
        Xp, _ = preprocess(X[trace < n], trace[trace < n])
        for K in a.K:
            for init in a.inits:
                st = assignment_stability(Xp, K, min(a.k, K), seeds=range(a.seeds), groups=trace[trace < n],
                                          init=init, epochs=a.epochs, batch_size=a.batch_size)
                rows.append(dict(problems=n, sentences=Xp.shape[0], K=K, init=init, mean_ari=st["mean_ari"],
                                 min_ari=st["min_ari"], n_heldout=st["n_heldout"], pairwise=st["pairwise"]))
                print(rows[-1], flush=True)
    print(table(rows, ["problems", "sentences", "K", "init", "mean_ari", "min_ari", "n_heldout"]))
    write(f"sae-stability-{a.model}", dict(env=env_info(), args=vars(a), rows=rows), out)


if __name__ == "__main__":
    main()
