"""What users write today, kept as baselines and as slow references in tests.

* :func:`routed_generate_hooks`: routed-mode steering with ``model.generate`` and Python forward
  hooks that run separate PyTorch ops and route with ``.item()`` (one problem at a time).
* :func:`paper_mode_recompute`: the paper's algorithm recomputing every full sequence at every
  token (O(T^2)); the only path for ``windows`` other than ``(1,)`` (0 = all positions from the
  last prompt position on, ``w`` = the last ``w`` positions).

Both use the ``transformers`` forward (not our engine), so agreement with the engine is a real
cross-check.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from .activations import block_output
from .engine import eos_ids, pad_id

__all__ = ["routed_generate_hooks", "paper_mode_recompute", "steering_hook"]


@contextmanager
def steering_hook(model, layer: int, fn):
    """Forward pre-hook on block ``layer`` replacing its input residual by ``fn(h)``; removed on exit."""
    def pre(mod, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs
    handle = model.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _capture(model, layer: int, store: dict):
    def post(mod, args, out):
        store["x"] = (out[0] if isinstance(out, tuple) else out)[:, -1].detach()
    handle = model.model.layers[layer].register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def routed_generate_hooks(base, thinking, sae, vectors, *, sae_layer, steer_layer, base_prompts,
                          thinking_prompts, coefficients=1.0, threshold=0.0, max_new_tokens=64,
                          eos_token_id=None):
    """Naive routed mode: ``base.generate`` + hooks; returns ``[(ids, categories)]`` per problem."""
    from transformers import DynamicCache
    from .artifacts import as_sae, as_vectors
    sae, vec = as_sae(sae), as_vectors(vectors)
    dev = next(base.parameters()).device
    V = vec.V.to(dev, next(base.parameters()).dtype)
    bias = None if vec.bias is None else vec.bias.to(V)
    coef = torch.as_tensor(coefficients, dtype=torch.float32).reshape(-1)
    if coef.numel() == 1:
        coef = coef.expand(V.shape[0])
    eos = eos_ids(base, eos_token_id)
    out = []
    for pb, pt in zip(base_prompts, thinking_prompts):
        st = {"cache": None, "x": None, "cats": []}

        def run_thinking(mod, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if st["cache"] is None:
                st["cache"] = DynamicCache()
                ids = torch.tensor([pt], device=dev)
            thinking(input_ids=ids, past_key_values=st["cache"], use_cache=True)
            return None

        def steer(h):
            x = st["x"][0].float()
            if sae.x_mean is not None:
                x = x - sae.x_mean.float()
            if sae.normalize:
                x = x / x.norm().clamp_min(1e-12)
            z = (x - sae.b_dec.float()) @ sae.W_enc.float() + sae.b_enc.float()
            c = int(z.argmax().item())
            if z[c].item() > threshold:
                h = h.clone()
                v = V[c] + bias if bias is not None else V[c]
                h[:, -1] = h[:, -1] + float(coef[c]) * v
                st["cats"].append(c)
            else:
                st["cats"].append(-1)
            return h

        h1 = base.model.register_forward_pre_hook(run_thinking, with_kwargs=True)
        try:
            with _capture(thinking, sae_layer, st), steering_hook(base, steer_layer, steer):
                ids = base.generate(torch.tensor([pb], device=dev), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=eos or None,
                                    pad_token_id=pad_id(eos))
        finally:
            h1.remove()
        gen = ids[0, len(pb):].tolist()
        out.append((gen, st["cats"][: len(gen)]))
    return out


@torch.inference_mode()
def paper_mode_recompute(hm, base_prompts, thinking_prompts, max_new_tokens, *, eos_token_id=None):
    """The paper's hybrid generation by full recomputation (see module docstring).

    ``hm`` is a :class:`hybridfast.HybridModel` (its models, SAE, vectors, layers, coefficients,
    threshold and windows are used). Returns a :class:`hybridfast.hybrid.HybridOutput`.
    """
    from .hybrid import HybridOutput, HybridResult
    t0 = time.perf_counter()
    base, thinking = hm.base.hf, hm.thinking.hf
    dev = hm.base.m.device
    sae = hm.sae
    V, bias = hm.V, hm.bias
    eos = set(eos_ids(base, eos_token_id))
    coefs = [float(c) for c in hm.coefs.tolist()]
    results = []
    for pb, pt in zip(base_prompts, thinking_prompts):
        gen, cats, steered, used = [], [], [], []
        for _ in range(max_new_tokens):
            with block_output(thinking, hm.sae_layer) as got:
                ot = thinking(input_ids=torch.tensor([pt + gen], device=dev))
            x = got["h"][0, -1]
            logits_t = ot.logits[0, -1].float()
            z = sae.to(dev).encode(x[None])[0]
            c = int(z.argmax())
            if not float(z[c]) > hm.threshold:
                c = -1
            ids_b = torch.tensor([pb + gen], device=dev)
            base_tok = int(base(input_ids=ids_b).logits[0, -1].argmax())
            think_tok = int(logits_t.argmax())
            tok, st, cf = base_tok, False, 0.0
            if c >= 0 and think_tok != base_tok:
                lpt = torch.log_softmax(logits_t, -1)
                best = None
                vec = V[c] + bias if bias is not None else V[c]
                first = len(pb) - 1
                for w in hm.windows:
                    lo = first if w == 0 else max(first, ids_b.shape[1] - w)
                    for coef in coefs:
                        def add(h, lo=lo, coef=coef):
                            h = h.clone()
                            h[:, lo:] = h[:, lo:] + coef * vec
                            return h
                        with steering_hook(base, hm.steer_layer, add):
                            cand = int(base(input_ids=ids_b).logits[0, -1].argmax())
                        s = float(lpt[cand])
                        if best is None or s > best[0]:
                            best = (s, cand, coef)
                tok, st, cf = best[1], True, best[2]
            gen.append(tok), cats.append(c), steered.append(st), used.append(cf)
            if tok in eos:
                break
        text = hm.tok_b.decode(gen, skip_special_tokens=True) if hm.tok_b is not None else None
        results.append(HybridResult(gen, text, cats, steered, used))
    return HybridOutput(results, time.perf_counter() - t0)


@torch.inference_mode()
def power_official(model, prompt, *, alpha=4.0, block_size=192, n_mcmc=10, max_new_tokens=3072,
                   top_k=50, eos_token_id=None, generator=None):
    """Re-implementation of the official power-sampling procedure, for benchmarks: one problem,
    ``model.generate`` per proposal (prompt + prefix re-encoded every time), top-k 50, current
    suffix truncated to the proposal's length, no Hastings length term. Biased (DESIGN.md 2).

    Returns ``(ids, stats)`` with token-forwards counted as context + new - 1 per call.
    """
    dev = next(model.parameters()).device
    eos = eos_ids(model, eos_token_id)
    g = generator if generator is not None else torch.Generator()    # host-side draws, on its own device
    P = len(prompt)
    fw = decoded = 0

    def gen(prefix, n):
        nonlocal fw, decoded
        ids = torch.tensor([prompt + prefix], device=dev)
        out = model.generate(ids, max_new_tokens=n, do_sample=True, temperature=1.0 / alpha,
                             top_k=top_k, output_logits=True, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=eos or None,
                             pad_token_id=pad_id(eos))
        new = out.sequences[0, ids.shape[1]:].tolist()
        lp = [float(torch.log_softmax(l[0].float(), -1)[t]) for l, t in zip(out.logits, new)]
        lq = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, new)]
        fw += ids.shape[1] + len(new) - 1
        decoded += len(new)
        return new, lp, lq

    cur, lp, lq = [], [], []
    nblocks = -(-max_new_tokens // block_size)
    for k in range(nblocks):
        cap = min((k + 1) * block_size, max_new_tokens)
        new, a, b = gen(cur, cap - len(cur))
        cur, lp, lq = cur + new, lp + a, lq + b
        for _ in range(n_mcmc):
            idx = int(torch.randint(0, len(cur), (1,), generator=g, device=g.device))
            new, a, b = gen(cur[:idx], cap - idx)
            s = idx + len(new)
            log_r = alpha * (sum(a) - sum(lp[idx:s])) + (sum(lq[idx:s]) - sum(b))
            if float(torch.rand(1, generator=g, device=g.device)) < min(1.0, float(torch.tensor(log_r).exp())):
                cur, lp, lq = cur[:idx] + new, lp[:idx] + a, lq[:idx] + b
        if cur and cur[-1] in eos:
            break
    return cur, dict(token_forwards=fw, decoded_tokens=decoded, prompt_len=P)
