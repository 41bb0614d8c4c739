"""Deterministic answer extraction and grading (DESIGN.md section 4).

GSM8K: prediction = last ``\\boxed{}``, else "The answer is N", else the last number; numeric
compare with commas stripped. MATH: last ``\\boxed{}`` (else "answer is ...", else last number)
verified with ``math-verify`` (``verify(gold, pred)``, gold first) when installed, in a worker
process with a per-item timeout, so a pathological answer can neither hang nor kill a run;
without it, a normalised string comparison (reported in the summary as the grader used).
"""
from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["extract_answer", "grade", "last_boxed", "math_grader_name"]

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1: k].strip()
    return None


def extract_answer(dataset: str, text: str) -> str | None:
    """The final answer in a model's output, or None when there is none."""
    b = last_boxed(text)
    if b is not None:
        return b
    m = re.findall(r"[Tt]he (?:final )?answer is[:\s]*\$?([^\n$]+)", text)
    if m:
        ans = m[-1].strip().rstrip(".")
        if dataset == "gsm8k":
            nums = _NUM.findall(ans)
            return nums[0].replace(",", "") if nums else None
        return ans
    nums = _NUM.findall(text)
    return nums[-1].replace(",", "") if nums else None


def _to_number(s: str):
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def math_grader_name() -> str:
    try:
        import math_verify  # noqa: F401
        return "math-verify"
    except ImportError:
        return "normalised-string"


def _norm(s: str) -> str:
    s = s.replace(" ", "").replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").rstrip(".")
    return s


def _mv_worker(gold, pred, q):
    try:
        from math_verify import parse, verify
        q.put(bool(verify(parse(f"${gold}$"), parse(f"${pred}$"))))
    except Exception:  # noqa: BLE001
        q.put(False)


def grade(dataset: str, prediction: str | None, gold: str, timeout: float = 10.0) -> bool:
    if prediction is None:
        return False
    if dataset == "gsm8k":
        a, b = _to_number(prediction), _to_number(gold)
        return a is not None and b is not None and a == b
    if _norm(prediction) == _norm(gold):
        return True
    if math_grader_name() != "math-verify":
        return False
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_mv_worker, args=(gold, prediction, q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return False
    return bool(q.get()) if not q.empty() else False
