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


SHADOW = r"""
import importlib.metadata, os
import hybridfast.kernels
assert hasattr(hybridfast.kernels, "route_steer_triton")
try:
    importlib.metadata.distribution("kernels")
    pypi = True
except importlib.metadata.PackageNotFoundError:
    pypi = False
try:
    import kernels
except ImportError as e:
    assert not pypi, e
else:
    assert pypi, kernels.__file__
    assert os.path.dirname(kernels.__file__) != os.path.dirname(hybridfast.kernels.__file__), \
        "the repository's kernels/ folder shadowed the PyPI package 'kernels'"
"""


def test_repo_kernels_folder_does_not_shadow_the_pypi_kernels_package():
    """From the repository root (first on sys.path), `import kernels` is the PyPI package that
    transformers imports, not our kernels/ folder (which is `hybridfast.kernels`)."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", SHADOW], capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0, r.stderr
