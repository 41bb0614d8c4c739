"""``hybridfast discover`` and ``hybridfast train-vectors``.

Both write artifacts that record their settings: an SAE folder its layer, model, K, k and
normalisation; a vectors folder its steer layer, model and K. ``hybridfast eval`` takes its
layers from them.

train-vectors checkpoints every epoch into OUT/checkpoint and resumes only a checkpoint of the
same configuration (steer layer, K, every training setting, the examples, the model and dtype); a
checkpoint of another configuration is refused (exit 2) naming what differs, and --restart
discards it and trains from scratch. A refused run leaves OUT as it was.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import ArgumentParser, UserError, reported
from .io import read_jsonl, write_jsonl
from .loading import DTYPE_CHOICES, DTYPE_HELP, dtype_name, load_side

__all__ = ["discover_main", "train_vectors_main"]

_MODEL_FORMS = "'tiny' (bundled random pair), a named model (smollm2-135m), a GGUF file or folder, a Hugging Face " \
               "folder or hub id"


def _discover_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="hybridfast discover", description="traces -> sentence activations -> top-k SAE "
                        "taxonomy; writes OUT/traces.jsonl, OUT/sae-L<layer>-K<K>/ per setting, OUT/sweep.json")
    ap.add_argument("--model", default="tiny", help=f"thinking model: {_MODEL_FORMS} (default: %(default)s)")
    ap.add_argument("--tokenizer", help="tokenizer path or hub id (default: the model's own)")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    ap.add_argument("--data", default="gsm8k", help="gsm8k | math500 | a JSONL path (default: %(default)s)")
    ap.add_argument("--split", default="train", help="dataset split (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=32, help="questions to trace (default: %(default)s)")
    ap.add_argument("--traces", help="reuse a traces.jsonl instead of generating")
    ap.add_argument("--max-new-tokens", type=int, default=1000, help="tokens per trace (default: %(default)s)")
    ap.add_argument("--layers", type=int, nargs="+", default=[2],
                    help="thinking-model blocks whose output the SAE reads (default: %(default)s)")
    ap.add_argument("--K", type=int, nargs="+", default=[5], help="numbers of categories (default: %(default)s)")
    ap.add_argument("--k", type=int, default=3, help="active latents per sentence (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    ap.add_argument("--stability-seeds", type=int, default=3,
                    help="SAEs trained with seeds SEED.. on the traces minus a held-out fifth; the mean and least "
                         "adjusted Rand index of their categories of the held-out sentences go into taxonomy.json "
                         "and sweep.json (1 = same categories whatever the seed); costs that many extra SAE "
                         "trainings per setting; 0 skips (default: %(default)s)")
    ap.add_argument("--out", default="runs/taxonomy", help="output folder (default: %(default)s)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return ap


def _stability_fields(taxonomy: dict) -> dict:
    """The sweep row's view of ``taxonomy["stability"]`` (none when it was skipped)."""
    st = taxonomy.get("stability")
    return dict(mean_ari=st["mean_ari"], min_ari=st["min_ari"]) if st else {}


def discover_main(argv=None):
    from .datasets import load_problems
    from .taxonomy import discover, generate_traces, write_discovery
    from .artifact_settings import load_artifact
    a = _discover_parser().parse_args(argv)
    with reported(a.debug):
        if a.stability_seeds < 0 or a.stability_seeds == 1:
            raise UserError(f"--stability-seeds must be 0 (skip) or >= 2 (seeds to compare), got {a.stability_seeds}")
        traces = load_artifact(read_jsonl, a.traces, "--traces") if a.traces else None
        side = load_side(a.model, "thinking", seed=a.seed, dtype=a.dtype, tokenizer=a.tokenizer)
    model, tok = side.model, side.tokenizer
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if traces is None:
        ds = a.data if a.data in ("gsm8k", "math500") else "gsm8k"
        probs = load_problems(ds, a.split, path=None if a.data in ("gsm8k", "math500") else a.data,
                              limit=a.limit)
        traces = generate_traces(model, tok, [p["question"] for p in probs],
                                 max_new_tokens=a.max_new_tokens, progress=True)
    write_jsonl(out / "traces.jsonl", traces)
    with reported(a.debug):
        if a.stability_seeds and len(traces) < 2:
            raise UserError(f"--stability-seeds {a.stability_seeds} holds out whole traces and needs >= 2, got "
                            f"{len(traces)}; pass --stability-seeds 0 to skip it")
    sweep = []
    for L in a.layers:
        for K in a.K:
            sae, tax, ann = discover(traces, model, tok, layer=L, n_latents=K, k=min(a.k, K),
                                     seed=a.seed, progress=True, stability_seeds=a.stability_seeds)
            folder = write_discovery(out / f"sae-L{L}-K{K}", sae, tax, ann, traces, layer=L, model_id=side.model_id)
            sweep.append(dict(layer=L, K=K, folder=str(folder), **{k: v for k, v in tax["metrics"].items()
                                                                     if k != "counts"},
                              **_stability_fields(tax)))
            print(json.dumps(sweep[-1]))
    (out / "sweep.json").write_text(json.dumps(sweep, indent=1))
    print(f"taxonomy written to {out}")


