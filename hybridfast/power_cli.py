"""``hybridfast power-sample``: JSONL in (``id`` + ``prompt`` or ``question``), JSONL out.

OUTPUT gets one row per prompt and chain, appended as batches finish: ``id``, ``chain``, the
prompt, the sample (``output``, ``ids``, ``logp``, ``logq``), that row's own statistics (MH:
``acceptance_rate``, ``proposals``; SMC: ``selected``, ``ess``) and ``run_id``. ``--method scalable``
is scalable power sampling (approximate; ``--variant``, ``--n-candidates``, ``--n-rollouts``,
``--horizon``, ``--n-proposals``, ``--no-jackknife``). Batch totals
(decoded tokens, token-forwards, seconds, ...) are not repeated on rows: they are written once per
batch to OUTPUT.summary.json, with their sums over all batches and the run's configuration.

Resume rule: re-running skips the (id, chain) pairs already saved under the same run_id. OUTPUT
continues only the same configuration (model, dtype, device, every sampler setting, --chains,
--seed, prompt template, version); rows of another configuration are refused (exit 2) naming the
settings that differ; so is an input whose prompt under a saved id differs from the saved one (a
row without ``id`` is identified by its line index). One writer per OUTPUT (an exclusive lock on
OUTPUT.lock). Each batch is seeded from its first id, so a resumed run's samples are valid draws
but not bit-identical to an unbroken run's.
"""
from __future__ import annotations

import argparse
import inspect
import json
import zlib
from pathlib import Path

import torch

from . import __version__
from .errors import ArgumentParser, UserError, reported
from .loading import DTYPE_CHOICES, DTYPE_HELP, device, dtype_name, load_side
from .provenance import RunIdentity, differences, model_identity, text_hash

__all__ = ["main"]


def _defaults(*keys) -> dict:
    """PowerSampler's defaults of the settings ``keys``."""
    from .power import PowerSampler
    params = inspect.signature(PowerSampler.__init__).parameters
    return {k: params[k].default for k in keys}


#: the scalable sampler's settings the --method scalable flags set (defaults: PowerSampler's)
_SCALABLE_KEYS = ("variant", "n_candidates", "n_rollouts", "horizon", "n_proposals", "jackknife")
_SCALABLE = _defaults(*_SCALABLE_KEYS, "prefix_kv")


