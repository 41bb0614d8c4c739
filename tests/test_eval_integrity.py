"""Evaluation runs that cannot silently give wrong numbers: a changed configuration, a second
writer or a bad argument is refused (one line, exit status 2) before any model loads; problem
ids come from content; reports count each problem once and never pool runs."""
import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import pytest

import hybridfast.datasets as datasets
from hybridfast.datasets import load_problems
from hybridfast.eval import ResultsLog, main, report_main, run_eval

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
    assert sorted((c[1], c[2], c[3]) for c in table) == sorted([("base", rows[0]["run_id"], "3"),
                                                                ("base", "0123456789ab", "2")])
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
