"""Deterministic answer extraction and grading (DESIGN.md section 4).

Extraction: the last complete, non-empty ``\\boxed{}``, else the last "The answer is ..." that
states one (GSM8K: a number; an answer cut off at the token limit does not), else the last
number. GSM8K compares numbers: a boxed answer is read as a number after its TeX dressing
(``\\$``, ``\\%``, ``{,}``, ``\\text{...}``, ``\\frac{a}{b}``, ``n\\frac{a}{b}``) is removed, and when it is
not one number, its last number is taken. MATH compares with ``math-verify`` (``verify(gold,
pred)``, gold first) in a long-lived worker process (a fresh interpreter: never ``fork`` from a
threaded torch process), with math-verify's own signal timeouts off and a per-item timeout here
instead: a timeout depends on the machine's load, so it is never read as a wrong answer.

:func:`grade` returns True or False for an answer it could judge and raises
:class:`GradingError` when it could not (math-verify missing, timed out, crashed, or unable to
parse the gold answer). :func:`grader_name` names the grader and :data:`GRADER_VERSION`, which
every result row records, so rows graded by different rules are never pooled.
"""
from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
from fractions import Fraction

__all__ = ["GRADER_VERSION", "GradingError", "boxed_answers", "extract_answer", "grade", "grade_fields",
           "grader_name", "gsm8k_number", "last_boxed"]

#: bumped whenever extraction or comparison changes what a stored output grades as
GRADER_VERSION = 3

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is[:\s]*\$?([^\n$]+)")
_MIXED = re.compile(r"(-?)(\d+)\s*\\d?t?frac\{(\d+)\}\{(\d+)\}")     # 5\frac{1}{2} = 11/2
#: TeX around a GSM8K number: removed (or rewritten) before the number is read
_TEX_DRESSING = [(re.compile(r"\\text\{[^{}]*\}"), ""),
                 (_MIXED, lambda m: f"{m[1]}{int(m[2]) * int(m[4]) + int(m[3])}/{m[4]}"),
                 (re.compile(r"\\d?t?frac\{(-?\d+)\}\{(-?\d+)\}"), r"\1/\2"),
                 (re.compile(r"\{,\}"), ","), (re.compile(r"\\[$%,!; ]|[$%]"), "")]


class GradingError(RuntimeError):
    """An answer could not be graded (not the same as a wrong answer)."""


def boxed_answers(text: str) -> list[str]:
    """The contents of every complete ``\\boxed{...}`` in ``text``, in order (an unclosed one at
    the end, as at a token limit, is left out)."""
    out, i = [], text.find("\\boxed")
    while i >= 0:
        j = text.find("{", i)
        if j < 0:
            break
        depth, k = 0, j
        while k < len(text):
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            if depth == 0:
                out.append(text[j + 1: k].strip())
                break
            k += 1
        i = text.find("\\boxed", j)
    return out


def last_boxed(text: str) -> str | None:
    """The last complete, non-empty ``\\boxed{}`` content, or None."""
    return next((b for b in reversed(boxed_answers(text)) if b), None)


def gsm8k_number(answer: str) -> str:
    """A GSM8K answer as a number string: ``answer`` without its TeX dressing when that is one
    number, else its last number, else ``answer`` itself (which then grades as wrong)."""
    s = answer
    for pat, rep in _TEX_DRESSING:
        s = pat.sub(rep, s)
    s = s.strip().rstrip(".")
    if _to_number(s) is not None:
        return s.replace(",", "")
    nums = _NUM.findall(s)
    return nums[-1].replace(",", "") if nums else answer


def extract_answer(dataset: str, text: str) -> str | None:
    """The final answer in a model's output, or None when there is none."""
    b = last_boxed(text)
    if b is not None:
        return gsm8k_number(b) if dataset == "gsm8k" else b
    for ans in reversed(_ANSWER_IS.findall(text)):       # the last one that states an answer
        ans = ans.strip().rstrip(".")
        if dataset != "gsm8k" and ans:
            return ans
        nums = _NUM.findall(ans)
        if nums:
            return nums[0].replace(",", "")
    nums = _NUM.findall(text)
    return nums[-1].replace(",", "") if nums else None


def _to_number(s: str):
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_version() -> str | None:
    try:
        from importlib.metadata import version
        import math_verify  # noqa: F401
        return version("math-verify")
    except ImportError:
        return None


def grader_name(dataset: str) -> str:
    """The grader of ``dataset`` and the rule version, as result rows record it; a MATH grader
    without math-verify installed is a :class:`GradingError`."""
    if dataset == "gsm8k":
        return f"gsm8k-numeric/{GRADER_VERSION}"
    v = _math_verify_version()
    if v is None:
        raise GradingError(f"grading {dataset} needs math-verify (pip install math-verify): a string "
                           "comparison would mark equal answers such as \\frac12 and 0.5 wrong")
    return f"math-verify-{v}/{GRADER_VERSION}"


