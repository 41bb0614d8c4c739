"""The one-command GPU check: kernels vs the reference on CUDA, kernel times, host syncs per
token and tokens/s of every generation mode. Writes one JSON under ``bench/results/``.

    python bench/gpu_check.py --overwrite     # on a machine with a CUDA GPU, < 10 minutes
    python bench/gpu_check.py --smoke         # tiny shapes on any device (CI keeps it running)

Sections (each recorded even when another fails; a failure is a row with its error, and the
script exits 1 if any correctness check failed):

* ``kernels``: ``route_steer`` and ``sample_logprobs`` Triton vs the PyTorch reference over a
  seeded sweep of odd shapes, dtypes and edge cases (NaN rows, ties, all-below-threshold,
  SAE-sized K), with the tolerance rule of :mod:`hybridfast.testing`.
* ``kernel_times``: median microseconds of Triton vs the eager reference vs the reference under
  ``torch.compile``.
* ``generation``: tokens/s of plain decode, routed (fused), routed via naive hooks, paper mode
  and MH power sampling on random-weight bundled configs, eager and with ``compile=True``
  (``--smoke``: the eager backend, to exercise graph capture cheaply), with host syncs per token
  counted by CUDA's sync debug mode; power sampling and seeded decoding are driven by a CPU
  generator.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
# this checkout's hybridfast, installed or not (a bare GPU machine runs the copied working tree)
sys.path.insert(1, os.path.dirname(BENCH))
from common import add_output_flags, count_syncs, env_info, result_path, table, write  # noqa: E402

import hybridfast.ops as ops  # noqa: E402
from hybridfast.ops.reference import inv_temperature, route_steer_ref, sample_logprobs_ref  # noqa: E402
from hybridfast.ops.rng import gumbel_noise  # noqa: E402
from hybridfast.testing import FLOOR, LOGPROB_ATOL, TIE_RTOL  # noqa: E402

DT = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)


def guarded(rows: list, base: dict, fn):
    """Run ``fn() -> dict`` and append ``base | result``; an exception becomes an error row."""
    try:
        rows.append({**base, **fn()})
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the check goes on
        rows.append({**base, "ok": False, "error": f"{type(e).__name__}: {e}"[:400],
                     "where": traceback.format_exc().strip().splitlines()[-3][:200]})


# ----------------------------------------------------------------------------- correctness

def route_case(g, B, d, K, C, hdt, dev, *, nan_row=False, ties=False, below=False):
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    W = r(d, K) / math.sqrt(d)
    if ties:
        W[:, 1] = W[:, 0]
    p = dict(h=r(B, d).to(hdt), x=r(B, d), W_enc=W, b_enc=r(K) * 0.1, b_dec=r(d) * 0.1,
             V=r(K, d).to(hdt), coef=torch.rand(K, generator=g), bias=r(d).to(hdt),
             x_mean=r(d) * 0.1)
    if nan_row:
        p["x"][B // 2, 0] = float("nan")
    kw = dict(normalize=bool(K % 2), threshold=1e9 if below else 0.0)
    if C:
        p["coefs"] = torch.rand(C, generator=g)
        p["coef"] = None
    return {k: (v.to(dev) if v is not None else None) for k, v in p.items()}, kw


def check_route(g, dev, B, d, K, C, dtype, **edge):
    p, kw = route_case(g, B, d, K, C, DT[dtype], dev, **edge)
    args = [p[k] for k in ("h", "x", "W_enc", "b_enc", "b_dec", "V", "coef")]
    extra = dict(bias=p["bias"], x_mean=p["x_mean"], coefs=p.get("coefs"), **kw)
    out, cat = ops.route_steer(*args, **extra, impl="triton", check_nan=False)
    ref, rcat = route_steer_ref(*args, extra["bias"], extra["x_mean"], kw["normalize"],
                                kw["threshold"], extra["coefs"], check_nan=False)
    d64 = [a.double() if a is not None else None for a in args]
    tru, tcat = route_steer_ref(*d64, *(t.double() if t is not None else None
                                        for t in (extra["bias"], extra["x_mean"])),
                                kw["normalize"], kw["threshold"],
                                extra["coefs"].double() if extra["coefs"] is not None else None,
                                check_nan=False)
    nan_rows = torch.isnan(p["x"]).any(1)
    # categories: exact except at near-ties of the float64 scores; NaN rows must be -2
    cat_ok = bool(((cat == rcat) | (cat == tcat)).logical_or(nan_rows).all())
    nan_ok = bool((cat[nan_rows] == -2).all())
    same = (cat == tcat).cpu()
    o, r, t = out.double().cpu(), ref.double().cpu(), tru.cpu()
    rows_ok = ~nan_rows.cpu()
    if C:
        same, rows_ok = same[:, None].expand(B, C), rows_ok[:, None].expand(B, C)
    m = (same & rows_ok)[..., None].expand_as(t)
    err_k = (o - t).abs()[m]
    allowed = (2 * (r - t).abs() + FLOOR[DT[dtype]] * (1 + t.abs()))[m]
    h_nan = p["h"][nan_rows]                     # NaN router rows must be left unsteered
    nan_h_ok = bool(torch.equal(out[nan_rows], h_nan[:, None].expand_as(out[nan_rows]) if C else h_nan))
    ok = cat_ok and nan_ok and nan_h_ok and bool((err_k <= allowed).all())
    return dict(ok=ok, max_err=float(err_k.max()) if err_k.numel() else 0.0,
                err_over_allowed=float((err_k / allowed).max()) if err_k.numel() else 0.0,
                cat_match=float((cat == rcat).float().mean()), nan_rows_ok=nan_ok and nan_h_ok)


def check_sample(g, dev, B, V, T, top_k, dtype, *, nan_row=False, ties=False):
    logits = torch.randn(B, V, generator=g) * 3
    if ties:
        logits[:, 1::2] = logits[:, 0::2][:, : logits[:, 1::2].shape[1]]
    if nan_row:
        logits[B // 2, V // 3] = float("nan")
    logits = logits.to(DT[dtype]).to(dev)
    seed = torch.randint(0, 2**31 - 1, (1,), generator=g).to(dev)
    tok, lp, lq = ops.sample_logprobs(logits, T, top_k=top_k, seed=seed, impl="triton",
                                      check_nan=False)
    rtok, rlp, rlq = sample_logprobs_ref(logits, T, seed, top_k=top_k, check_nan=False)
    nan_rows = torch.isnan(logits).any(1)
    ok_nan = bool((tok[nan_rows] == -1).all())
    good = ~nan_rows
    lg = logits.float()
    score = lg if T == 0 else lg * inv_temperature(T) + gumbel_noise(seed, B, V, dev)
    if top_k is not None and top_k < V and T != 0:
        score = score.masked_fill(lg < torch.topk(lg, top_k, -1).values[:, -1:], -math.inf)
    a = score.gather(1, tok.clamp_min(0)[:, None])[:, 0].double()
    b = score.gather(1, rtok[:, None])[:, 0].double()
    tie_ok = (tok == rtok) | ((a - b).abs() <= TIE_RTOL * (1 + b.abs()))
    tok_ok = bool(tie_ok[good].all())
    same = (tok == rtok) & good
    tol = LOGPROB_ATOL + 1e-5 * rlp.abs()
    lp_ok = bool(((lp - rlp).abs() <= tol)[same].all())
    lq_ok = bool(((lq - rlq).abs() <= LOGPROB_ATOL + 1e-5 * rlq.abs())[same].all())
    finite_q = bool(torch.isfinite(lq[good]).all()) or T == 0
    return dict(ok=ok_nan and tok_ok and lp_ok and lq_ok and finite_q,
                token_match=float((tok == rtok)[good].float().mean()),
                max_logp_err=float((lp - rlp).abs()[same].max()) if same.any() else 0.0,
                max_logq_err=float((lq - rlq).abs()[same].max()) if same.any() else 0.0,
                nan_rows_ok=ok_nan)


def kernel_sweep(dev, smoke: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    if smoke:
        rcases = [(3, 64, 5, 0, "fp32"), (2, 48, 7, 3, "bf16")]
        scases = [(3, 96, 0.7, None, "fp32"), (2, 300, 0.25, 5, "bf16")]
    else:
        rcases = [(B, d, K, C, dt) for B, d, K, C, dt in [
            (1, 1536, 15, 0, "bf16"), (2, 1536, 15, 10, "bf16"), (3, 576, 5, 0, "fp32"),
            (8, 3584, 50, 0, "bf16"), (8, 3584, 50, 10, "bf16"), (33, 5120, 15, 0, "fp16"),
            (64, 1536, 50, 3, "fp32"), (256, 3584, 15, 0, "bf16"), (7, 1000, 1000, 0, "bf16"),
            (4, 2304, 16384, 0, "bf16"), (8, 3584, 16384, 0, "bf16"), (2, 4096, 65536, 0, "bf16"),
            (1, 4096, 131072, 0, "bf16"), (1, 65, 3, 0, "fp16")]]
        scases = [(B, V, T, k, dt) for B, V, T, k, dt in [
            (1, 151936, 0.25, None, "bf16"), (1, 152064, 1.0, None, "fp32"), (2, 49152, 0.25, None, "bf16"),
            (8, 151936, 0.25, 50, "bf16"), (8, 152064, 0.0, None, "bf16"), (32, 49152, 1.0, None, "fp16"),
            (64, 151936, 0.25, None, "bf16"), (256, 152064, 0.25, None, "bf16"), (3, 96, 0.7, None, "fp32"),
            (5, 2047, 0.5, 7, "fp32"), (33, 5000, 0.25, None, "bf16"), (1, 1, 1.0, None, "fp32")]]
    for B, d, K, C, dt in rcases:
        base = dict(op="route_steer", B=B, d=d, K=K, C=C, dtype=dt)
        guarded(rows, base, lambda: check_route(g, dev, B, d, K, C, dt))
    for edge in ("nan_row", "ties", "below"):
        B, d, K = (5, 64, 6) if smoke else (9, 1536, 15)
        guarded(rows, dict(op="route_steer", B=B, d=d, K=K, C=0, dtype="bf16", edge=edge),
                lambda: check_route(g, dev, B, d, K, 0, "bf16", **{edge: True}))
    for B, V, T, k, dt in scases:
        base = dict(op="sample_logprobs", B=B, V=V, T=T, top_k=k, dtype=dt)
        guarded(rows, base, lambda: check_sample(g, dev, B, V, T, k, dt))
    for edge in ("nan_row", "ties"):
        B, V = (4, 300) if smoke else (8, 151936)
        guarded(rows, dict(op="sample_logprobs", B=B, V=V, T=0.25, dtype="bf16", edge=edge),
                lambda: check_sample(g, dev, B, V, 0.25, None, "bf16", **{edge: True}))
    return rows


# ----------------------------------------------------------------------------- kernel times

def median_us(fn, reps: int = 50) -> float:
    if torch.cuda.is_available():
        import triton.testing
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    from common import time_us
    return time_us(fn, max_iters=reps)


def kernel_times(dev, smoke: bool):
    rows = []
    g = torch.Generator().manual_seed(1)
    rshapes = [(1, 64, 5)] if smoke else [(1, 1536, 15), (8, 3584, 50), (64, 3584, 50),
                                          (8, 2304, 16384), (1, 4096, 131072)]
    for B, d, K in rshapes:
        def one(B=B, d=d, K=K):
            p, kw = route_case(g, B, d, K, 0, torch.bfloat16, dev)
            args = [p[k] for k in ("h", "x", "W_enc", "b_enc", "b_dec", "V", "coef")]
            ref = lambda *a: route_steer_ref(*a, p["bias"], p["x_mean"], kw["normalize"],  # noqa: E731
                                             kw["threshold"], None, check_nan=False)
            comp = torch.compile(ref, dynamic=False)
            r = dict(triton_us=median_us(lambda: ops.route_steer(*args, bias=p["bias"],
                     x_mean=p["x_mean"], **kw, impl="triton", check_nan=False)),
                     ref_eager_us=median_us(lambda: ref(*args)))
            try:
                r["ref_compiled_us"] = median_us(lambda: comp(*args))
            except Exception as e:  # noqa: BLE001
                r["ref_compiled_error"] = f"{type(e).__name__}: {e}"[:200]
            r["vs_eager"] = r["ref_eager_us"] / r["triton_us"]
            if "ref_compiled_us" in r:
                r["vs_compiled"] = r["ref_compiled_us"] / r["triton_us"]
            return r
        guarded(rows, dict(op="route_steer", B=B, d=d, K=K, dtype="bf16"), one)
    sshapes = [(2, 96, 0.5)] if smoke else [(1, 151936, 0.25), (8, 151936, 0.25), (64, 151936, 0.25),
                                            (256, 152064, 0.25), (1, 49152, 1.0), (32, 49152, 0.25)]
    for B, V, T in sshapes:
        def one(B=B, V=V, T=T):
            logits = (torch.randn(B, V, generator=g) * 3).to(dev, torch.bfloat16)
            seed = torch.tensor([3], device=dev)
            ref = lambda lg, s: sample_logprobs_ref(lg, T, s, check_nan=False)  # noqa: E731
            comp = torch.compile(ref, dynamic=False)
            r = dict(triton_us=median_us(lambda: ops.sample_logprobs(logits, T, seed=seed, impl="triton",
                                                                     check_nan=False)),
                     ref_eager_us=median_us(lambda: ref(logits, seed)))
            try:
                r["ref_compiled_us"] = median_us(lambda: comp(logits, seed))
            except Exception as e:  # noqa: BLE001
                r["ref_compiled_error"] = f"{type(e).__name__}: {e}"[:200]
            r["vs_eager"] = r["ref_eager_us"] / r["triton_us"]
            if "ref_compiled_us" in r:
                r["vs_compiled"] = r["ref_compiled_us"] / r["triton_us"]
            bytes_ = B * V * 2
            r["GB_s"] = bytes_ / (r["triton_us"] * 1e3)
            return r
        guarded(rows, dict(op="sample_logprobs", B=B, V=V, T=T, dtype="bf16"), one)
    return rows


# ----------------------------------------------------------------------------- generation

def timed(fn):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, syncs = count_syncs(fn)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, syncs


def generation(dev, config: str, batches, new_tokens: int, prompt_len: int, budget_s: float,
               naive_max_batch: int = 8, K: int = 15, compile=True, on_row=None):
    """Rows of tokens/s per (batch, mode); ``on_row(rows)`` is called after each one (the
    caller saves partial results: a run cut short still leaves what it measured)."""
    from hybridfast import HybridModel, PowerSampler
    from hybridfast.baselines import routed_generate_hooks
    from hybridfast.engine import Engine
    from hybridfast.tiny import bundled_config, model_from_config
    t_start = time.perf_counter()
    cfg = bundled_config(config)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    base = model_from_config(cfg, seed=0, dtype=dtype, device=dev)
    think = model_from_config(cfg, seed=1, dtype=dtype, device=dev)
    n, d, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)
    sae = dict(W_enc=torch.randn(d, K, generator=g).to(dev), b_enc=torch.zeros(K).to(dev),
               b_dec=torch.zeros(d).to(dev))
    vec = ((torch.randn(K, d, generator=g) * 0.05).to(dev, dtype),
           (torch.randn(d, generator=g) * 0.01).to(dev, dtype))
    coefs = torch.rand(K, generator=g).tolist()
    kw = dict(sae_layer=n // 2, steer_layer=n // 3)
    pkw = dict(alpha=4.0, block_size=max(1, new_tokens // 4), n_mcmc=2, max_new_tokens=new_tokens,
               eos_token_id=-1)

    def build(c):
        return (Engine(base, compile=c),
                HybridModel(base, think, sae, vec, mode="routed", coefficients=coefs, threshold=0.0,
                            compile=c, **kw),
                HybridModel(base, think, sae, vec, coefficients=[0.25, 0.5, 1.0], compile=c, **kw),
                PowerSampler(base, compile=c, **pkw))
    eng, hr, hp, ps = build(False)
    engc, hrc, hpc, psc = build(compile)
    engf = Engine(base, compile=compile, attention="flex")
    hrf = HybridModel(base, think, sae, vec, mode="routed", coefficients=coefs, threshold=0.0,
                      compile=compile, attention="flex", **kw)
    rows = []
    for B in batches:
        prompts = torch.randint(3, V, (B, prompt_len), generator=g).tolist()
        tprompts = torch.randint(3, V, (B, prompt_len + 3), generator=g).tolist()
        cpu_gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731 - CPU generator, CUDA model
        modes = {
            "plain": lambda: eng.generate(prompts, new_tokens, eos_token_id=-1),
            "plain_sampled": lambda: eng.generate(prompts, new_tokens, eos_token_id=-1, temperature=0.7,
                                                  generator=cpu_gen()),
            "routed": lambda: hr.generate(prompts, tprompts, new_tokens, eos_token_id=-1),
            "lockstep_unsteered": lambda: hr.generate(prompts, tprompts, new_tokens, eos_token_id=-1,
                                                      steer=False),
            "paper": lambda: hp.generate(prompts, tprompts, new_tokens, eos_token_id=-1),
            "mh": lambda: ps.sample(prompts, generator=cpu_gen()),
            # asynchronous per-row MH steps (continuous batching; every chain has a row)
            "mh_rows": lambda: ps.sample(prompts, rows=B, generator=cpu_gen()),
            # compiled steps (the first, untimed call compiles; CUDA: replayed as CUDA graphs)
            "plain_compiled": lambda: engc.generate(prompts, new_tokens, eos_token_id=-1),
            "routed_compiled": lambda: hrc.generate(prompts, tprompts, new_tokens, eos_token_id=-1),
            "paper_compiled": lambda: hpc.generate(prompts, tprompts, new_tokens, eos_token_id=-1),
            "mh_compiled": lambda: psc.sample(prompts, generator=cpu_gen()),
            # FlexAttention (block mask) instead of SDPA with a dense additive mask
            "plain_compiled_flex": lambda: engf.generate(prompts, new_tokens, eos_token_id=-1),
            "routed_compiled_flex": lambda: hrf.generate(prompts, tprompts, new_tokens, eos_token_id=-1),
        }
        if B <= naive_max_batch:
            modes["routed_naive_hooks"] = lambda: routed_generate_hooks(
                base, think, sae, vec, base_prompts=prompts, thinking_prompts=tprompts,
                coefficients=coefs, threshold=0.0, max_new_tokens=new_tokens, eos_token_id=-1, **kw)
        for name, fn in modes.items():
            if time.perf_counter() - t_start > budget_s:
                rows.append(dict(config=config, B=B, mode=name, skipped="time budget"))
                continue

            def one(fn=fn, name=name):
                out, dt, syncs = timed(fn)
                r = dict(tok_s=B * new_tokens / dt, seconds=dt)
                if name.startswith("mh"):
                    st = (psc if name == "mh_compiled" else ps).last_stats
                    r["decoded_tok_s"] = st["decoded_tokens"] / dt
                    r["token_forwards"] = st["token_forwards"]
                    r["tok_s"] = st["decoded_tokens"] / dt
                    r["host_syncs"], r["idle_row_steps"] = st["host_syncs"], st["idle_row_steps"]
                    tokens = st["decoded_tokens"]
                else:
                    tokens = B * new_tokens
                if syncs is not None:
                    r["syncs"] = syncs
                    r["syncs_per_token"] = syncs / tokens
                return r
            guarded(rows, dict(config=config, B=B, mode=name, new_tokens=new_tokens), one)
            if on_row is not None:
                on_row(rows)
    return rows


def ratios(rows):
    """Per (config, B): routed/plain and paper/plain (eager and compiled), compiled/eager and
    fused routed/naive hooks, from the generation rows' tokens/s."""
    out = []
    keys = sorted({(r["config"], r.get("B")) for r in rows if "tok_s" in r}, key=str)
    pairs = dict(routed_vs_plain=("routed", "plain"), paper_vs_plain=("paper", "plain"),
                 routed_vs_plain_compiled=("routed_compiled", "plain_compiled"),
                 paper_vs_plain_compiled=("paper_compiled", "plain_compiled"),
                 plain_compiled_vs_eager=("plain_compiled", "plain"),
                 routed_compiled_vs_eager=("routed_compiled", "routed"),
                 mh_compiled_vs_eager=("mh_compiled", "mh"),
                 mh_rows_vs_lockstep=("mh_rows", "mh"),
                 routed_vs_naive_hooks=("routed", "routed_naive_hooks"),
                 flex_vs_sdpa_compiled=("plain_compiled_flex", "plain_compiled"))
    for config, B in keys:
        tps = {r["mode"]: r["tok_s"] for r in rows if r["config"] == config and r.get("B") == B
               and "tok_s" in r}
        row = dict(config=config, B=B)
        row.update({k: tps[a] / tps[b] for k, (a, b) in pairs.items() if a in tps and b in tps})
        out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device (minutes on CPU)")
    ap.add_argument("--configs", nargs="+", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting generation runs after this")
    add_output_flags(ap)
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("gpu_check: no CUDA device; run with TRITON_INTERPRET=1 --smoke on CPU")
    # where the results go, decided (and a refused --out reported) before any time is spent
    gpu = torch.cuda.get_device_name(0).replace(" ", "-").lower() if dev == "cuda" else "cpu"
    path = result_path(ap, a, "gpu-check-smoke" if a.smoke else f"gpu-check-{gpu}")
    paths = [path] + ([os.path.join(os.environ["OUT"], path.name)] if os.environ.get("OUT") else [])
    t0 = time.perf_counter()
    configs = a.configs or (["tiny-qwen2"] if a.smoke else ["qwen2.5-1.5b", "qwen2.5-7b"])
    batches = a.batch or ([1, 3] if a.smoke else [1, 8, 32, 64])
    new_tokens = a.new_tokens or (8 if a.smoke else 64)
    payload = dict(env=env_info(), smoke=a.smoke, kernels=[], kernel_times=[], generation=[])

    def save(final: bool = False):
        """Write the results so far (``partial`` until the end) to every destination."""
        payload["ratios"] = ratios(payload["generation"])
        payload["failed_checks"] = sum(not r.get("ok", True) for r in payload["kernels"])
        payload["errors"] = sum("error" in r for sec in ("kernels", "kernel_times", "generation")
                                for r in payload[sec])
        payload["seconds"] = time.perf_counter() - t0
        payload["partial"] = not final
        for p in paths:
            write(path.stem, payload, p, quiet=not final)

    save()
    payload["kernels"] = kernel_sweep(dev, a.smoke)
    save()
    payload["kernel_times"] = kernel_times(dev, a.smoke)
    save()
    gen_rows = []

    def on_row(rows):
        payload["generation"] = [r for x in gen_rows for r in (x.get("rows") or [x])] + rows
        save()
    for i, c in enumerate(configs):
        left = a.budget_s - (time.perf_counter() - t0)
        guarded(gen_rows, dict(config=c, mode="load"), lambda: dict(rows=generation(
            dev, c, batches, new_tokens, 32, left / (len(configs) - i),
            compile={"backend": "eager"} if a.smoke else True, on_row=on_row)))
        payload["generation"] = [r for x in gen_rows for r in (x.get("rows") or [x])]
        save()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()     # the config's models are gone with generation()'s frame
    save(final=True)
    print(table(payload["kernels"], ["op", "B", "d", "K", "C", "V", "T", "top_k", "dtype", "edge", "ok",
                                     "err_over_allowed", "cat_match", "token_match", "error"]))
    print(table(payload["kernel_times"], ["op", "B", "d", "K", "V", "triton_us", "ref_eager_us",
                                          "ref_compiled_us", "vs_eager", "vs_compiled", "GB_s", "error"]))
    print(table(payload["generation"], ["config", "B", "mode", "tok_s", "syncs_per_token",
                                        "token_forwards", "skipped", "error"]))
    print(table(payload["ratios"], ["config", "B", "routed_vs_plain_compiled", "paper_vs_plain_compiled",
                                    "plain_compiled_vs_eager", "flex_vs_sdpa_compiled",
                                    "routed_vs_naive_hooks"]))
    print(f"failed checks: {payload['failed_checks']}, errors: {payload['errors']}, "
          f"{payload['seconds']:.0f} s")
    return 1 if payload["failed_checks"] or payload["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
