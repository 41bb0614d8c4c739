"""Evaluation runs: every method is a generator of answers; results are appended per problem to
``RUN_DIR/results.jsonl`` as they are produced (flushed and fsynced), so a killed run resumes
where it stopped: finished (problem, method) pairs are skipped and a torn last line is repaired.

    hybridfast eval --method base --data gsm8k --limit 50 --out runs/eval
    hybridfast report runs/eval
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .datasets import load_problems
from .io import read_jsonl
from .grading import extract_answer, grade
from .metrics import summarize

__all__ = ["ResultsLog", "run_eval", "summarize", "main", "report_main", "METHODS"]

METHODS = ("base", "thinking", "low-temp", "hybrid-paper", "hybrid-routed", "power-mh", "power-smc",
           "power-hybrid")


class ResultsLog:
    """Append-only JSONL of per-problem results with crash-safe resume."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = self._repair()

    def _repair(self) -> bool:
        """Drop a torn (newline-less) last line left by a kill mid-write."""
        if not self.path.exists():
            return False
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return False
        cut = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(cut)
        return True

    def rows(self) -> list[dict]:
        return read_jsonl(self.path) if self.path.exists() else []

    def done(self) -> set:
        return {(r["problem"], r["method"]) for r in self.rows()}

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _models(spec: str, seed: int, thinking: str | None = None):
    """``tiny`` -> the bundled pair; otherwise ``spec`` is the base model and ``thinking`` the
    thinking model (paths or hub ids; the thinking model is loaded only when given)."""
    from .pipeline_cli import _load_models
    base, tok, _ = _load_models(spec, "base", seed, None, "bf16")
    if spec == "tiny":
        think, _, _ = _load_models(spec, "thinking", seed, None, "bf16")
    else:
        think = _load_models(thinking, "thinking", seed, None, "bf16")[0] if thinking else None
    return base, think, tok


