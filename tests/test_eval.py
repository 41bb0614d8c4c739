"""Evaluation harness: resumable after kill -9, Ray sharding equals a single process."""
import signal
import subprocess
import sys
import time

import pytest

from hybridfast.eval import ResultsLog, run_eval
from hybridfast.metrics import summarize

from .helpers import steering_artifacts

ARGS = ["--method", "base", "--limit", "6", "--batch-size", "1", "--max-new-tokens", "24"]


def _cli(out, *extra):
    return [sys.executable, "-m", "hybridfast.cli", "eval", *ARGS, "--out", str(out), *extra]


def _rows(out):
    return sorted(ResultsLog(out / "results.jsonl").rows(), key=lambda r: r["problem"])


def test_kill_and_resume_never_loses_or_duplicates(tmp_path):
    ref = tmp_path / "ref"
    r = subprocess.run(_cli(ref), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    full = _rows(ref)
    assert len(full) == 6
    run = tmp_path / "run"
    p = subprocess.Popen(_cli(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:          # kill -9 once some (not all) results are written
        if log.exists() and 1 <= log.read_text().count("\n") < 6:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = log.read_text().count("\n")
    assert 1 <= partial < 6, partial
    with open(log, "a") as f:              # and a torn line, as a kill mid-write leaves
        f.write('{"problem": "gsm8k-test-5", "meth')
    r = subprocess.run(_cli(run), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "repaired a torn last line" in r.stdout
    got = _rows(run)
    assert [x["problem"] for x in got] == [x["problem"] for x in full]      # none lost or doubled
    strip = lambda rows: [{k: v for k, v in x.items() if k != "seconds"} for x in rows]  # noqa: E731
    assert strip(got) == strip(full)                                          # and identical


def test_ray_two_workers_equals_single_process(tmp_path):
    pytest.importorskip("ray")
    kw = dict(limit=4, batch_size=2, max_new_tokens=16, progress=False)
    run_eval("base", out=tmp_path / "single", **kw)
    run_eval("base", out=tmp_path / "ray", use_ray=True, workers=2, **kw)
    import ray
    ray.shutdown()
    strip = lambda rows: [{k: v for k, v in x.items() if k != "seconds"} for x in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "ray")) == strip(_rows(tmp_path / "single"))


def test_summary_gap_recovery_and_intervals():
    rows = [dict(problem=str(i), method=m, correct=c, extracted="1", tokens=10, steered_tokens=s)
            for i in range(10) for m, c, s in (("base", i < 2, 0), ("thinking", i < 8, 0),
                                               ("hybrid-paper", i < 5, 2))]
    s = summarize(rows)
    assert s["methods"]["base"]["accuracy"] == 0.2 and s["methods"]["thinking"]["accuracy"] == 0.8
    assert abs(s["gap_recovery"]["hybrid-paper"] - 0.5) < 1e-9
    lo, hi = s["methods"]["hybrid-paper"]["ci95"]
    assert lo < 0.5 < hi
    assert abs(s["methods"]["hybrid-paper"]["steered_fraction"] - 0.2) < 1e-12


@pytest.mark.parametrize("method", ["base", "hybrid-routed"])
def test_continuous_batching_does_not_change_greedy_answers(tmp_path, method):
    """--batch-size is the scheduler's rows: 2 rows refilled as problems end give the rows of
    one row per problem, and rows are written as groups finish."""
    kw = dict(limit=5, max_new_tokens=20, progress=False, model="tiny")
    if method == "hybrid-routed":
        kw.update(zip(("sae_dir", "vectors_dir"), steering_artifacts(tmp_path)))
    run_eval(method, out=tmp_path / "wide", batch_size=5, **kw)
    run_eval(method, out=tmp_path / "narrow", batch_size=2, **kw)
    strip = lambda rows: [{k: v for k, v in x.items() if k != "seconds"} for x in rows]  # noqa: E731
    wide, narrow = _rows(tmp_path / "wide"), _rows(tmp_path / "narrow")
    assert len(wide) == 5 and strip(narrow) == strip(wide)


def test_power_template_is_used_and_recorded(tmp_path):
    """--power-template replaces the paper's boxed-answer prompt of low-temp and the power
    methods (SmolLM2 ends that prompt with EOS at once) and is part of the run."""
    from hybridfast.errors import UserError
    from hybridfast.provenance import text_hash
    kw = dict(limit=1, max_new_tokens=4, progress=False, model="tiny")
    run_eval("low-temp", out=tmp_path / "a", **kw)
    run_eval("low-temp", out=tmp_path / "b", power_template="Q: {q}\nA:", **kw)
    a, b = _rows(tmp_path / "a")[0], _rows(tmp_path / "b")[0]
    assert b["run"]["prompts"]["power"]["template"] == text_hash("Q: {q}\nA:")
    assert a["run_id"] != b["run_id"]
    with pytest.raises(UserError, match="--power-template must contain"):
        run_eval("power-mh", out=tmp_path / "c", power_template="no field", **kw)


def test_batches_and_shards_draw_from_different_streams(monkeypatch):
    """Scalable batches share one generator (a fresh one per batch would repeat its noise), and
    shard i > 0 of a Ray run seeds its stream differently from shard 0."""
    import torch
    from hybridfast.engine import Engine
    from hybridfast.eval import Models, make_method, method_params, stream_seed
    from hybridfast.power import PowerSampler
    from hybridfast.tiny import tiny_pair, tiny_tokenizer
    tok = tiny_tokenizer()
    models = Models(tiny_pair(tok, seed=0)[0], tok)
    problems = [dict(id=str(i), question=f"What is {i} + 1?", gold=str(i + 1)) for i in range(3)]
    seen = []

    def spy(orig):
        def wrapped(self, *a, generator=None, **k):
            seen.append(generator.get_state().clone())
            return orig(self, *a, generator=generator, **k)
        return wrapped
    monkeypatch.setattr(PowerSampler, "sample", spy(PowerSampler.sample))
    monkeypatch.setattr(Engine, "stream", spy(Engine.stream))
    params = method_params("power-scalable", max_new_tokens=2, seed=0,
                           scalable=dict(n_candidates=2, n_rollouts=2, horizon=1))
    for _ in make_method("power-scalable", models, params=params)(problems, 1):
        pass
    assert len(seen) == 3 and not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    seen.clear()
    params = method_params("low-temp", max_new_tokens=2, seed=7)
    for shard in (0, 1, 0):
        for _ in make_method("low-temp", models, params=params, shard=shard)(problems[:1], 1):
            pass
    assert torch.equal(seen[0], seen[2]) and not torch.equal(seen[0], seen[1])
    assert stream_seed(7, 0) == 7 and len({stream_seed(7, i) for i in range(8)}) == 8
