"""The taxonomy pipeline: traces -> sentences -> activations -> top-k SAE -> categories -> steering
vectors (DESIGN.md sections 1.1 and 1.2). Lower-level pieces live in ``sentences``,
``activations``, ``sae``, ``steering`` and ``io``.
"""
from __future__ import annotations

import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .activations import sentence_activations
from .artifacts import SteeringVectors
from .checkpoints import claim_checkpoint, digest
from .engine import Engine
from .io import read_jsonl, save_sae, write_jsonl
from .prompts import base_prompt, thinking_prompt
from .sae import assignment_stability, preprocess, taxonomy_metrics, train_topk_sae
from .sentences import extract_thinking
from .steering import VectorExample, train_vectors

__all__ = ["generate_traces", "discover", "build_vector_examples", "train_steering_vectors",
           "vector_training_config", "Annotated", "openai_labeller"]


def generate_traces(model, tokenizer, questions: list[str], *, max_new_tokens: int = 1000,
                    batch_size: int = 16, progress: bool = False) -> list[dict]:
    """Greedy thinking-model responses (chat template) for each question."""
    eng = Engine(model)
    out = []
    it = range(0, len(questions), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="traces")
    for i in it:
        qs = questions[i: i + batch_size]
        prompts = [thinking_prompt(tokenizer, q) for q in qs]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        gen = eng.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        for q, p, s in zip(qs, prompts, gen.sequences()):
            resp = tokenizer.decode(s, skip_special_tokens=False)
            resp = resp.replace(tokenizer.eos_token or "\0", "")
            out.append(dict(question=q, prompt=p, response=resp, thinking=extract_thinking(resp)))
    return out


@dataclass
class Annotated:
    """Sentences of the traces with their SAE category and activation."""
    trace: list          #: trace index per sentence
    index: list          #: sentence index within its trace
    text: list
    start: list          #: char offset in the thinking text
    category: torch.Tensor
    activation: torch.Tensor   #: z[category]


def discover(traces: list[dict], model, tokenizer, *, layer: int, n_latents: int = 5, k: int = 3,
             labeller: Optional[Callable] = None, n_examples: int = 8, seed: int = 0,
             batch_size: int = 8, progress: bool = False, sae_kwargs: Optional[dict] = None,
             stability_seeds: int = 3):
    """Fit the SAE on the traces' sentence activations. Returns ``(sae, taxonomy, annotated)``.

    With ``stability_seeds`` = n >= 2, ``taxonomy["stability"]`` is
    :func:`~hybridfast.sae.assignment_stability` for seeds ``seed .. seed + n - 1`` on held-out
    traces (n more SAE trainings); 0 skips it."""
    if stability_seeds < 0 or stability_seeds == 1:
        raise ValueError(f"stability_seeds must be 0 (skip) or >= 2, got {stability_seeds}")
    thinking = [t["thinking"] for t in traces]
    prefixes = [t["prompt"] for t in traces]
    X, recs = sentence_activations(model, tokenizer, prefixes, thinking, layer, batch_size=batch_size,
                                   progress=progress)
    rid = torch.tensor([r.trace for r in recs])
    Xp, mean = preprocess(X, rid)
    res = train_topk_sae(Xp, n_latents, k, seed=seed, progress=progress, **(sae_kwargs or {}))
    sae = res.sae
    sae.x_mean, sae.normalize_inputs = mean, True
    with torch.no_grad():
        z = sae.pre_acts(Xp)
    cat = z.argmax(-1)
    act = z.gather(1, cat[:, None])[:, 0]
    rng = random.Random(seed)
    cats = []
    for j in range(n_latents):
        idx = (cat == j).nonzero().flatten().tolist()
        top = sorted(idx, key=lambda i: -float(act[i]))[:n_examples]
        rand = rng.sample(idx, min(n_examples, len(idx)))
        entry = dict(id=j, count=len(idx), top=[recs[i].text for i in top],
                     random=[recs[i].text for i in rand])
        entry["name"] = labeller(entry) if labeller else f"idx{j}"
        cats.append(entry)
    taxonomy = dict(layer=layer, n_latents=n_latents, k=k, n_sentences=len(recs),
                    metrics=taxonomy_metrics(sae, Xp), sae_epochs=res.epochs,
                    best_val_fvu=res.best_val_fvu, categories=cats)
    if stability_seeds:
        taxonomy["stability"] = assignment_stability(Xp, n_latents, k, seeds=range(seed, seed + stability_seeds),
                                                     groups=rid, **(sae_kwargs or {}))
    trace_off = [len(p) for p in prefixes]
    ann = Annotated([r.trace for r in recs], [r.index for r in recs], [r.text for r in recs],
                    [r.start - trace_off[r.trace] for r in recs], cat, act)
    return sae, taxonomy, ann


def openai_labeller(base_url: str, model: str, api_key: str | None = None, timeout: float = 60):
    """A labeller calling an OpenAI-compatible chat endpoint the user configures."""
    import urllib.request

    def label(entry: dict) -> str:
        prompt = ("These sentences come from one category of reasoning steps. Give the category a "
                  "short title (at most 5 words).\nTop sentences:\n- " + "\n- ".join(entry["top"]) +
                  "\nRandom sentences:\n- " + "\n- ".join(entry["random"]) + "\nTitle:")
        body = json.dumps(dict(model=model, messages=[dict(role="user", content=prompt)],
                               temperature=0)).encode()
        req = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"].strip()
    return label


@torch.no_grad()
def _target_nll(model, examples, batch_size=16):
    from .steering import collate_examples
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        idx = list(range(i, min(i + batch_size, len(examples))))
        ids, att, _, labels, _ = collate_examples(examples, idx, 0, dev)
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none").sum(1)
        out += (nll / (labels != -100).sum(1)).tolist()
    return out


