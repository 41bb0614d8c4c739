"""The one-command GPU check must keep running: its --smoke mode on CPU (Triton interpreted)
exercises every section and must find no failing check."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["failed_checks"] == 0 and res["errors"] == 0
    ops = {row["op"] for row in res["kernels"]}
    assert ops == {"route_steer", "sample_logprobs"}
    assert all(row["ok"] for row in res["kernels"])
    modes = {row["mode"] for row in res["generation"]}
    assert {"plain", "routed", "paper", "mh", "mh_rows", "routed_naive_hooks", "plain_compiled",
            "routed_compiled", "paper_compiled", "mh_compiled"} <= modes
    assert all("routed_vs_plain_compiled" in r for r in res["ratios"])
    assert all(row["tok_s"] > 0 for row in res["generation"])