def _train_vectors_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="hybridfast train-vectors", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="tiny", help=f"base model: {_MODEL_FORMS} (default: %(default)s)")
    ap.add_argument("--tokenizer", help="tokenizer path or hub id (default: the base model's own)")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    ap.add_argument("--sae", required=True, help="an SAE folder written by `hybridfast discover`")
    ap.add_argument("--traces", help="traces.jsonl (default: next to the SAE folder)")
    ap.add_argument("--steer-layer", type=int, required=True, help="base-model block the vectors steer")
    ap.add_argument("--epochs", type=int, default=50, help="training epochs (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per batch (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=2048, help="examples per category (default: %(default)s)")
    ap.add_argument("--min-target-words", type=int, default=7,
                    help="shortest target sentence, in words (default: %(default)s)")
    ap.add_argument("--min-bias-words", type=int, default=20,
                    help="shortest thinking text for a bias example, in words (default: %(default)s)")
    ap.add_argument("--prefix-cache-mib", type=float, default=1024,
                    help="memory for the traces' prefix KV caches kept across epochs, in MiB; prefixes "
                         "beyond it are re-encoded in each batch (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    ap.add_argument("--out", default="runs/vectors",
                    help="vectors folder; its checkpoint/ subfolder makes the run resumable (default: %(default)s)")
    ap.add_argument("--restart", action="store_true",
                    help="discard a checkpoint in OUT instead of resuming it (needed when it has another "
                         "configuration)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return ap


def train_vectors_main(argv=None):
    from .artifact_settings import load_artifact
    from .checkpoints import CheckpointMismatch
    from .io import load_sae, save_vectors
    from .provenance import model_identity
    from .taxonomy import build_vector_examples, read_annotations, train_steering_vectors
    a = _train_vectors_parser().parse_args(argv)
    with reported(a.debug):
        if a.steer_layer < 0:
            raise UserError(f"--steer-layer must be >= 0, got {a.steer_layer}")
        identity = dict(model=model_identity(a.base, "--base"), dtype=dtype_name(a.dtype, a.base),
                        tokenizer=a.tokenizer)
        sae = load_artifact(load_sae, a.sae, "--sae")
        tpath = Path(a.traces) if a.traces else Path(a.sae).parent / "traces.jsonl"
        traces = load_artifact(read_jsonl, tpath, "--traces")
        ann = load_artifact(read_annotations, a.sae, "--sae")
        tax = load_artifact(lambda p: json.loads((Path(p) / "taxonomy.json").read_text()), a.sae, "--sae")
        side = load_side(a.base, "base", seed=a.seed, dtype=a.dtype, tokenizer=a.tokenizer, flag="--base")
        blocks = side.model.config.num_hidden_layers
        if a.steer_layer >= blocks:
            raise UserError(f"--steer-layer {a.steer_layer} is out of range: --base {a.base} has {blocks} blocks "
                            f"(0..{blocks - 1})")
        K = sae.n_latents
        exs, bias_exs = build_vector_examples(traces, ann, side.model, side.tokenizer, K, n_train=a.n_train,
                                              min_target_words=a.min_target_words,
                                              min_bias_words=a.min_bias_words, seed=a.seed)
        try:
            vec = train_steering_vectors(side.model, exs, bias_exs, K, a.steer_layer, epochs=a.epochs,
                                         batch_size=a.batch_size, seed=a.seed,
                                         prefix_cache_bytes=int(a.prefix_cache_mib * 2**20),
                                         names=[c["name"] for c in tax["categories"]],
                                         checkpoint_dir=Path(a.out) / "checkpoint", identity=identity,
                                         restart=a.restart, progress=True)
        except CheckpointMismatch as e:
            raise UserError(f"--out {a.out}: {e}; pass --restart to discard it and train from scratch, or "
                            f"another --out") from None
    save_vectors(a.out, vec, steer_layer=a.steer_layer, model_id=side.model_id)
    print(f"vectors written to {a.out} ({len(exs)} category examples, {len(bias_exs)} bias examples)")
