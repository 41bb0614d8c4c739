"""``hybridfast serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

Endpoints: POST /v1/completions, POST /v1/chat/completions (``stream: true`` for SSE), GET
/v1/models, GET /health. A request picks its method with the body field ``method`` (the OpenAI
client's ``extra_body``): plain (default), hybrid-paper, hybrid-routed (need --sae and --vectors,
and --thinking unless --model tiny), power-mh, power-smc, power-scalable; plus that method's
settings (top_k, threshold, alpha, block_size, n_mcmc, n_particles, ess_threshold, alpha_ramp,
variant, n_candidates, n_rollouts, horizon, n_proposals, jackknife).

plain and the hybrid methods are continuously batched: a request joins a free row of the
scheduler for its (method, temperature, top_k, threshold) as soon as one frees. Power requests
run one at a time between scheduler rounds, on the same thread, and hold up the others while they
run.
"""
from __future__ import annotations

import argparse

from ..errors import ArgumentParser, UserError, reported
from ..loading import DTYPE_CHOICES, DTYPE_HELP

__all__ = ["main"]


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="hybridfast serve", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="base model: 'tiny', a named model (smollm2-135m), a GGUF file "
                                                    "or folder, a Hugging Face folder or hub id (default: %(default)s)")
    ap.add_argument("--thinking", help="thinking model for the hybrid methods (same forms as --model; default with "
                                       "--model tiny: the tiny thinking model)")
    ap.add_argument("--sae", help="SAE folder (router) for the hybrid methods, from `hybridfast discover`")
    ap.add_argument("--vectors", help="steering-vectors folder for the hybrid methods, from `hybridfast train-vectors`")
    ap.add_argument("--sae-layer", type=int, help="thinking-model block the SAE reads (default: the --sae artifact's)")
    ap.add_argument("--steer-layer", type=int, help="base-model block steered (default: the --vectors artifact's)")
    ap.add_argument("--override-artifact-settings", action="store_true",
                    help="use --sae-layer/--steer-layer or models that differ from what the artifacts record")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    ap.add_argument("--served-model-name", help="the model name clients send (default: the --model value)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    ap.add_argument("--rows", type=int, default=16,
                    help="cache rows per scheduler: requests decoded at once per sampling setting; also the "
                         "largest n (default: %(default)s)")
    ap.add_argument("--max-model-len", type=int, default=2048,
                    help="tokens a request may hold, prompt + completion (cache length per row; default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for "
                                                                "(default: %(default)s)")
    ap.add_argument("--max-queue", type=int, default=256,
                    help="choices held at once, decoding or waiting for a row; more are answered 503 "
                         "(default: %(default)s)")
    ap.add_argument("--max-schedulers", type=int, default=4,
                    help="schedulers (distinct method/temperature/top_k/threshold) kept at once (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling noise, of power requests that give "
                                                        "none, and of --model tiny (default: %(default)s)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return ap


def _check_flags(a) -> None:
    for flag, value in (("--rows", a.rows), ("--max-model-len", a.max_model_len), ("--max-tokens", a.max_tokens),
                        ("--max-queue", a.max_queue), ("--max-schedulers", a.max_schedulers)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if a.max_tokens >= a.max_model_len:
        raise UserError(f"--max-tokens {a.max_tokens} must be below --max-model-len {a.max_model_len} "
                        f"(a prompt needs at least one token)")
    if not 0 <= a.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {a.port}")


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    with reported(a.debug):
        _check_flags(a)
        from .model_set import load_model_set
        models = load_model_set(a.model, thinking=a.thinking, sae=a.sae, vectors=a.vectors, sae_layer=a.sae_layer,
                                steer_layer=a.steer_layer, override=a.override_artifact_settings, dtype=a.dtype,
                                seed=a.seed, name=a.served_model_name)
    import uvicorn

    from .app import create_app
    app = create_app(models, rows=a.rows, max_model_len=a.max_model_len, max_tokens=a.max_tokens,
                     max_queue=a.max_queue, max_schedulers=a.max_schedulers, seed=a.seed)
    print(f"hybridfast serve: {models.name} ({', '.join(models.methods)}) on http://{a.host}:{a.port}/v1", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")