def _norm(s: str) -> str:
    s = s.replace(" ", "").replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").rstrip(".")
    return s


def _verify_one(parse, verify, gold: str, pred: str) -> dict:
    """``{"ok": bool}`` or ``{"error": why}`` for one answer (math-verify's own timeouts off)."""
    try:
        g = parse(f"${gold}$", parsing_timeout=None)
        if not g:
            return dict(error=f"math-verify cannot parse the gold answer {gold!r}")
        return dict(ok=bool(verify(g, parse(f"${pred}$", parsing_timeout=None), timeout_seconds=None)))
    except Exception as e:  # noqa: BLE001 - reported to the caller as a grading error
        return dict(error=f"math-verify failed: {type(e).__name__}: {e}"[:300])


def _serve() -> None:
    """The math-verify worker (``python -m hybridfast.grading --serve``): JSON lines ``{gold,
    pred}`` on stdin, one reply line each on stdout (anything else printed goes to stderr)."""
    import logging
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                           # stray prints must not corrupt the replies
    logging.disable(logging.WARNING)        # math-verify warns that its own timeouts are off
    try:
        from math_verify import parse, verify
    except Exception as e:  # noqa: BLE001
        print(json.dumps(dict(error=f"cannot import math-verify: {type(e).__name__}: {e}")), file=out, flush=True)
        return
    print(json.dumps(dict(ready=True)), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(_verify_one(parse, verify, req["gold"], req["pred"])), file=out, flush=True)


class _Verifier:
    """One math-verify worker process (a fresh interpreter, so neither ``fork`` from a threaded
    torch process nor ``spawn``'s re-import of the caller's script). It is restarted after a
    timeout or a crash (not after an answer it reports it cannot grade); one that fails to start
    is not tried again in this process."""
    START_TIMEOUT = 120.0

    def __init__(self):
        self.proc = None
        self.broken = None      #: why the worker could not start (then every grade fails at once)

    def _start(self) -> None:
        if self.broken is not None:
            raise GradingError(self.broken)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "hybridfast.grading", "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        reply = self._reply(self.START_TIMEOUT)
        if "ready" not in reply:
            self.stop()
            self.broken = f"the math-verify worker did not start: {reply['error']}"
            raise GradingError(self.broken)

    def _reply(self, timeout: float) -> dict:
        """The worker's next reply; ``alive=False`` in it when the worker must be restarted."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return dict(error=f"math-verify timed out after {timeout} s", alive=False)
        line = self.proc.stdout.readline()
        return json.loads(line) if line else dict(error="the math-verify worker died", alive=False)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __call__(self, gold: str, pred: str, timeout: float) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps(dict(gold=gold, pred=pred)) + "\n")
            self.proc.stdin.flush()
            reply = self._reply(timeout)
        except (BrokenPipeError, OSError) as e:
            reply = dict(error=f"the math-verify worker died ({type(e).__name__})", alive=False)
        if "ok" in reply:
            return reply["ok"]
        if not reply.get("alive", True):
            self.stop()
        raise GradingError(f"{reply['error']} (prediction {pred[:80]!r}, gold {gold!r})")


_verifier = _Verifier()


def grade(dataset: str, prediction: str | None, gold: str, timeout: float = 30.0) -> bool:
    """Whether ``prediction`` equals ``gold`` (None: no answer, False); raises
    :class:`GradingError` when it cannot tell."""
    if prediction is None:
        return False
    if dataset == "gsm8k":
        a, b = _to_number(prediction), _to_number(gold)
        if b is None:
            raise GradingError(f"the GSM8K gold answer {gold!r} is not a number")
        return a is not None and a == b
    grader_name(dataset)                      # math-verify must be there, even for an exact match
    if _norm(prediction) == _norm(gold):
        return True
    return _verifier(gold, prediction, timeout)


def grade_fields(dataset: str, output: str | None, gold: str) -> dict:
    """A result row's grading fields: ``extracted``, ``gold``, ``correct``, ``grader`` and
    ``grade_error`` (None, or why the answer could not be graded; ``correct`` is then False)."""
    pred = extract_answer(dataset, output or "")
    grader, correct, error = None, False, None
    try:
        grader = grader_name(dataset)
        correct = grade(dataset, pred, gold)
    except GradingError as e:
        error = str(e)
    return dict(extracted=pred, gold=gold, correct=correct, grader=grader, grade_error=error)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
