"""`import hybridfast` is lean: no CUDA init, no triton/transformers import, no output, no network."""
import subprocess
import sys

CODE = r"""
import socket
def _no_net(*a, **k):
    raise AssertionError("network touched during import")
socket.socket.connect = _no_net
socket.create_connection = _no_net
import hybridfast, hybridfast.ops, sys, torch
assert not torch.cuda.is_initialized(), "CUDA initialised"
heavy = [m for m in ("triton", "transformers", "hybridfast.kernels") if m in sys.modules]
assert not heavy, f"heavy modules imported: {heavy}"
"""


def test_import_is_lean():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