def build_vector_examples(traces, ann: Annotated, base, base_tokenizer, n_categories: int, *,
                          n_top_activation: int = 10240, n_top_perplexity: int = 2560,
                          n_train: int = 2048, min_target_words: int = 7, min_bias_words: int = 20,
                          seed: int = 0):
    """Training examples per category and for the bias vector (DESIGN.md 1.2)."""
    rng = random.Random(seed)
    tok = base_tokenizer
    by_trace: dict[int, list[int]] = {}
    for i, t in enumerate(ann.trace):
        by_trace.setdefault(t, []).append(i)
    per_cat: dict[int, list] = {c: [] for c in range(n_categories)}
    for t, idxs in by_trace.items():
        idxs = sorted(idxs, key=lambda i: ann.index[i])[:-1]       # every sentence but the last
        task = base_prompt(traces[t]["question"])
        for i in idxs:
            if len(ann.text[i].split()) < min_target_words:
                continue
            prompt = task + traces[t]["thinking"][: ann.start[i]]
            ex = VectorExample(tok(prompt, add_special_tokens=False)["input_ids"],
                               tok(ann.text[i], add_special_tokens=False)["input_ids"],
                               int(ann.category[i]))
            if ex.prompt_ids and ex.target_ids:
                per_cat[ex.category].append((float(ann.activation[i]), ex))
    chosen = []
    for c, items in per_cat.items():
        items = sorted(items, key=lambda x: -x[0])[:n_top_activation]
        exs = [e for _, e in items]
        if len(exs) > n_top_perplexity:
            nll = _target_nll(base, exs)
            exs = [exs[i] for i in sorted(range(len(exs)), key=lambda i: -nll[i])[:n_top_perplexity]]
        rng.shuffle(exs)
        chosen += exs[:n_train]
    bias = []
    for t in traces:
        if len(t["thinking"].split()) >= min_bias_words:
            p = tok(base_prompt(t["question"]), add_special_tokens=False)["input_ids"]
            y = tok(t["thinking"], add_special_tokens=False)["input_ids"]
            if p and y:
                bias.append(VectorExample(p, y, 0))
    return chosen, bias


#: train_vectors arguments that schedule or report the work without changing its result
_SCHEDULING = ("bias", "checkpoint_dir", "progress", "max_epochs_this_call", "share_prefixes",
               "prefix_cache_bytes")


def _examples_digest(examples) -> str:
    return digest([[list(map(int, e.prompt_ids)), list(map(int, e.target_ids)), int(e.category)] for e in examples])


def vector_training_config(base, examples, bias_examples, n_categories: int, steer_layer: int, settings: dict,
                           identity: dict | None = None) -> dict:
    """What decides the vectors :func:`train_steering_vectors` trains: the steer layer, K, the base
    model's width, every :func:`~hybridfast.steering.train_vectors` setting (defaults included),
    digests of both example sets, and the caller's ``identity`` (e.g. the model and its dtype)."""
    params = inspect.signature(train_vectors).parameters
    hyper = {k: settings.get(k, p.default) for k, p in params.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _SCHEDULING}
    return dict(steer_layer=steer_layer, n_categories=n_categories, d=base.config.hidden_size, **hyper,
                examples=_examples_digest(examples), bias_examples=_examples_digest(bias_examples),
                identity=identity or {})


def train_steering_vectors(base, examples, bias_examples, n_categories: int, steer_layer: int, *,
                           names=None, checkpoint_dir=None, identity=None, restart=False, progress=False,
                           **kw) -> SteeringVectors:
    """Bias vector first (frozen afterwards), then all K category vectors in one batched run.
    With ``checkpoint_dir`` the run resumes only a checkpoint of the same
    :func:`vector_training_config` (else :class:`~hybridfast.checkpoints.CheckpointMismatch`);
    ``restart`` discards the checkpoint first."""
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    if ck is not None:
        claim_checkpoint(ck, vector_training_config(base, examples, bias_examples, n_categories, steer_layer, kw,
                                                    identity), restart=restart)
    bias = None
    if bias_examples:
        rb = train_vectors(base, bias_examples, 1, steer_layer, progress=progress,
                           checkpoint_dir=ck / "bias" if ck else None, **kw)
        bias = rb.V[0]
    present = sorted({e.category for e in examples})
    if not examples:
        raise ValueError("no category examples (traces too short or too few sentences)")
    r = train_vectors(base, examples, n_categories, steer_layer, bias=bias, progress=progress,
                      checkpoint_dir=ck / "categories" if ck else None, **kw)
    V = r.V.clone()
    for c in range(n_categories):
        if c not in present:
            V[c] = 0.0           # a category with no examples gets no steering
    return SteeringVectors(V, bias, names)


def write_discovery(folder, sae, taxonomy, ann, traces, *, layer, model_id=None):
    folder = Path(folder)
    save_sae(folder, sae.sae_params(), layer=layer, model_id=model_id, k=sae.k, taxonomy=taxonomy)
    rows = [dict(trace=t, index=i, text=x, start=s, category=int(c), activation=float(a))
            for t, i, x, s, c, a in zip(ann.trace, ann.index, ann.text, ann.start,
                                         ann.category.tolist(), ann.activation.tolist())]
    write_jsonl(folder / "sentences.jsonl", rows)
    return folder


def read_annotations(folder) -> Annotated:
    rows = read_jsonl(Path(folder) / "sentences.jsonl")
    return Annotated([r["trace"] for r in rows], [r["index"] for r in rows], [r["text"] for r in rows],
                     [r["start"] for r in rows], torch.tensor([r["category"] for r in rows]),
                     torch.tensor([r["activation"] for r in rows]))

