"""Answer extraction and grading: GSM8K numbers in TeX dressing, the last complete boxed answer,
math-verify in a worker whose failures are grading errors (never wrong answers), and regrading a
run folder in place."""
import json
import subprocess
import sys

import pytest

from hybridfast.eval import grade_rows
from hybridfast.grading import GRADER_VERSION, GradingError, extract_answer, grade, grade_fields, grader_name, \
    last_boxed
from hybridfast.regrade import regrade


@pytest.mark.parametrize("text,ans", [
    ("so the total is 1,234 dollars", "1234"),
    ("The answer is 42.", "42"),
    ("we get \\boxed{17} and then 3", "17"),
    ("no digits here", None),
    # a boxed GSM8K answer is read as a number whatever TeX surrounds it
    ("\\boxed{\\$18}", "18"),
    ("\\boxed{18\\%}", "18"),
    ("\\boxed{18 \\text{ apples}}", "18"),
    ("\\boxed{1{,}000}", "1000"),
    ("\\boxed{1,234.50}", "1234.50"),
    ("\\boxed{-5}", "-5"),
    ("\\boxed{2 \\times 9 = 18}", "18"),
    ("\\boxed{\\frac{7}{2}}", "7/2"),
    ("\\boxed{5\\frac{1}{2}}", "11/2"),                  # a mixed number, not 51/2
    ("\\boxed{-2 \\dfrac{1}{4}}", "-9/4"),
    ("\\boxed{many}", "many"),                           # an answer, not a number: graded wrong
    # the last complete, non-empty boxed answer
    ("so \\boxed{18}. Next problem: put the answer within \\boxed{}.", "18"),
    ("so \\boxed{18}. Then \\boxed{2", "18"),
    # "The answer is" without a number falls through to the last number
    ("The answer is unclear.\nWe had 3 apples, then 5", "5"),
    ("The answer is \\$18 per day", "18"),
    # cut off at the token limit: the last "The answer is" that states a number
    ("Step 1. The answer is 67.\n\nStep 1. The answer is 67.\n\nStep 1. The answer is ", "67"),
])
def test_gsm8k_extraction(text, ans):
    assert extract_answer("gsm8k", text) == ans


def test_math_extraction():
    assert extract_answer("math500", "x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert extract_answer("math500", "The answer is \\frac{1}{2}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{a} \\boxed{ } \\boxed{\\sqrt{2}") == "a"
    assert last_boxed("no box") is None


def test_gsm8k_grading():
    assert grade("gsm8k", "18.0", "18") and grade("gsm8k", "7/2", "3.5")
    assert not grade("gsm8k", "17", "18") and not grade("gsm8k", None, "1") and not grade("gsm8k", "many", "1")
    with pytest.raises(GradingError, match="'eighteen' is not a number"):
        grade("gsm8k", "18", "eighteen")
    assert grader_name("gsm8k") == f"gsm8k-numeric/{GRADER_VERSION}"


def test_math_grading_uses_math_verify():
    assert grade("math500", "\\dfrac{1}{2}", "\\frac{1}{2}")
    assert grade("math500", "0.5", "\\frac{1}{2}")           # a string comparison would say no
    assert not grade("math500", "3", "\\frac{1}{2}")
    assert grader_name("math500").startswith("math-verify-")


def test_math_grading_failures_are_errors_not_wrong_answers():
    with pytest.raises(GradingError, match="timed out"):
        grade("math500", "(x+1)^2", "x^2+2x+1", timeout=0)
    assert grade("math500", "(x+1)^2", "x^2+2x+1")       # the worker restarts after a timeout
    f = grade_fields("math500", "so \\boxed{(x+1)^2}", "x^2+2x+1")
    assert (f["correct"], f["grade_error"], f["extracted"]) == (True, None, "(x+1)^2")


def test_math_without_math_verify_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)       # import fails
    with pytest.raises(GradingError, match="needs math-verify"):
        grader_name("math500")
    f = grade_fields("math500", "\\boxed{3}", "3")
    assert not f["correct"] and "needs math-verify" in f["grade_error"] and f["grader"] is None


def _rows(outputs, golds, dataset="gsm8k"):
    problems = [dict(id=f"p{i}", question=f"q{i}", gold=g) for i, g in enumerate(golds)]
    outs = [dict(output=o, tokens=3, steered_tokens=0) for o in outputs]
    return grade_rows(dataset, problems, outs, "base", 1.0)


def test_regrade_rewrites_rows_graded_by_an_older_grader(tmp_path):
    rows = _rows(["so \\boxed{\\$18}", "it is 7", "\\boxed{4}"], ["18", "7", "5"])
    assert [r["correct"] for r in rows] == [True, True, False]
    assert {r["grader"] for r in rows} == {f"gsm8k-numeric/{GRADER_VERSION}"}
    old = [dict(r, correct=False, extracted="\\$18") if i == 0 else dict(r) for i, r in enumerate(rows)]
    for r in old:                                  # rows written before graders were recorded
        del r["grader"], r["grade_error"]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    c = regrade(tmp_path)
    assert (c["rows"], c["changed"], c["grade_errors"]) == (3, 1, 0)
    new = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert new == rows
    assert json.loads((tmp_path / "summary.json").read_text())["methods"]["base"]["accuracy"] == pytest.approx(2 / 3)


def test_regrade_command_exits_1_on_grading_errors(tmp_path):
    rows = _rows(["\\boxed{3}"], ["three"])
    assert rows[0]["grade_error"] is not None and rows[0]["correct"] is False
    (tmp_path / "results.jsonl").write_text(json.dumps(rows[0]) + "\n")
    r = subprocess.run([sys.executable, "-m", "hybridfast.cli", "regrade", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "1 could not be graded" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "hybridfast.cli", "regrade", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "nowhere/results.jsonl: no such file" in r.stderr


def test_regrade_keeps_the_summary_and_refuses_a_missing_grader(tmp_path, monkeypatch):
    from hybridfast.errors import UserError
    rows = _rows(["\\boxed{3}"], ["3"])
    (tmp_path / "results.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps(dict(models="smollm2 as both sides", stages_seconds={"a": 1})))
    regrade(tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["models"] == "smollm2 as both sides" and s["methods"]["base"]["accuracy"] == 1.0
    math = _rows(["\\boxed{\\frac12}"], ["\\frac{1}{2}"], dataset="math500")
    assert math[0]["correct"] and math[0]["grader"].startswith("math-verify-")
    text = json.dumps(math[0]) + "\n"
    (tmp_path / "results.jsonl").write_text(text)
    monkeypatch.setitem(sys.modules, "math_verify", None)       # import fails
    with pytest.raises(UserError, match="needs math-verify"):
        regrade(tmp_path)
    assert (tmp_path / "results.jsonl").read_text() == text       # good grades left as they were
