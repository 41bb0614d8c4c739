"""Evaluation runs: every method is a generator of answers; results are appended per problem to
``OUT/results.jsonl`` as they are produced (flushed and fsynced), so a killed run resumes where it
stopped (a torn last line is repaired).

    hybridfast eval --method base --data gsm8k --limit 50 --out runs/eval
    hybridfast report runs/eval

Rows hold the question, the answer, the gold answer and the grade; rows of hybrid-paper and
hybrid-routed add each token's id, text, category and whether it was steered, rows of the MH power
methods whether each MH step was accepted. ``hybridfast report`` turns them into report.md, the
trace viewer traces.html and the charts.

Run identity: every row records its ``run``: the models (path + file fingerprint, or hub id),
dtype and device, method and all its parameters (defaults included), the prompt format of each
model (templates as hashes; the thinking model's prompt is its own tokenizer's chat template),
the --sae/--vectors artifacts with the settings they record, package version, and the dataset
file (path + sha256) in ``run.data``. ``run_id`` hashes the run without
``run.data``. A local model's (or --sae/--vectors) fingerprint hashes every file's name and size,
plus its sha256 when it is at most 1 MiB or its mtime when larger. Problem ids come from content:
MATH500's unique_id, else a hash of the question.

Steered methods (hybrid-paper, hybrid-routed, power-hybrid, power-hybrid-smc, power-hybrid-scalable) take --sae-layer and --steer-layer
from the artifacts (flags that differ are refused unless --override-artifact-settings; an older
artifact that records no layer needs the flag), need the same K in both artifacts and finite
tensors, and refuse an artifact made with another model (same override). Routed methods use the
coefficients / threshold the vectors record, when they record them. power-hybrid (steered MH),
power-hybrid-smc (steered Power-SMC) and power-hybrid-scalable (steered scalable power sampling) report the tokens they steered, recomputed from each sample's prefixes with one thinking-model forward.

--dtype auto (the default) runs the models in their stored dtype on CPU and in bf16 on CUDA.

Resume rule: an --out continues only an identical configuration. If OUT/results.jsonl holds rows
of the same method with another run_id, the run is refused (exit 2) naming the settings that
differ; use a new --out for a new configuration. Problems saved under this run_id are skipped;
another --path file, --offset or a larger --limit adds problems to the same run. --batch-size,
--ray and --workers only schedule work and are not part of the run.

One writer per results file: a run holds an exclusive lock on OUT/results.jsonl.lock (its pid and
start time are written inside); a second run on the same --out is refused (exit 2).

Errors in arguments or inputs print one line `hybridfast: error: ...` and exit 2 before any model
is loaded (--debug adds the traceback); a flag the method does not use (e.g. --alpha with base)
is such an error. Ctrl-C prints what was saved and the command that resumes, and exits 130.
After the run every problem asked for must have a row of this run (else an error, no summary);
when some answers of this run could not be graded (``grade_error``), the summary is written and
the command exits 1. The summary has one entry per (dataset, split, method, run_id) and refuses
an entry whose rows were graded by different graders (`hybridfast regrade OUT`).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import inspect
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import __version__
from .activations import block_output
from .artifact_settings import OVERRIDE_FLAG, SteeringArtifacts, load_steering
from .datasets import DataSource, open_dataset, problems_of
from .errors import ArgumentParser, UserError, reported
from .grading import GradingError, grade_fields, grader_name
from .io import atomic_write_text, parse_jsonl
from .loading import DTYPE_CHOICES, DTYPE_HELP, device, dtype_name, load_side, load_tokenizer
from .metrics import MixedGraders, summarize
from .provenance import RunIdentity, artifact_identity, differences, model_identity, text_hash
from .report import TRACE_FIELDS, mh_fields, token_fields

__all__ = ["ResultsLog", "WriterLock", "EvalInterrupted", "read_results", "method_params", "make_method",
           "Models", "routed_steered_tokens", "grade_rows", "run_eval", "summarize", "main", "report_main",
           "METHODS", "FLAG_USERS", "refuse_unused_flags", "refuse_incomplete", "refuse_other_grader", "require_grader",
           "stream_seed", "run_results"]

# the prompts each method builds: "base" (task template) and "power" (boxed-answer template) for the
# base model, "thinking" (the thinking model's own chat template) for the thinking model
_PROMPTS = {"base": ("base",), "thinking": ("thinking",), "low-temp": ("power",),
            "hybrid-paper": ("base", "thinking"), "hybrid-routed": ("base", "thinking"),
            "power-mh": ("power",), "power-smc": ("power",), "power-scalable": ("power",),
            "power-hybrid": ("power", "thinking"), "power-hybrid-smc": ("power", "thinking"),
            "power-hybrid-scalable": ("power", "thinking")}
METHODS = tuple(_PROMPTS)
STEERED_METHODS = ("hybrid-paper", "hybrid-routed", "power-hybrid", "power-hybrid-smc",
                   "power-hybrid-scalable")   # need --sae and --vectors
# the methods that sample with the routed hybrid model (PowerSampler steer=), and those of the scalable sampler
POWER_HYBRID = ("power-hybrid", "power-hybrid-smc", "power-hybrid-scalable")
SCALABLE_METHODS = ("power-scalable", "power-hybrid-scalable")
# the power methods' defaults (the block size defaults to max(1, max_new_tokens // 4))
ALPHA, N_MCMC, N_PARTICLES = 4.0, 2, 8
# power-scalable's flags and the PowerSampler settings they set (unset ones keep PowerSampler's defaults)
SCALABLE_FLAGS = {"--variant": "variant", "--n-candidates": "n_candidates", "--n-rollouts": "n_rollouts",
                  "--horizon": "horizon", "--n-proposals": "n_proposals", "--no-jackknife": "jackknife"}


def _uses_thinking(method: str) -> bool:
    return "thinking" in _PROMPTS[method]


_MH_METHODS, _SMC_METHODS = ("power-mh", "power-hybrid"), ("power-smc", "power-hybrid-smc")
#: the methods that use each method-specific flag; another method refuses the flag when it is given
FLAG_USERS = {"--thinking": tuple(m for m in METHODS if _uses_thinking(m)),
              "--base-template": tuple(m for m in METHODS if "base" in _PROMPTS[m]),
              "--power-template": tuple(m for m in METHODS if "power" in _PROMPTS[m]),
              **dict.fromkeys(("--sae", "--vectors", "--sae-layer", "--steer-layer", OVERRIDE_FLAG), STEERED_METHODS),
              "--alpha": tuple(m for m in METHODS if m.startswith("power-")),
              "--block-size": _MH_METHODS + SCALABLE_METHODS, "--n-mcmc": _MH_METHODS, "--n-particles": _SMC_METHODS,
              **dict.fromkeys(SCALABLE_FLAGS, SCALABLE_METHODS)}
#: the flags the scalable methods use only with --variant block
BLOCK_VARIANT_FLAGS = ("--block-size", "--n-proposals")


def refuse_unused_flags(method: str, given: dict, variant: str | None) -> None:
    """A :class:`UserError` naming the first flag in ``given`` (flag -> value; None: not given)
    that ``method`` does not use (``FLAG_USERS``; ``variant``: the scalable methods' variant)."""
    for flag, value in given.items():
        if value is None:
            continue
        if method not in FLAG_USERS[flag]:
            raise UserError(f"{flag} is not used by --method {method} (only by {', '.join(FLAG_USERS[flag])}): "
                            f"drop it")
        if method in SCALABLE_METHODS and flag in BLOCK_VARIANT_FLAGS and variant != "block":
            raise UserError(f"{flag} is used by --method {method} only with --variant block (this run: "
                            f"--variant {variant}): drop it")


def run_results(run_dir) -> tuple[Path, list[dict]]:
    """``run_dir/results.jsonl`` and its complete rows; a missing, unreadable or empty file is a
    :class:`UserError`."""
    results = Path(run_dir) / "results.jsonl"
    if not results.is_file():
        raise UserError(f"{results}: no such file")
    try:
        rows = read_results(results)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not rows:
        raise UserError(f"{results} has no result rows")
    return results, rows


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says how many of its problems are saved, and where."""


def read_results(path) -> list[dict]:
    """The complete rows of a results file; a torn last line (being written, or left by a kill) is
    not read."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    return parse_jsonl(text[: text.rfind("\n") + 1], path)


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
        return read_results(self.path)

    def done(self, run_id: str) -> set:
        """Ids of the problems saved for ``run_id``."""
        return {r["problem"] for r in self.rows() if r.get("run_id") == run_id}

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``<results>.lock``, held while a run writes
    ``results``. The lock file names its holder (pid, start time); it stays after the run (the
    lock is the flock, which the kernel releases when the holder exits, however it exits)."""

    def __init__(self, results):
        self.results = Path(results)
        self.path = self.results.with_name(self.results.name + ".lock")
        self._fd = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "it has not recorded its pid yet"
            os.close(fd)
            raise UserError(f"{self.results} is being written by another run ({holder}); wait for it to "
                            f"finish or pass another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self._fd)      # releases the lock


@dataclass
class Models:
    """A run's models, each with its own tokenizer (no thinking model when the method needs none)."""
    base: object
    base_tokenizer: object
    thinking: object = None
    thinking_tokenizer: object = None


def _models(spec: "MethodSpec") -> Models:
    """The base model and, when the method needs one, the thinking model, in ``spec.dtype``."""
    seed = spec.params["seed"]
    base = load_side(spec.model, "base", seed=seed, dtype=spec.dtype, flag="--model")
    if spec.thinking is None:
        return Models(base.model, base.tokenizer)
    think = load_side(spec.thinking, "thinking", seed=seed, dtype=spec.dtype, flag="--thinking")
    return Models(base.model, base.tokenizer, think.model, think.tokenizer)


def _call_params(fn, explicit: dict, supplied: tuple) -> dict:
    """The keyword arguments ``fn`` runs with in an eval: its defaults overridden by ``explicit``,
    less the parameters in ``supplied`` (models, tokenizers, prompts, generators) that
    :func:`make_method` passes itself. Defaults are recorded too, so a changed default changes the
    run id."""
    params = inspect.signature(fn).parameters
    unknown = set(explicit) - set(params)
    if unknown:
        raise TypeError(f"{fn.__qualname__} has no parameter(s) {sorted(unknown)}")
    return {k: explicit.get(k, p.default) for k, p in params.items()
            if k != "self" and k not in supplied and (k in explicit or p.default is not p.empty)}


def method_params(method: str, *, max_new_tokens: int, seed: int, sae_layer: int | None = None,
                  steer_layer: int | None = None, routing: dict | None = None, alpha: float = ALPHA,
                  block_size: int | None = None, n_mcmc: int = N_MCMC, n_particles: int = N_PARTICLES,
                  scalable: dict | None = None) -> dict:
    """Every parameter that decides ``method``'s answers, grouped by the call that takes it
    (``engine``, ``generate``, ``hybrid``, ``power``, ``sample``), plus the ``seed``. ``routing``:
    the coefficients / threshold the vectors record, used by the routed methods; ``scalable``:
    the power-scalable settings given (``SCALABLE_FLAGS``' values)."""
    from .engine import Engine
    from .hybrid import HybridModel
    from .power import PowerSampler
    p = dict(seed=seed)
    if method in ("base", "thinking", "low-temp"):
        p["engine"] = _call_params(Engine.__init__, {}, ("model",))
        p["generate"] = _call_params(Engine.generate, dict(max_new_tokens=max_new_tokens,
                                                           temperature=0.25 if method == "low-temp" else 0.0),
                                     ("prompts", "generator", "eos_token_id", "rows"))
    if method in STEERED_METHODS:
        mode = "paper" if method == "hybrid-paper" else "routed"
        given = dict(mode=mode, sae_layer=sae_layer, steer_layer=steer_layer,
                     **((routing or {}) if mode == "routed" else {}))
        p["hybrid"] = _call_params(HybridModel.__init__, given,
                                   ("base", "thinking", "sae", "vectors", "base_tokenizer", "thinking_tokenizer"))
    if method in ("hybrid-paper", "hybrid-routed"):
        p["generate"] = _call_params(HybridModel.generate, dict(max_new_tokens=max_new_tokens),
                                     ("base_prompts", "thinking_prompts", "eos_token_id", "rows"))
    if method.startswith("power-"):
        power = dict(alpha=float(alpha), block_size=block_size or max(1, max_new_tokens // 4), n_mcmc=n_mcmc,
                     max_new_tokens=max_new_tokens)
        if method in SCALABLE_METHODS:
            power["method"] = "scalable"
            power.update(scalable or {})
        elif method != "power-hybrid":
            power["method"] = method.rsplit("-", 1)[1]
        if power.get("method") == "smc":
            power["n_particles"] = n_particles
        p["power"] = _call_params(PowerSampler.__init__, power, ("model", "tokenizer", "eos_token_id", "steer"))
        p["sample"] = _call_params(PowerSampler.sample, {}, ("prompts", "generator", "thinking_prompts", "rows"))
    return p


def stream_seed(seed: int, shard: int) -> int:
    """The seed of shard ``shard``'s random stream: ``seed`` itself for shard 0 (one process),
    else a hash of both, so the rows of different Ray shards never share their noise."""
    if shard == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/shard {shard}".encode()).digest()[:7], "little")


def make_method(name: str, models: Models, *, params: dict, sae=None, vectors=None, base_template=None,
                power_template=None, shard: int = 0):
    """A generator function ``(problems, rows) -> iterator of [(problem, dict(output, tokens,
    steered_tokens, ...))]`` for method ``name``, run with ``params`` (from :func:`method_params`).
    Plain and hybrid methods decode ``rows`` problems at a time with continuous batching and yield
    each group of problems as it finishes, MH power methods keep ``rows`` chains live the same way
    (:meth:`PowerSampler.stream`), SMC methods ``rows`` particle groups, and the scalable methods yield
    batches of ``rows`` problems. Each model reads prompts made and encoded with its own
    tokenizer; outputs are decoded with the tokenizer of the model that wrote them. Each call draws
    from one generator seeded with :func:`stream_seed` of ``params["seed"]`` and ``shard``."""
    from .engine import Engine
    from .prompts import BASE_TEMPLATE, POWER_TEMPLATE, thinking_prompt
    from .prompts import power_prompt as _power_prompt
    from .prompts import base_prompt as _base_prompt
    btok, ttok = models.base_tokenizer, models.thinking_tokenizer
    enc = lambda tok, ps: [tok(p, add_special_tokens=False)["input_ids"] for p in ps]  # noqa: E731
    base_prompt = lambda q: _base_prompt(q, base_template or BASE_TEMPLATE)  # noqa: E731
    power_prompt = lambda q: _power_prompt(q, power_template or POWER_TEMPLATE)  # noqa: E731
    think_prompt = lambda q: thinking_prompt(ttok, q)  # noqa: E731
    generator = lambda: torch.Generator().manual_seed(stream_seed(params["seed"], shard))  # noqa: E731
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    if _uses_thinking(name) and models.thinking is None:
        raise ValueError(f"method {name} needs a thinking model (--thinking PATH)")
    if name in STEERED_METHODS and (sae is None or vectors is None):
        raise ValueError(f"method {name} needs --sae and --vectors artifacts")

    def plain(model, tok, prompt_fn):
        engine = Engine(model, **params["engine"])

        def answers(problems, rows):
            prompts = enc(tok, [prompt_fn(p["question"]) for p in problems])
            for group in engine.stream(prompts, **params["generate"], rows=rows, eos_token_id=tok.eos_token_id,
                                       generator=generator()):
                yield [(problems[c.index], dict(output=tok.decode(c.tokens, skip_special_tokens=True),
                                                tokens=len(c.tokens), steered_tokens=0)) for c in group]
        return answers

    def hybrid():
        from .hybrid import HybridModel
        return HybridModel(models.base, models.thinking, sae, vectors, **params["hybrid"], base_tokenizer=btok,
                           thinking_tokenizer=ttok)

    if name == "thinking":
        return plain(models.thinking, ttok, think_prompt)
    if name in ("base", "low-temp"):
        return plain(models.base, btok, base_prompt if name == "base" else power_prompt)
    if name.startswith("hybrid-"):
        hm = hybrid()

        def answers(problems, rows):
            for group in hm.stream([base_prompt(p["question"]) for p in problems],
                                   [think_prompt(p["question"]) for p in problems], **params["generate"],
                                   rows=rows, eos_token_id=btok.eos_token_id):
                yield [(problems[i], dict(output=r.text, tokens=len(r.ids), steered_tokens=sum(r.steered),
                                          **token_fields(r, btok, vectors.names))) for i, r in group]
        return answers
    from .power import PowerSampler
    steer = hybrid() if name in POWER_HYBRID else None
    ps = PowerSampler(models.base, **params["power"], tokenizer=btok, eos_token_id=btok.eos_token_id, steer=steer)

    def answered(problems, res, thinking):
        thinking = thinking and [thinking[r.prompt_index] for r in res]
        steered = routed_steered_tokens(steer, thinking, res) if steer else [0] * len(res)
        return [(problems[r.prompt_index], dict(output=r.text, tokens=len(r.ids), steered_tokens=n, **mh_fields(r)))
                for r, n in zip(res, steered)]

    def answers(problems, rows):
        prompts = enc(btok, [power_prompt(p["question"]) for p in problems])
        thinking = [think_prompt(p["question"]) for p in problems] if steer else None
        if ps.method in ("mh", "smc"):   # continuous batching: rows chains (SMC: particle groups) live
            for res in ps.stream(prompts, **params["sample"], rows=rows, generator=generator(),
                                 thinking_prompts=thinking):
                yield answered(problems, res, thinking)
            return
        g = generator()                  # one stream across the batches: no two batches share their noise
        for i in range(0, len(problems), rows):
            part = thinking and thinking[i: i + rows]
            yield answered(problems[i: i + rows], ps.sample(prompts[i: i + rows], **params["sample"],
                                                            generator=g, thinking_prompts=part), part)
    return answers


@torch.inference_mode()
def routed_steered_tokens(hm, thinking_prompts: list[str], samples) -> list[int]:
    """How many tokens of each power-sampled routed-hybrid sample were generated with steering on.

    Token ``t`` is steered iff the SAE's top pre-activation on the thinking model's
    ``sae_layer`` residual, after the thinking prompt and the sample's first ``t`` tokens, exceeds
    the threshold: a function of that prefix alone (every accepted MH proposal regenerates all the
    tokens after its start), so one forward over prompt + sample recomputes every decision. A score
    within float rounding of the threshold may count otherwise than it steered."""
    model = hm.thinking.hf
    dev = next(model.parameters()).device
    counts = []
    for prompt, r in zip(thinking_prompts, samples):
        if not r.ids:
            counts.append(0)
            continue
        p = hm.tok_t(prompt, add_special_tokens=False)["input_ids"]
        with block_output(model, hm.sae_layer) as got:
            model(input_ids=torch.tensor([p + r.ids[:-1]], device=dev))
        x = got["h"][0, len(p) - 1:]
        z = hm.sae.encode(x.to(hm.sae.W_enc.device))
        counts.append(int((z.max(-1).values > hm.threshold).sum()))
    return counts


def grade_rows(dataset, problems, outs, method, seconds, run: RunIdentity | None = None):
    """One result row per problem, with the question and the trace fields (``TRACE_FIELDS``) its
    output carries; with ``run``, each row records ``run_id`` and ``run``."""
    rows = []
    for p, o in zip(problems, outs):
        rows.append(dict(problem=p["id"], method=method, dataset=dataset, question=p["question"], output=o["output"],
                         **grade_fields(dataset, o["output"], p["gold"]), tokens=o["tokens"],
                         steered_tokens=o["steered_tokens"],
                         seconds=seconds / max(1, len(problems)), **{k: o[k] for k in TRACE_FIELDS if k in o}))
        if run is not None:
            rows[-1].update(run_id=run.id, run=run.record())
    return rows


@dataclass(frozen=True)
class MethodSpec:
    """What a process needs to build a method's generator (sent to Ray workers as is).
    ``thinking`` is the thinking model's spec (``tiny`` for the tiny pair), None when the method
    needs none; ``dtype`` is the --dtype asked for."""
    method: str
    model: str
    thinking: str | None
    params: dict
    sae_dir: str | None
    vectors_dir: str | None
    base_template: str | None
    dtype: str = "auto"
    power_template: str | None = None


def _build_method(spec: MethodSpec, steering: SteeringArtifacts | None, shard: int = 0):
    """Load the models and make the method (the artifacts were loaded and checked before)."""
    return make_method(spec.method, _models(spec), params=spec.params, sae=steering and steering.sae,
                       vectors=steering and steering.vectors, base_template=spec.base_template,
                       power_template=spec.power_template, shard=shard)


def _graded(fn, problems: list[dict], rows: int, run: RunIdentity) -> Iterator[list[dict]]:
    """Answer ``problems`` with ``fn`` and grade each group as it finishes; a row's ``seconds`` is
    its share of the wall time since the previous group (they sum to the run's wall time)."""
    t0 = time.perf_counter()
    for group in fn(problems, rows):
        now = time.perf_counter()
        yield grade_rows(run.data["name"], [p for p, _ in group], [o for _, o in group], run.config["method"],
                         now - t0, run)
        t0 = now


def _shard_worker(spec: MethodSpec, steering: SteeringArtifacts | None, run: RunIdentity, problems: list[dict],
                  batch_size: int, shard: int) -> list[dict]:
    """Shard ``shard`` in a (Ray) worker: builds the method, returns the graded rows."""
    return [row for rows in _graded(_build_method(spec, steering, shard), problems, batch_size, run)
            for row in rows]


def _evaluate(spec: MethodSpec, steering: SteeringArtifacts | None, run: RunIdentity, todo: list[dict],
              log: ResultsLog, *, batch_size: int, use_ray: bool, workers: int, progress: bool) -> None:
    """Answer ``todo``, appending each group's rows (each shard's, with Ray) as it finishes."""
    if use_ray:
        import ray
        if not ray.is_initialized():
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        task = ray.remote(max_retries=2)(_shard_worker)
        refs = [task.remote(spec, steering, run, todo[i::workers], batch_size, i) for i in range(workers)
                if todo[i::workers]]
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            log.append(ray.get(ready[0]))
        return
    fn = _build_method(spec, steering)
    from tqdm.auto import tqdm
    with tqdm(total=len(todo), desc=spec.method, disable=not progress) as bar:
        for rows in _graded(fn, todo, batch_size, run):   # the bar is closed before an interrupt is reported
            log.append(rows)
            bar.update(len(rows))


def _template_ok(template: str) -> bool:
    """``template`` has a ``{q}`` field and formats with ``q`` alone."""
    try:
        template.format(q="")
    except (KeyError, IndexError, ValueError):
        return False
    return "{q}" in template


def check_settings(method: str, *, limit, offset, batch_size, workers, max_new_tokens, sae_layer, steer_layer,
                   base_template, model, thinking, sae_dir, vectors_dir, dtype="auto", alpha=None,
                   block_size=None, n_mcmc=None, n_particles=None, scalable=None,
                   power_template=None, override_artifact_settings=False) -> None:
    """Every setting in range, every input a method needs present and no flag the method does not
    use, else a :class:`UserError` naming the flag. A setting is given when it is not None
    (``override_artifact_settings``: True)."""
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
    refuse_unused_flags(method, {"--thinking": thinking, "--base-template": base_template,
                                 "--power-template": power_template, "--sae": sae_dir, "--vectors": vectors_dir,
                                 "--sae-layer": sae_layer, "--steer-layer": steer_layer,
                                 OVERRIDE_FLAG: override_artifact_settings or None, "--alpha": alpha,
                                 "--block-size": block_size, "--n-mcmc": n_mcmc, "--n-particles": n_particles,
                                 **{flag: (scalable or {}).get(key) for flag, key in SCALABLE_FLAGS.items()}},
                        (scalable or {}).get("variant") or _sampler_default("variant"))
    for flag, value, least in (("--limit", limit, 1), ("--offset", offset, 0), ("--batch-size", batch_size, 1),
                               ("--workers", workers, 1), ("--max-new-tokens", max_new_tokens, 1),
                               ("--sae-layer", sae_layer, 0), ("--steer-layer", steer_layer, 0),
                               ("--alpha", alpha, 1), ("--block-size", block_size, 1), ("--n-mcmc", n_mcmc, 0),
                               ("--n-particles", n_particles, 1),
                               *((flag, (scalable or {}).get(key), 1) for flag, key in SCALABLE_FLAGS.items()
                                 if key not in ("variant", "jackknife"))):
        if value is not None and value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if method in SCALABLE_METHODS:
        _check_scalable(scalable or {}, method)
    dtype_name(dtype, model)          # an unknown --dtype is a UserError
    if model == "tiny" and thinking is not None:
        raise UserError("--model tiny is the bundled pair (base and thinking): drop --thinking")
    for flag, template in (("--base-template", base_template), ("--power-template", power_template)):
        if template is not None and not _template_ok(template):
            raise UserError(f"{flag} must contain {{q}} and no other {{}} field: {template!r}")
    if _uses_thinking(method) and model != "tiny" and thinking is None:
        raise UserError(f"--method {method} needs --thinking (the thinking model's path or hub id)")
    if method in STEERED_METHODS and (sae_dir is None or vectors_dir is None):
        raise UserError(f"--method {method} needs --sae and --vectors")


def _sampler_default(name: str):
    """PowerSampler's default of setting ``name``."""
    from .power import PowerSampler
    return inspect.signature(PowerSampler.__init__).parameters[name].default


def _check_scalable(given: dict, method: str) -> None:
    """power-scalable's (and power-hybrid-scalable's) settings (``given``, PowerSampler's defaults for the rest) agree with each other,
    else a :class:`UserError` (e.g. the jackknife with one rollout)."""
    from .power import PowerSampler
    from .scalable import check_settings
    s = _call_params(PowerSampler.__init__, given, ())
    try:
        check_settings(**{k: s[k] for k in (*SCALABLE_FLAGS.values(), "prefix_kv")}, vocab_size=None)
    except ValueError as e:
        raise UserError(f"--method {method}: {e}") from None


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def _problems(dataset, split, path, hf, limit, offset) -> tuple[DataSource, list[dict]]:
    """The dataset and the selected problems; an unreadable or empty file, or an empty selection,
    is a :class:`UserError`."""
    try:
        source = open_dataset(dataset, split, path=path, hf=hf)
        problems = problems_of(source, limit, offset)
    except (OSError, ValueError) as e:
        raise UserError(_reason(e)) from None
    if not problems:
        raise UserError(f"--offset {offset} selects no problems: {source.location} has {len(source.rows)}")
    if limit is not None and len(problems) < limit:
        print(f"hybridfast: note: --limit {limit} from --offset {offset} selects {len(problems)} problems: "
              f"{source.location} has {len(source.rows)}", file=sys.stderr)
    return source, problems


def _prompt_formats(spec: MethodSpec) -> dict:
    """For each prompt the method builds, the model that reads it and its format: the base task
    and power templates (hashes) for the base model; the thinking model's own tokenizer's chat
    template (its hash; the tokenizer is loaded, not the model)."""
    from .prompts import BASE_TEMPLATE, POWER_TEMPLATE, thinking_format
    templates = dict(base=spec.base_template or BASE_TEMPLATE, power=spec.power_template or POWER_TEMPLATE)
    formats = {}
    for kind in _PROMPTS[spec.method]:
        if kind == "thinking":
            formats[kind] = dict(model="thinking", **thinking_format(load_tokenizer(spec.thinking, flag="--thinking")))
        else:
            formats[kind] = dict(model="base", format=f"{kind} template", template=text_hash(templates[kind]))
    return formats


def _artifacts_record(spec: MethodSpec, steering: SteeringArtifacts) -> dict:
    """The --sae and --vectors artifacts: path, fingerprint and the settings they record."""
    return dict(sae=dict(artifact_identity(spec.sae_dir, "--sae"), **steering.sae.meta),
                vectors=dict(artifact_identity(spec.vectors_dir, "--vectors"), **steering.vectors.meta))


def run_config(spec: MethodSpec, steering: SteeringArtifacts | None = None) -> dict:
    """Everything that decides ``spec``'s answers, as recorded in every row's ``run`` (model and
    artifact paths must exist: a missing one is a :class:`UserError`)."""
    models = dict(base=model_identity(spec.model, "--model"))
    if spec.thinking is not None:
        models["thinking"] = model_identity(spec.thinking, "--thinking")
    config = dict(method=spec.method, models=models, dtype=dtype_name(spec.dtype, spec.model), device=device(),
                  **spec.params, prompts=_prompt_formats(spec), version=__version__)
    if steering is not None:
        config["artifacts"] = _artifacts_record(spec, steering)
    return config


def _writable_results(out) -> Path:
    """``out/results.jsonl``, once ``out`` is a folder (made if missing) where it can be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.jsonl", "a"):
            pass
    except OSError as e:
        raise UserError(f"--out {out} is not writable ({_reason(e)})") from None
    return out / "results.jsonl"


def refuse_other_configuration(rows: list[dict], run: RunIdentity, results: Path) -> None:
    """A :class:`UserError` when ``results`` holds rows of ``run``'s method from another
    configuration (or from before run ids): continuing would mix two configurations."""
    method = run.config["method"]
    for r in rows:
        if r["method"] != method or r.get("run_id") == run.id:
            continue
        if "run" not in r:
            raise UserError(f"{results} holds {method} rows with no recorded run configuration (an older "
                            f"hybridfast wrote them); they cannot be continued safely: pass a new --out")
        old = {k: v for k, v in r["run"].items() if k != "data"}
        changes = ", ".join(differences(old, run.config)) or "the hash of its configuration"
        raise UserError(f"{results} holds {method} rows of run {r['run_id']} and this run ({run.id}) differs in "
                        f"{changes}; an --out continues only an identical configuration: pass a new --out "
                        f"(or the old settings)")


def _steering(method: str, model: str, thinking: str | None, sae_dir, vectors_dir, sae_layer, steer_layer,
              override: bool) -> SteeringArtifacts | None:
    """The checked artifacts and layers of a steered method (None for the others)."""
    if method not in STEERED_METHODS:
        return None
    return load_steering(sae_dir, vectors_dir, sae_layer=sae_layer, steer_layer=steer_layer, base=model,
                         thinking=thinking, override=override)


def _routing(steering: SteeringArtifacts | None) -> dict:
    """The routed-mode coefficients / threshold the vectors record (only those they record)."""
    meta = steering.vectors.meta if steering else {}
    return {k: meta[k] for k in ("coefficients", "threshold") if meta.get(k) is not None}


def run_eval(method: str, *, dataset="gsm8k", split="test", path=None, hf=False, base_template=None,
             power_template=None,
             limit=None, offset=0, out="runs/eval", model="tiny", thinking=None, seed=0, max_new_tokens=64,
             batch_size=4, sae_dir=None, vectors_dir=None, sae_layer=None, steer_layer=None,
             override_artifact_settings=False, dtype="auto", alpha=None, block_size=None, n_mcmc=None,
             n_particles=None, scalable=None, use_ray=False, workers=2, progress=True) -> dict:
    """Evaluate ``method`` on problems ``offset .. offset + limit``, appending to
    ``out/results.jsonl`` and continuing an identical earlier run (module doc: the resume rule).
    ``sae_layer``/``steer_layer`` None: the artifacts' layers; ``alpha``, ``n_mcmc``,
    ``n_particles`` None: ``ALPHA``, ``N_MCMC``, ``N_PARTICLES`` (a setting given to a method that
    does not use it is refused). Every user error is a :class:`UserError` raised before any model
    loads; Ctrl-C during the run raises :class:`EvalInterrupted`; a problem left without a row
    after the run is a ``RuntimeError``. Returns the summary of the whole results file, with
    ``latest``: the label of this run's entry."""
    check_settings(method, limit=limit, offset=offset, batch_size=batch_size, workers=workers,
                   max_new_tokens=max_new_tokens, sae_layer=sae_layer, steer_layer=steer_layer,
                   base_template=base_template, model=model, thinking=thinking, sae_dir=sae_dir,
                   vectors_dir=vectors_dir, dtype=dtype, alpha=alpha, block_size=block_size, n_mcmc=n_mcmc,
                   n_particles=n_particles, scalable=scalable, power_template=power_template,
                   override_artifact_settings=override_artifact_settings)
    alpha, n_mcmc = ALPHA if alpha is None else alpha, N_MCMC if n_mcmc is None else n_mcmc
    n_particles = N_PARTICLES if n_particles is None else n_particles
    source, problems = _problems(dataset, split, path, hf, limit, offset)
    grader = require_grader(source.name)      # a dataset whose grader is missing: refused before any model loads
    thinking = ("tiny" if model == "tiny" else thinking) if _uses_thinking(method) else None
    steering = _steering(method, model, thinking, sae_dir, vectors_dir, sae_layer, steer_layer,
                         override_artifact_settings)
    params = method_params(method, max_new_tokens=max_new_tokens, seed=seed,
                           sae_layer=steering and steering.sae_layer, steer_layer=steering and steering.steer_layer,
                           routing=_routing(steering), alpha=alpha, block_size=block_size, n_mcmc=n_mcmc,
                           n_particles=n_particles, scalable=scalable)
    spec = MethodSpec(method, model, thinking, params, steering and sae_dir, steering and vectors_dir,
                      base_template, dtype, power_template)
    run = RunIdentity(run_config(spec, steering), source.record())
    results = _writable_results(out)
    with WriterLock(results):
        log = ResultsLog(results)
        refuse_other_configuration(log.rows(), run, results)
        refuse_other_grader(log.rows(), run, grader, out)
        done = log.done(run.id)
        todo = [p for p in problems if p["id"] not in done]
        if progress:
            print(f"{method} (run {run.id}): {len(problems) - len(todo)} done, {len(todo)} to go"
                  + (" (repaired a torn last line)" if log.repaired else ""), flush=True)
        try:
            if todo:
                _evaluate(spec, steering, run, todo, log, batch_size=batch_size, use_ray=use_ray, workers=workers,
                          progress=progress)
        except KeyboardInterrupt as e:
            saved = len({p["id"] for p in problems} & log.done(run.id))
            raise EvalInterrupted(f"{saved} of {len(problems)} problems of run {run.id} are saved in "
                                  f"{results}") from e
        refuse_incomplete(problems, log, run)
        summary = _summary(log.rows(), out)
        summary["latest"] = _entry_label(summary, run)
        atomic_write_text(Path(out) / "summary.json", json.dumps(summary, indent=1))
    return summary


def require_grader(dataset: str) -> str:
    """The grader of ``dataset`` (:func:`~hybridfast.grading.grader_name`); a missing one (MATH
    without math-verify) is a :class:`UserError`."""
    try:
        return grader_name(dataset)
    except GradingError as e:
        raise UserError(str(e)) from None


def refuse_other_grader(rows: list[dict], run: RunIdentity, now: str, out) -> None:
    """A :class:`UserError` when rows of ``run`` saved earlier were graded by another grader
    than ``now`` (a grader change is not part of the run identity): found before any model
    loads, not after the new rows are generated."""
    old = sorted({str(r.get("grader")) for r in rows if r.get("run_id") == run.id and r.get("grader") != now})
    if old:
        raise UserError(f"run {run.id} in {out} has rows graded by {', '.join(old)}; this version grades with {now}: "
                        f"run `hybridfast regrade {out}` first, then resume")


def refuse_incomplete(problems: list[dict], log: ResultsLog, run: RunIdentity) -> None:
    """A ``RuntimeError`` naming how many and the first few of ``problems`` that have no row of
    ``run`` in ``log`` (answers lost: never a summary with a smaller n)."""
    done = log.done(run.id)
    missing = [p["id"] for p in problems if p["id"] not in done]
    if missing:
        raise RuntimeError(f"run {run.id}: {len(missing)} of the {len(problems)} problems asked for have no row in "
                           f"{log.path} after the evaluation (first: {', '.join(missing[:5])}); summary.json was not "
                           f"updated: run the same command again to evaluate them")


def _summary(rows: list[dict], run_dir) -> dict:
    """The summary of ``rows``; an entry holding rows of different graders is a :class:`UserError`."""
    try:
        return summarize(rows, run_dir=run_dir)
    except MixedGraders as e:
        raise UserError(str(e)) from None


def _entry_label(summary: dict, run: RunIdentity) -> str:
    """The label of ``run``'s entry in ``summary["methods"]``."""
    key = (run.data["name"], run.data["split"], run.config["method"], run.id)
    return next(label for label, e in summary["methods"].items()
                if (e["dataset"], e["split"], e["method"], e["run_id"]) == key)


def _eval_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="hybridfast eval", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=METHODS, help="what generates the answers")
    ap.add_argument("--data", default="gsm8k", choices=["gsm8k", "math500"], help="dataset (default: %(default)s)")
    ap.add_argument("--split", default="test", help="dataset split (default: %(default)s)")
    ap.add_argument("--path", help="a JSONL file instead of the shared copy (or the bundled sample)")
    ap.add_argument("--hf", action="store_true", help="load the dataset with `datasets` (network)")
    ap.add_argument("--base-template", help="override the base task prompt (must contain {q})")
    ap.add_argument("--power-template", help="override the prompt of low-temp and the power methods (must "
                    "contain {q}; default: the paper's boxed-answer prompt)")
    ap.add_argument("--limit", type=int, help="evaluate at most this many problems (>= 1)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many problems first (>= 0)")
    ap.add_argument("--model", default="tiny",
                    help="base model: 'tiny' (bundled random pair, both sides), a named model (smollm2-135m), "
                         "a GGUF file or folder, a Hugging Face folder or hub id (default: %(default)s)")
    ap.add_argument("--thinking", help="thinking model (same forms as --model; for the thinking / hybrid methods); "
                                       "its prompts use its own tokenizer's chat template")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4, help="rows decoded at once (>= 1; not part of the run): plain and hybrid methods "
                    "refill a row as soon as its problem ends (continuous batching); MH power methods keep this many "
                    "chains live, refilled as chains end; SMC methods as many particle groups; the scalable methods "
                    "sample this many problems per batch")
    ap.add_argument("--sae", help="SAE folder (router) for the steered methods, from `hybridfast discover`")
    ap.add_argument("--vectors", help="steering-vectors folder for the steered methods, from "
                                      "`hybridfast train-vectors`")
    ap.add_argument("--sae-layer", type=int,
                    help="thinking-model block the SAE reads (default: the layer --sae records)")
    ap.add_argument("--steer-layer", type=int,
                    help="base-model block the vectors steer (default: the layer --vectors records)")
    ap.add_argument(OVERRIDE_FLAG, action="store_true",
                    help="use --sae-layer/--steer-layer and the given models even where they differ from what "
                         "the --sae/--vectors artifacts record (refused otherwise)")
    # method-specific flags default to None (not given): a method refuses one it does not use (FLAG_USERS)
    ap.add_argument("--alpha", type=float, help=f"power methods: sample from p^alpha (>= 1; default: {ALPHA})")
    ap.add_argument("--block-size", type=int,
                    help="power MH methods, power-(hybrid-)scalable --variant block: tokens per block (>= 1; "
                         "default: max(1, --max-new-tokens // 4))")
    ap.add_argument("--n-mcmc", type=int,
                    help=f"power MH methods: Metropolis-Hastings steps per block (>= 0; default: {N_MCMC})")
    ap.add_argument("--n-particles", type=int,
                    help=f"power-smc, power-hybrid-smc: particles per problem (>= 1; default: {N_PARTICLES})")
    ap.add_argument("--variant", choices=["token", "block"],
                    help="power-(hybrid-)scalable: one token per decision, or blocks of --block-size (default: token)")
    ap.add_argument("--n-candidates", type=int,
                    help="power-(hybrid-)scalable: candidates K per decision (>= 1; default: 8)")
    ap.add_argument("--n-rollouts", type=int,
                    help="power-(hybrid-)scalable: rollouts M per candidate (>= 1, >= 2 with the jackknife; default: 8)")
    ap.add_argument("--horizon", type=int, help="power-(hybrid-)scalable: rollout tokens H at most (>= 1; default: 192)")
    ap.add_argument("--n-proposals", type=int,
                    help="power-(hybrid-)scalable --variant block: proposed blocks L per decision (>= K; default: 32)")
    ap.add_argument("--no-jackknife", dest="jackknife", action="store_const", const=False,
                    help="power-(hybrid-)scalable: no jackknife bias correction")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    ap.add_argument("--ray", action="store_true", help="shard problems across Ray workers")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers with --ray (default: %(default)s)")
    ap.add_argument("--out", default="runs/eval", help="run folder: results.jsonl, its .lock, summary.json")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return ap


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _eval_parser().parse_args(argv)
    with reported(a.debug, resume="hybridfast eval " + shlex.join(argv)):
        s = run_eval(a.method, dataset=a.data, split=a.split, path=a.path, hf=a.hf,
                     base_template=a.base_template, power_template=a.power_template, limit=a.limit, offset=a.offset, out=a.out, model=a.model,
                     thinking=a.thinking, seed=a.seed, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                     sae_dir=a.sae, vectors_dir=a.vectors, sae_layer=a.sae_layer, steer_layer=a.steer_layer,
                     override_artifact_settings=a.override_artifact_settings, dtype=a.dtype, alpha=a.alpha,
                     block_size=a.block_size, n_mcmc=a.n_mcmc, n_particles=a.n_particles, use_ray=a.ray,
                     workers=a.workers, scalable={key: getattr(a, key) for key in SCALABLE_FLAGS.values()
                                                  if getattr(a, key) is not None})
    mine = s["methods"][s["latest"]]
    print(json.dumps(mine))
    if mine["grade_errors"]:
        print(f"hybridfast: error: {mine['grade_errors']} of the {mine['n']} answers of run {mine['run_id']} could not "
              f"be graded (each such row's grade_error says why; they count as wrong in "
              f"{Path(a.out) / 'summary.json'}); once the grader works, run `hybridfast regrade {a.out}`",
              file=sys.stderr)
        raise SystemExit(1)


def report_main(argv=None):
    from .metrics import report_markdown
    from .report import write_views
    ap = ArgumentParser(prog="hybridfast report",
                        description="report.md, accuracy.svg and the trace viewer traces.html (per problem: question, "
                                    "answer with per-token categories, gold, grade) of a run folder, plus "
                                    "category_usage.svg and acceptance.svg when its rows carry per-token categories "
                                    "(hybrid-paper, hybrid-routed) or MH acceptances (power-mh, power-hybrid): one row "
                                    "per (dataset, split, method, run_id), each problem counted once")
    ap.add_argument("run_dir", help="a folder written by `hybridfast eval --out` (holding results.jsonl)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = ap.parse_args(argv)
    with reported(a.debug):
        _, rows = run_results(a.run_dir)
        s = _summary(rows, a.run_dir)
    links = write_views(a.run_dir, s, rows)
    (Path(a.run_dir) / "report.md").write_text(report_markdown(s) + "\n" + links)
    print(Path(a.run_dir) / "report.md")
