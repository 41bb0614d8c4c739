"""Evaluation runs that cannot silently give wrong numbers: a changed configuration, a second
writer or a bad argument is refused (one line, exit status 2) before any model loads; problem
ids come from content; reports count each problem once and never pool runs, splits or graders;
gap recovery compares the problems its three runs share; a flag the method does not use is
refused; a lost answer or an ungradable one never ends in exit status 0; power-sample never pairs
saved samples with another input's prompts."""
import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import pytest

import hybridfast.datasets as datasets
from hybridfast.artifact_settings import OVERRIDE_FLAG
from hybridfast.datasets import load_problems
from hybridfast.eval import FLAG_USERS, METHODS, ResultsLog, main, refuse_unused_flags, report_main, run_eval
from hybridfast.metrics import report_markdown, summarize
from hybridfast.report import sections

from .helpers import error_line, forbid_model_loading, refused


def _cli(*args):
    return [sys.executable, "-m", "hybridfast.cli", "eval", *args]


def _gsm8k_file(path, questions):
    path.write_text("".join(json.dumps(dict(question=q, answer=f"so it is {i}\n#### {i}")) + "\n"
                            for i, q in enumerate(questions)))
    return path


@pytest.fixture
def no_model(monkeypatch):
    forbid_model_loading(monkeypatch)


