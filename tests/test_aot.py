"""The ahead-of-time compile check (no GPU needed): every Triton kernel compiles for sm_80 and
sm_90 at the launch configurations of the shape grid, with no register spills. Runs in a
subprocess because the test session interprets Triton (TRITON_INTERPRET=1)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ENV = dict(os.environ, TRITON_INTERPRET="0")


def test_aot_grid_compiles_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, "-m", "hybridfast.aot", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert res["failed"] == 0 and all(row["spill_stores"] == 0 for row in rows)
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_sample_chunk_kernel", "_sample_merge_kernel", "_route_steer_fused_kernel",
                       "_route_encode_tile_kernel", "_route_apply_kernel"}
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    served = [sh for row in rows for sh in row["shapes"]]
    assert {sh["K"] for sh in served if sh["op"] == "route_steer"} == {15, 50, 16384, 65536, 131072}
    assert {sh["V"] for sh in served if sh["op"] == "sample_logprobs"} == {49152, 151936, 152064}
    assert {sh["B"] for sh in served} == {1, 2, 8, 32, 64, 256}


def test_aot_check_detects_spills():
    """The check has teeth: the old sampler tile (2 rows x 2048 lanes on 4 warps) spills."""
    code = (
        "from hybridfast import aot\n"
        "from hybridfast.kernels import sample_logprobs as k\n"
        "P = aot.Ptr\n"
        "s = aot.KernelSpec(k._sample_chunk_kernel, dict(logits_ptr=P('bf16'), seed_ptr=P('i64'),"
        " thr_ptr=P('fp32'), tok_ptr=P('i64'), logp_ptr=P('fp32'), logq_ptr=P('fp32'),"
        " part_f_ptr=P('fp32'), part_i_ptr=P('i32'), B=8, V=152064, s_b=152064, chunk=152064,"
        " inv_t=4.0), dict(GREEDY=False, HAS_TOPK=False, SPLIT=False, ROWS=2, BLOCK=2048), 4)\n"
        "r = aot.compile_spec(s, 90)\n"
        "print(r)\n"
        "assert r['spill_stores'] > 0, r\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