def _scalable(a) -> dict:
    return {k: getattr(a, k) for k in _SCALABLE_KEYS}


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="hybridfast power-sample", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="JSONL with 'prompt' (used as is) or 'question' (templated), optional 'id'")
    ap.add_argument("output", help="JSONL to append samples to (and OUTPUT.summary.json, OUTPUT.lock)")
    ap.add_argument("--model", default="tiny", help="'tiny', a named model (smollm2-135m), a GGUF file or folder, "
                                                    "a Hugging Face folder or hub id (default: %(default)s)")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    ap.add_argument("--alpha", type=float, default=4.0, help="sample from p^alpha (>= 1; default: %(default)s)")
    ap.add_argument("--block-size", type=int, default=192, help="MH: tokens per block (default: %(default)s)")
    ap.add_argument("--n-mcmc", type=int, default=10, help="MH: Metropolis-Hastings steps per block "
                                                           "(default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=3072, help="tokens per sample (default: %(default)s)")
    ap.add_argument("--top-k", type=int, help="proposal top-k (default: none; 50 with --official)")
    ap.add_argument("--method", default="mh", choices=["mh", "smc", "scalable"],
                    help="block-wise Metropolis-Hastings, Power-SMC or scalable power sampling "
                         "(default: %(default)s)")
    ap.add_argument("--n-particles", "--particles", type=int, default=16,
                    help="SMC: particles per chain (default: %(default)s)")
    ap.add_argument("--variant", default=_SCALABLE["variant"], choices=["token", "block"],
                    help="scalable: one token per decision, or blocks of --block-size (default: %(default)s)")
    ap.add_argument("--n-candidates", type=int, default=_SCALABLE["n_candidates"],
                    help="scalable: candidates K per decision (default: %(default)s)")
    ap.add_argument("--n-rollouts", type=int, default=_SCALABLE["n_rollouts"],
                    help="scalable: rollouts M per candidate (>= 2 with the jackknife; default: %(default)s)")
    ap.add_argument("--horizon", type=int, default=_SCALABLE["horizon"],
                    help="scalable: rollout tokens H at most (default: %(default)s)")
    ap.add_argument("--n-proposals", type=int, default=_SCALABLE["n_proposals"],
                    help="scalable --variant block: proposed blocks L per decision (default: %(default)s)")
    ap.add_argument("--no-jackknife", dest="jackknife", action="store_false",
                    help="scalable: no jackknife bias correction")
    ap.add_argument("--chains", type=int, default=1,
                    help="independent samples per prompt, one row each (default: %(default)s)")
    ap.add_argument("--official", action="store_true", help="the official code's biased procedure")
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch (chains advance together; "
                                                         "default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return ap


def _check_flags(a) -> None:
    for flag, value, least in (("--alpha", a.alpha, 1), ("--block-size", a.block_size, 1), ("--n-mcmc", a.n_mcmc, 0),
                               ("--max-new-tokens", a.max_new_tokens, 1), ("--top-k", a.top_k, 1),
                               ("--n-particles", a.n_particles, 1), ("--chains", a.chains, 1), ("--batch", a.batch, 1),
                               ("--n-candidates", a.n_candidates, 1), ("--n-rollouts", a.n_rollouts, 1),
                               ("--horizon", a.horizon, 1), ("--n-proposals", a.n_proposals, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if a.method == "scalable":
        from .scalable import check_settings
        try:
            check_settings(**_scalable(a), prefix_kv=_SCALABLE["prefix_kv"], vocab_size=None)
        except ValueError as e:
            raise UserError(f"--method scalable: {e}") from None
    dtype_name(a.dtype, a.model)


def _inputs(path) -> list[dict]:
    """The input rows, each with a string ``id`` (its line number when it has none), unique."""
    from .io import read_jsonl
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None
    seen = {}
    for i, r in enumerate(rows):
        r["id"] = str(r.get("id", i))
        if "prompt" not in r and "question" not in r:
            raise UserError(f"{path}:{i + 1}: needs a 'prompt' or 'question' field")
        if r["id"] in seen:
            raise UserError(f"{path}: lines {seen[r['id']]} and {i + 1} have the same id {r['id']!r}")
        seen[r["id"]] = i + 1
    if not rows:
        raise UserError(f"{path} has no prompts")
    return rows


def _run(a) -> RunIdentity:
    """Everything that decides the samples (see the module doc)."""
    from .prompts import POWER_TEMPLATE
    sampler = dict(alpha=a.alpha, block_size=a.block_size, n_mcmc=a.n_mcmc, max_new_tokens=a.max_new_tokens,
                   top_k=a.top_k, method=a.method, official=a.official)
    if a.method == "smc":
        sampler["n_particles"] = a.n_particles
    if a.method == "scalable":
        sampler.update(_scalable(a))
    return RunIdentity(dict(model=model_identity(a.model, "--model"), dtype=dtype_name(a.dtype, a.model),
                            device=device(), sampler=sampler, chains=a.chains, seed=a.seed,
                            prompt=dict(format="power template (rows with 'question')",
                                        template=text_hash(POWER_TEMPLATE)), version=__version__), {})


def _summary_path(output) -> Path:
    return Path(str(output) + ".summary.json")


def _refuse_other_run(rows: list[dict], run: RunIdentity, output, summary: dict) -> None:
    """A :class:`UserError` when ``output`` holds rows of another configuration."""
    other = next((r for r in rows if r.get("run_id") != run.id), None)
    if other is None:
        return
    if other.get("run_id") is None or summary.get("run_id") != other["run_id"]:
        raise UserError(f"{output} holds rows with no recorded configuration (in {_summary_path(output)}); they "
                        f"cannot be continued safely: pass a new output file")
    raise UserError(f"{output} holds rows of run {other['run_id']} and this run ({run.id}) differs in "
                    f"{', '.join(differences(summary['run'], run.config))}; an output file continues only the same "
                    f"configuration: pass a new output file (or the old settings)")


def _read_summary(output) -> dict:
    path = _summary_path(output)
    return json.loads(path.read_text()) if path.exists() else {}


def _add_batch(summary: dict, ids: list[str], totals: dict) -> dict:
    """``summary`` with one more batch's totals, and the sums over all batches."""
    batches = summary["batches"] + [dict(ids=ids, **totals)]
    sums = {k: sum(b.get(k, 0) for b in batches) for k in totals}
    return dict(summary, batches=batches, totals=sums)


def _prompt(row: dict) -> str:
    """The prompt an input row is sampled with: its ``prompt``, else its ``question`` templated."""
    from .prompts import power_prompt
    return row.get("prompt") or power_prompt(row["question"])


def _excerpts(a: str, b: str, width: int = 60) -> tuple[str, str]:
    """``a`` and ``b`` as one-line reprs of at most ``width`` characters each, from just before
    their first difference (``...`` marks a cut)."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, i - 10)

    def cut(s: str) -> str:
        return ("..." if start else "") + repr(s[start: start + width]) + ("..." if len(s) > start + width else "")
    return cut(a), cut(b)


def _refuse_other_prompts(saved: list[dict], rows: list[dict], output, input_path) -> None:
    """A :class:`UserError` when a sample saved in ``output`` has another prompt than the input
    row with its id (a row without ``id`` is identified by its line index, so another input file
    would pair saved samples with the wrong prompts)."""
    prompts = {r["id"]: _prompt(r) for r in rows}
    for s in saved:
        if s["id"] in prompts and s.get("prompt") != prompts[s["id"]]:
            old, new = _excerpts(str(s.get("prompt")), prompts[s["id"]])
            raise UserError(f"{output} holds samples of id {s['id']!r} for the prompt {old}, but {input_path} has "
                            f"the prompt {new} under that id (a row without 'id' is identified by its line index): "
                            f"pass a new output file, or give the rows ids")


def _row_stats(stats: dict, batch_totals: dict) -> dict:
    """The scalar statistics of one sample that are its own (not its batch's totals)."""
    return {k: v for k, v in stats.items() if k not in batch_totals and isinstance(v, (int, float))}


def _sample(a, rows: list[dict], run: RunIdentity) -> int:
    """Sample every (prompt, chain) not yet saved under ``run`` into ``a.output`` (its lock held);
    returns how many prompts were sampled."""
    from .eval import ResultsLog
    from .io import atomic_write_text
    from .power import PowerSampler
    log = ResultsLog(a.output)
    saved, saved_rows = _read_summary(a.output), log.rows()
    _refuse_other_run(saved_rows, run, a.output, saved)
    _refuse_other_prompts(saved_rows, rows, a.output, a.input)
    summary = saved if saved.get("run_id") == run.id else dict(run_id=run.id, run=run.config, batches=[])
    done = {(r["id"], r["chain"]) for r in saved_rows}
    todo = [r for r in rows if any((r["id"], c) not in done for c in range(a.chains))]
    if not todo:
        return 0
    side = load_side(a.model, "base", seed=a.seed, dtype=a.dtype)
    ps = PowerSampler(side.model, alpha=a.alpha, block_size=a.block_size, n_mcmc=a.n_mcmc,
                      max_new_tokens=a.max_new_tokens, top_k=a.top_k, method=a.method,
                      n_particles=a.n_particles, official=a.official, tokenizer=side.tokenizer,
                      **(_scalable(a) if a.method == "scalable" else {}))
    from tqdm.auto import tqdm
    for i in tqdm(range(0, len(todo), a.batch), desc="power-sample"):
        chunk = todo[i: i + a.batch]
        prompts = [_prompt(r) for r in chunk]
        g = torch.Generator(device=ps.m.device).manual_seed(a.seed * 1_000_003 + zlib.crc32(chunk[0]["id"].encode()))
        res = ps.sample(prompts, n_chains=a.chains, generator=g)
        new = []
        for j, x in enumerate(res):
            r, chain = chunk[x.prompt_index], j % a.chains
            if (r["id"], chain) not in done:
                new.append(dict(id=r["id"], chain=chain, prompt=prompts[x.prompt_index], output=x.text, ids=x.ids,
                                logp=x.logp, logq=x.logq, run_id=run.id, **_row_stats(x.stats, ps.last_stats)))
        log.append(new)
        totals = {k: v for k, v in ps.last_stats.items() if isinstance(v, (int, float))}
        summary = _add_batch(summary, [r["id"] for r in chunk], totals)
        atomic_write_text(_summary_path(a.output), json.dumps(summary, indent=1))
    return len(todo)


def main(argv=None):
    from .eval import WriterLock
    a = _parser().parse_args(argv)
    with reported(a.debug):
        _check_flags(a)
        rows = _inputs(a.input)
        run = _run(a)
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        with WriterLock(a.output):
            sampled = _sample(a, rows, run)
    print(f"{sampled} prompts sampled, {len(rows) - sampled} already done -> {a.output} "
          f"(batch totals: {_summary_path(a.output)})")