def test_changed_settings_on_an_existing_out_are_refused_naming_the_key(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    common = ["--method", "base", "--limit", "2", "--batch-size", "2", "--out", str(out)]
    main([*common, "--max-new-tokens", "8"])
    capsys.readouterr()
    before = (out / "results.jsonl").read_text()
    assert before.count("\n") == 2
    # the real command: exit status 2, one line naming the key, both values and the way out
    r = subprocess.run(_cli(*common, "--max-new-tokens", "16"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = error_line(r.stderr)
    assert "differs in generate.max_new_tokens: 8 -> 16;" in line and "pass a new --out" in line
    forbid_model_loading(monkeypatch)
    line = refused([*common, "--max-new-tokens", "8", "--seed", "1"], capsys)
    assert "differs in seed: 0 -> 1;" in line and "max_new_tokens" not in line
    assert (out / "results.jsonl").read_text() == before
    main([*common, "--max-new-tokens", "8"])            # the identical configuration continues
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 2
    assert (out / "results.jsonl").read_text() == before


def test_two_path_files_into_one_out_are_both_evaluated(tmp_path, monkeypatch):
    a = _gsm8k_file(tmp_path / "a.jsonl", ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"])
    b = _gsm8k_file(tmp_path / "b.jsonl", ["What is 4 + 4?", "What is 5 + 5?"])
    out = tmp_path / "run"
    kw = dict(out=out, batch_size=3, max_new_tokens=4, progress=False)
    run_eval("base", path=str(a), **kw)
    s = run_eval("base", path=str(b), **kw)
    rows = ResultsLog(out / "results.jsonl").rows()
    assert len(rows) == 5 and len({r["problem"] for r in rows}) == 5
    assert s["methods"]["base"]["n"] == 5 and len({r["run_id"] for r in rows}) == 1
    sha = {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in (a, b)}
    assert sorted(r["run"]["data"]["location"] for r in rows) == [str(a)] * 3 + [str(b)] * 2
    assert all(r["run"]["data"]["sha256"] == sha[r["run"]["data"]["location"]] for r in rows)
    # ids do not move with --offset: problems 2 and 3 of a.jsonl are saved already, no model is needed
    forbid_model_loading(monkeypatch)
    assert run_eval("base", path=str(a), offset=1, limit=2, **kw)["methods"]["base"]["n"] == 5
    assert len(ResultsLog(out / "results.jsonl").rows()) == 5


def test_second_writer_is_refused_naming_the_holder_and_ctrl_c_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    log = out / "results.jsonl"
    args = ["--method", "base", "--limit", "40", "--batch-size", "1", "--max-new-tokens", "48", "--out", str(out)]
    first = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (log.exists() and log.read_text().count("\n") >= 1) and time.time() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)          # paused mid-run, holding the lock
        assert (out / "results.jsonl.lock").read_text().startswith(f"pid {first.pid}, started ")
        second = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        line = error_line(second.stderr)
        assert f"{log} is being written by another run (pid {first.pid}, started 20" in line
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, err[-2000:]
    saved = len(ResultsLog(log).rows())
    assert 1 <= saved < 40
    m = re.search(r"^hybridfast: interrupted: (\d+) of 40 problems of run \w+ are saved in (.+); "
                  r"resume with: hybridfast eval (.+)$", err, re.M)
    assert m, err[-2000:]
    assert int(m.group(1)) == saved and m.group(2) == str(log) and m.group(3).split() == args


@pytest.mark.parametrize("args,message", [
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--limit", "-1"], "--limit must be >= 1, got -1"),
    (["--offset", "-1"], "--offset must be >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--path", "{tmp}/empty.jsonl"], "{tmp}/empty.jsonl: the dataset has no problems"),
    (["--path", "{tmp}/two.jsonl", "--offset", "2"], "--offset 2 selects no problems: {tmp}/two.jsonl has 2"),
    (["--path", "{tmp}/missing.jsonl"], "{tmp}/missing.jsonl: No such file or directory"),
    (["--out", "{tmp}/a-file/run"], "--out {tmp}/a-file/run is not writable ({tmp}/a-file/run: Not a directory)"),
    (["--out", "{tmp}/a-file"], "--out {tmp}/a-file is a file, not a folder"),
    (["--model", "{tmp}/no/such/model"], "--model {tmp}/no/such/model: no such file or directory"),
    (["--method", "thinking", "--model", "org/base-model"], "--method thinking needs --thinking"),
])
def test_bad_arguments_exit_2_before_loading_a_model(tmp_path, capsys, no_model, args, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    _gsm8k_file(tmp_path / "two.jsonl", ["What is 1 + 1?", "What is 2 + 2?"])
    (tmp_path / "a-file").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    argv = ["--method", "base", "--out", str(tmp_path / "run"), *args]
    assert refused(argv, capsys).startswith("hybridfast: error: " + message.format(tmp=tmp_path))
    assert not (tmp_path / "run").exists()


def test_cli_error_is_one_line_and_debug_adds_the_traceback(tmp_path):
    bad = ["--method", "base", "--limit", "0", "--out", str(tmp_path / "run")]
    r = subprocess.run(_cli(*bad), capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stderr) == (2, "hybridfast: error: --limit must be >= 1, got 0\n")
    r = subprocess.run(_cli(*bad, "--debug"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("Traceback")
    assert r.stderr.endswith("hybridfast: error: --limit must be >= 1, got 0\n")
    r = subprocess.run(_cli("--method", "base", "--limit", "x"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "argument --limit: invalid int value: 'x'" in error_line(r.stderr)
    assert not (tmp_path / "run").exists()


def test_report_counts_each_problem_once_and_never_pools_runs(tmp_path):
    out = tmp_path / "run"
    run_eval("base", out=out, limit=3, batch_size=3, max_new_tokens=4, progress=False)
    log = ResultsLog(out / "results.jsonl")
    rows = log.rows()
    log.append(rows)                                                   # a duplicated append
    log.append([dict(r, run_id="0123456789ab") for r in rows[:2]])    # another run's rows, merged in
    report_main([str(out)])
    report = (out / "report.md").read_text()
    table = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines()
             if line.startswith("| gsm8k |")]
    assert sorted((c[1], c[2], c[3], c[4]) for c in table) == sorted([("test", "base", rows[0]["run_id"], "3"),
                                                                      ("test", "base", "0123456789ab", "2")])
    assert "3 duplicate rows" in report


def test_problem_ids_come_from_content_and_the_bundled_fallback_is_announced(tmp_path, monkeypatch, capsys):
    f = _gsm8k_file(tmp_path / "q.jsonl", ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"])
    ids = [p["id"] for p in load_problems("gsm8k", path=str(f))]
    assert [p["id"] for p in load_problems("gsm8k", path=str(f), offset=1, limit=2)] == ids[1:]
    assert ids[0] == "gsm8k-" + hashlib.sha256(b"What is 1 + 1?").hexdigest()[:12]
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps(dict(problem="1+1?", answer="2", unique_id="test/algebra/1.json")) + "\n")
    assert [p["id"] for p in load_problems("math500", path=str(m))] == ["test/algebra/1.json"]
    _gsm8k_file(f, ["What is 1 + 1?", "What is 1 + 1?"])
    with pytest.raises(ValueError, match="rows 1 and 2 are the same problem"):
        load_problems("gsm8k", path=str(f))
    monkeypatch.setattr(datasets, "find_data_dir", lambda: None)
    assert len(load_problems("gsm8k", "test")) == 40
    assert ("using the bundled 40-problem sample hybridfast/data/gsm8k_test_sample.jsonl"
            in capsys.readouterr().err)


# ------------------------------------------------------------------------------ summaries that never pool

def _row(problem, method, correct, **fields):
    return dict(dict(problem=str(problem), method=method, dataset="gsm8k", correct=correct, extracted="1", tokens=5,
                     steered_tokens=0), **fields)


def test_gap_recovery_uses_only_the_problems_all_three_share():
    # base and thinking on 10 problems, the hybrid on the first 5 (another --limit into the same --out)
    rows = ([_row(i, "base", i < 2) for i in range(10)] + [_row(i, "thinking", i < 8) for i in range(10)]
            + [_row(i, "hybrid-paper", i < 4) for i in range(5)])
    s = summarize(rows)
    # on problems 0-4: base 2/5, thinking 5/5, hybrid 4/5 -> (0.8 - 0.4) / 0.6 (pooled: (0.8 - 0.2) / 0.6 = 1)
    assert s["gap_recovery"]["hybrid-paper"] == pytest.approx(2 / 3)
    assert s["gap_recovery_n"]["hybrid-paper"] == 5
    assert "hybrid-paper: 66.7% (on the 5 problems it shares with base and thinking)" in report_markdown(s)
    s = summarize(rows[:20] + [_row(f"x{i}", "hybrid-paper", True) for i in range(3)])
    assert s["gap_recovery"]["hybrid-paper"] is None and s["gap_recovery_n"]["hybrid-paper"] == 0
    assert s["gap_recovery_na"]["hybrid-paper"] == "base, thinking and the hybrid share no problem"
    assert "hybrid-paper: n/a (base, thinking and the hybrid share no problem)" in report_markdown(s)


def test_runs_on_two_splits_are_two_entries():
    run = lambda split: dict(run_id="abc", run=dict(method="base", data=dict(name="gsm8k", split=split)))  # noqa: E731
    rows = ([_row(i, "base", i < 3, **run("train")) for i in range(4)]
            + [_row(i, "base", i < 1, **run("test")) for i in range(4)]
            + [_row(9, "base", True)])                 # a row of an older eval: no run recorded
    s = summarize(rows)
    assert s["duplicates"] == 0
    assert {label: (e["split"], e["n"], e["accuracy"]) for label, e in s["methods"].items()} == {
        "base [gsm8k train abc]": ("train", 4, 0.75), "base [gsm8k test abc]": ("test", 4, 0.25),
        "base [gsm8k - -]": (None, 1, 1.0)}
    views = sections(rows, s)
    assert {r["run"]["data"]["split"] for r in views["base [gsm8k train abc]"]} == {"train"}
    assert [len(v) for v in views.values()] == [e["n"] for e in s["methods"].values()]
    assert "| gsm8k | train | base | abc | 4 | 0.750 |" in report_markdown(s)


def test_grade_errors_are_counted_and_graders_never_pooled():
    def graded(error=None, grader="gsm8k-numeric/2"):
        return dict(run_id="abc", grader=grader, grade_error=error)
    rows = [_row(0, "base", True, **graded()), _row(1, "base", False, **graded("math-verify timed out")),
            _row(2, "thinking", True)]                 # a row of an older eval: no grading fields
    s = summarize(rows)
    assert s["methods"]["base"]["grade_errors"] == 1 and s["methods"]["thinking"]["grade_errors"] == 0
    assert "could not be graded (counted as wrong; see each row's grade_error): base: 1" in report_markdown(s)
    with pytest.raises(ValueError, match=r"run abc \(base, gsm8k\) holds rows graded by different graders "
                                         r"\(gsm8k-numeric/1, gsm8k-numeric/2\).*`hybridfast regrade runs/x`"):
        summarize(rows + [_row(3, "base", True, **graded(grader="gsm8k-numeric/1"))], run_dir="runs/x")
    with pytest.raises(ValueError, match=r"different graders \(None, gsm8k-numeric/2\)"):
        summarize(rows + [_row(3, "base", True, run_id="abc")])


def test_eval_exits_1_when_answers_of_its_run_could_not_be_graded(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["--method", "base", "--limit", "2", "--batch-size", "2", "--max-new-tokens", "2", "--out", str(out)]
    main(args)                                        # every answer graded: no exit status 1
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["grade_errors"] == 0
    results = out / "results.jsonl"
    rows = ResultsLog(results).rows()
    rows[1].update(correct=False, grade_error="math-verify timed out after 5 s")
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    forbid_model_loading(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out.splitlines()[-1])["grade_errors"] == 1
    assert f"1 of the 2 answers of run {rows[0]['run_id']} could not be graded" in cap.err
    assert f"hybridfast regrade {out}`" in cap.err
    assert json.loads((out / "summary.json").read_text())["methods"]["base"]["grade_errors"] == 1
    rows[0]["grader"] = "an-older-grader/1"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = refused(args, capsys)                      # resuming: refused before any model loads
    assert "has rows graded by an-older-grader/1" in line and f"hybridfast regrade {out}` first" in line
    line = refused([str(out)], capsys, entry=report_main)      # the summary never pools graders
    assert "holds rows graded by different graders (" in line and f"hybridfast regrade {out}`" in line


def test_a_problem_left_without_a_row_is_an_error_not_a_smaller_n(tmp_path, monkeypatch):
    f = _gsm8k_file(tmp_path / "q.jsonl", ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"])
    ids = [p["id"] for p in load_problems("gsm8k", path=str(f))]
    out = tmp_path / "run"
    kw = dict(path=str(f), out=out, batch_size=3, max_new_tokens=2, progress=False)
    append = ResultsLog.append                        # a writer that loses one answer
    monkeypatch.setattr(ResultsLog, "append",
                        lambda self, rows: append(self, [r for r in rows if r["problem"] != ids[1]]))
    with pytest.raises(RuntimeError, match=rf"run \w+: 1 of the 3 problems asked for have no row in .*"
                                           rf"\(first: {ids[1]}\); summary.json was not updated"):
        run_eval("base", **kw)
    assert not (out / "summary.json").exists()
    monkeypatch.undo()
    assert run_eval("base", **kw)["methods"]["base"]["n"] == 3      # the same command completes it


# ------------------------------------------------------------------------------ flags a method does not use

@pytest.mark.parametrize("args,message", [
    (["--method", "power-mh", "--variant", "block"],
     "--variant is not used by --method power-mh (only by power-scalable, power-hybrid-scalable): drop it"),
    (["--method", "power-mh", "--n-particles", "8"], "--n-particles is not used by --method power-mh"),
    (["--method", "power-smc", "--n-mcmc", "2"], "--n-mcmc is not used by --method power-smc"),
    (["--method", "base", "--alpha", "4"], "--alpha is not used by --method base"),      # the default value, given
    (["--method", "low-temp", "--alpha", "2"], "--alpha is not used by --method low-temp"),
    (["--method", "base", "--thinking", "org/thinker"], "--thinking is not used by --method base"),
    (["--method", "power-mh", "--sae", "s", "--vectors", "v"], "--sae is not used by --method power-mh"),
    (["--method", "thinking", "--override-artifact-settings"],
     "--override-artifact-settings is not used by --method thinking"),
    (["--method", "base", "--power-template", "Q: {q}"], "--power-template is not used by --method base"),
    (["--method", "power-mh", "--base-template", "Q: {q}"], "--base-template is not used by --method power-mh"),
    (["--method", "power-scalable", "--block-size", "2"],
     "--block-size is used by --method power-scalable only with --variant block (this run: --variant token)"),
    (["--method", "power-scalable", "--n-proposals", "4"], "--n-proposals is used by --method power-scalable only"),
])
def test_a_flag_the_method_does_not_use_is_refused(tmp_path, capsys, no_model, args, message):
    line = refused([*args, "--out", str(tmp_path / "run")], capsys)
    assert line.startswith("hybridfast: error: " + message), line
    assert not (tmp_path / "run").exists()


def test_the_flags_a_method_uses_pass():
    refuse_unused_flags("power-mh", {"--alpha": 5.0, "--n-mcmc": 3, "--block-size": 2, "--n-particles": None}, None)
    refuse_unused_flags("power-hybrid-smc", {"--alpha": 2.0, "--n-particles": 3, "--sae": "s", "--thinking": "t"}, None)
    refuse_unused_flags("power-scalable", {"--block-size": 2, "--n-proposals": 8, "--no-jackknife": False}, "block")
    refuse_unused_flags("base", {"--base-template": "Q: {q}", OVERRIDE_FLAG: None}, None)
    assert set(FLAG_USERS["--thinking"]) == {m for m in METHODS if m == "thinking" or "hybrid" in m}


# ------------------------------------------------------------------------------ power-sample resume

def test_power_sample_refuses_another_input_under_saved_ids(tmp_path, capsys):
    from hybridfast.power_cli import main as power_main
    first, other, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "out.jsonl"
    first.write_text('{"question": "What is 2+2?"}\n{"prompt": "Hello"}\n')
    other.write_text('{"question": "What is 3+3?"}\n{"prompt": "Hello"}\n')      # ids 0 and 1 again
    args = ["--max-new-tokens", "2", "--block-size", "1", "--n-mcmc", "0", "--batch", "2"]
    power_main([str(first), str(out), *args])
    capsys.readouterr()
    before = out.read_text()
    line = refused([str(other), str(out), *args], capsys, power_main)
    assert f"{out} holds samples of id '0' for the prompt " in line and f"but {other} has the prompt " in line
    assert "What is 2+2?" in line and "What is 3+3?" in line
    assert out.read_text() == before
    power_main([str(first), str(out), *args])                        # the same input continues
    assert capsys.readouterr().out.startswith("0 prompts sampled, 2 already done")


def test_math_without_math_verify_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps(dict(problem="1+1?", answer="2", unique_id="test/algebra/1.json")) + "\n")
    forbid_model_loading(monkeypatch)
    monkeypatch.setitem(sys.modules, "math_verify", None)       # import fails
    line = refused(["--method", "base", "--data", "math500", "--path", str(m), "--out", str(tmp_path / "o")], capsys)
    assert "grading math500 needs math-verify" in line


def test_a_gsm8k_gold_that_is_not_a_number_is_refused_when_loading(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps(dict(question="What is 1 + 1?", answer="so\n#### 2")) + "\n"
                 + json.dumps(dict(question="How much?", answer="so\n#### 72 dollars")) + "\n")
    with pytest.raises(ValueError, match=r"row 2: GSM8K answer after '####' is not a number: '72 dollars'"):
        load_problems("gsm8k", path=str(f))
    f.write_text(json.dumps(dict(question="How much?", answer=72)) + "\n")
    with pytest.raises(ValueError, match="row 1: GSM8K answer has no '####' marker: '72'"):
        load_problems("gsm8k", path=str(f))


def test_a_limit_past_the_end_of_the_file_is_announced(tmp_path, capsys):
    f = _gsm8k_file(tmp_path / "q.jsonl", ["What is 1 + 1?", "What is 2 + 2?"])
    s = run_eval("base", path=str(f), limit=5, max_new_tokens=2, out=tmp_path / "o", progress=False)
    assert s["methods"]["base"]["n"] == 2
    assert f"--limit 5 from --offset 0 selects 2 problems: {f} has 2" in capsys.readouterr().err


def test_resuming_rows_of_an_older_grader_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    from hybridfast.errors import UserError
    f = _gsm8k_file(tmp_path / "q.jsonl", ["What is 1 + 1?", "What is 2 + 2?"])
    kw = dict(path=str(f), max_new_tokens=2, out=tmp_path / "o", progress=False)
    run_eval("base", limit=1, **kw)
    log = tmp_path / "o" / "results.jsonl"
    log.write_text(log.read_text().replace('"grader": "gsm8k-numeric/', '"grader": "gsm8k-numeric/old-'))
    forbid_model_loading(monkeypatch)
    with pytest.raises(UserError, match=r"graded by gsm8k-numeric/old-\d+; .*hybridfast regrade"):
        run_eval("base", limit=2, **kw)