def make_method(name: str, base, think, tok, *, max_new_tokens: int, sae=None, vectors=None,
                sae_layer: int = 2, steer_layer: int = 1, seed: int = 0, base_template=None):
    """A callable ``problems -> [dict(output, tokens, steered_tokens)]`` for method ``name``."""
    from .engine import Engine
    from .prompts import BASE_TEMPLATE, power_prompt, thinking_prompt
    from .prompts import base_prompt as _base_prompt
    enc = lambda ps: [tok(p, add_special_tokens=False)["input_ids"] for p in ps]  # noqa: E731
    base_prompt = lambda q: _base_prompt(q, base_template or BASE_TEMPLATE)  # noqa: E731
    eos = tok.eos_token_id

    def plain(model, prompt_fn, temperature=0.0):
        def run(problems):
            g = torch.Generator().manual_seed(seed)
            out = Engine(model).generate(enc([prompt_fn(p["question"]) for p in problems]), max_new_tokens,
                                         temperature=temperature, eos_token_id=eos, generator=g)
            return [dict(output=tok.decode(s, skip_special_tokens=True), tokens=len(s), steered_tokens=0)
                    for s in out.sequences()]
        return run
    if name == "base":
        return plain(base, base_prompt)
    if name == "power-hybrid":       # power sampling of the routed hybrid model
        from .hybrid import HybridModel
        from .power import PowerSampler
        if sae is None or vectors is None or think is None:
            raise ValueError("method power-hybrid needs --thinking (unless tiny), --sae and --vectors")
        hm = HybridModel(base, think, sae, vectors, sae_layer=sae_layer, steer_layer=steer_layer,
                         mode="routed", base_tokenizer=tok, thinking_tokenizer=tok)
        ps = PowerSampler(base, alpha=4.0, block_size=max(1, max_new_tokens // 4), n_mcmc=2,
                          max_new_tokens=max_new_tokens, tokenizer=tok, eos_token_id=eos, steer=hm)

        def run(problems):
            res = ps.sample(enc([power_prompt(p["question"]) for p in problems]),
                            thinking_prompts=[thinking_prompt(tok, p["question"]) for p in problems],
                            generator=torch.Generator().manual_seed(seed))
            return [dict(output=r.text, tokens=len(r.ids), steered_tokens=0) for r in res]
        return run
    if name in ("thinking",) or name.startswith("hybrid-"):
        if think is None:
            raise ValueError(f"method {name} needs a thinking model (--thinking PATH)")
    if name == "thinking":
        return plain(think, lambda q: thinking_prompt(tok, q))
    if name == "low-temp":
        return plain(base, power_prompt, temperature=0.25)
    if name.startswith("hybrid-"):
        from .hybrid import HybridModel
        if sae is None or vectors is None:
            raise ValueError(f"method {name} needs --sae and --vectors artifacts")
        hm = HybridModel(base, think, sae, vectors, sae_layer=sae_layer, steer_layer=steer_layer,
                         mode=name.split("-", 1)[1], base_tokenizer=tok, thinking_tokenizer=tok)

        def run(problems):
            o = hm.generate([base_prompt(p["question"]) for p in problems],
                            [thinking_prompt(tok, p["question"]) for p in problems], max_new_tokens,
                            eos_token_id=eos)
            return [dict(output=r.text, tokens=len(r.ids), steered_tokens=sum(r.steered)) for r in o.results]
        return run
    if name.startswith("power-"):
        from .power import PowerSampler
        ps = PowerSampler(base, alpha=4.0, block_size=max(1, max_new_tokens // 4), n_mcmc=2,
                          max_new_tokens=max_new_tokens, method=name.split("-", 1)[1], n_particles=8,
                          tokenizer=tok, eos_token_id=eos)

        def run(problems):
            res = ps.sample(enc([power_prompt(p["question"]) for p in problems]),
                            generator=torch.Generator().manual_seed(seed))
            return [dict(output=r.text, tokens=len(r.ids), steered_tokens=0) for r in res]
        return run
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def grade_rows(dataset, problems, outs, method, seconds):
    rows = []
    for p, o in zip(problems, outs):
        pred = extract_answer(dataset, o["output"] or "")
        rows.append(dict(problem=p["id"], method=method, dataset=dataset, output=o["output"],
                         extracted=pred, gold=p["gold"], correct=grade(dataset, pred, p["gold"]),
                         tokens=o["tokens"], steered_tokens=o["steered_tokens"],
                         seconds=seconds / max(1, len(problems))))
    return rows


def _shard_worker(args):
    """Runs one shard in a (Ray) worker: builds models and the method, returns graded rows."""
    (method, model, thinking, seed, dataset, problems, max_new_tokens, sae_dir, vec_dir, sl, stl,
     batch, base_template) = args
    from .io import load_sae, load_vectors
    base, think, tok = _models(model, seed, thinking)
    fn = make_method(method, base, think, tok, max_new_tokens=max_new_tokens,
                     sae=load_sae(sae_dir) if sae_dir else None,
                     vectors=load_vectors(vec_dir) if vec_dir else None, sae_layer=sl, steer_layer=stl,
                     seed=seed, base_template=base_template)
    rows = []
    for i in range(0, len(problems), batch):
        chunk = problems[i: i + batch]
        t0 = time.perf_counter()
        outs = fn(chunk)
        rows += grade_rows(dataset, chunk, outs, method, time.perf_counter() - t0)
    return rows


def run_eval(method: str, *, dataset="gsm8k", split="test", path=None, hf=False, base_template=None,
             limit=None, offset=0,
             out="runs/eval", model="tiny", thinking=None, seed=0, max_new_tokens=64, batch_size=4, sae_dir=None,
             vectors_dir=None, sae_layer=2, steer_layer=1, use_ray=False, workers=2,
             progress=True) -> dict:
    problems = load_problems(dataset, split, path=path, limit=limit, offset=offset, hf=hf)
    log = ResultsLog(Path(out) / "results.jsonl")
    done = log.done()
    todo = [p for p in problems if (p["id"], method) not in done]
    if progress:
        print(f"{method}: {len(problems) - len(todo)} done, {len(todo)} to go"
              + (" (repaired a torn last line)" if log.repaired else ""), flush=True)
    if todo and use_ray:
        import ray
        if not ray.is_initialized():
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        task = ray.remote(max_retries=2)(_shard_worker)
        shards = [todo[i::workers] for i in range(workers)]
        refs = [task.remote((method, model, thinking, seed, dataset, s, max_new_tokens, sae_dir, vectors_dir,
                             sae_layer, steer_layer, batch_size, base_template)) for s in shards if s]
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            log.append(ray.get(ready[0]))
    elif todo:
        from .io import load_sae, load_vectors
        base, think, tok = _models(model, seed, thinking)
        fn = make_method(method, base, think, tok, max_new_tokens=max_new_tokens,
                         sae=load_sae(sae_dir) if sae_dir else None,
                         vectors=load_vectors(vectors_dir) if vectors_dir else None,
                         sae_layer=sae_layer, steer_layer=steer_layer, seed=seed,
                         base_template=base_template)
        it = range(0, len(todo), batch_size)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=method)
        for i in it:
            chunk = todo[i: i + batch_size]
            t0 = time.perf_counter()
            outs = fn(chunk)
            log.append(grade_rows(dataset, chunk, outs, method, time.perf_counter() - t0))
    rows = log.rows()
    s = summarize(rows)
    from .io import atomic_write_text
    atomic_write_text(Path(out) / "summary.json", json.dumps(s, indent=1))
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(prog="hybridfast eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--data", default="gsm8k", choices=["gsm8k", "math500"])
    ap.add_argument("--split", default="test")
    ap.add_argument("--path", help="a JSONL file instead of the bundled/shared copy")
    ap.add_argument("--hf", action="store_true", help="load the dataset with `datasets` (network)")
    ap.add_argument("--base-template", help="override the base task prompt (must contain {q})")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--model", default="tiny", help="'tiny' (bundled random pair) or a base model path")
    ap.add_argument("--thinking", help="thinking model path (for thinking / hybrid methods)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sae")
    ap.add_argument("--vectors")
    ap.add_argument("--sae-layer", type=int, default=2)
    ap.add_argument("--steer-layer", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ray", action="store_true", help="shard problems across Ray workers")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/eval")
    a = ap.parse_args(argv)
    if a.base_template is not None and "{q}" not in a.base_template:
        raise SystemExit(f"--base-template must contain {{q}}: {a.base_template!r}")
    s = run_eval(a.method, dataset=a.data, split=a.split, path=a.path, hf=a.hf,
                 base_template=a.base_template, limit=a.limit, offset=a.offset,
                 out=a.out, model=a.model, thinking=a.thinking, seed=a.seed, max_new_tokens=a.max_new_tokens,
                 batch_size=a.batch_size, sae_dir=a.sae, vectors_dir=a.vectors, sae_layer=a.sae_layer,
                 steer_layer=a.steer_layer, use_ray=a.ray, workers=a.workers)
    print(json.dumps(s["methods"].get(a.method, {})))


def report_main(argv=None):
    from .metrics import report_markdown
    ap = argparse.ArgumentParser(prog="hybridfast report")
    ap.add_argument("run_dir")
    a = ap.parse_args(argv)
    rows = ResultsLog(Path(a.run_dir) / "results.jsonl").rows()
    if not rows:
        raise SystemExit(f"{a.run_dir}: no results.jsonl rows")
    s = summarize(rows)
    from .plots import bar_svg
    (Path(a.run_dir) / "accuracy.svg").write_text(
        bar_svg({m: r["accuracy"] for m, r in s["methods"].items()}, "accuracy by method"))
    (Path(a.run_dir) / "report.md").write_text(report_markdown(s) + "\n![accuracy](accuracy.svg)\n")
    print(Path(a.run_dir) / "report.md")
