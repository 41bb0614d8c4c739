"""Build script: the pure-Python package plus the optional C++ CPU extension ``hybridfast._C``.

The extension is plain pybind11 (no torch headers, so it builds in seconds and needs no torch at
build time). If it cannot be compiled the install still succeeds with one warning, and
``hybridfast.ops`` reports the C++ path as unavailable.
"""
import os
import platform
import sys
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pragma: no cover - pybind11 is a build requirement
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    """Compile the extension if possible; never fail the install because of it."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001
            self._warn(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._warn(e)

    @staticmethod
    def _warn(e):
        msg = (f"hybridfast: the C++ extension could not be built ({e}); installing without it. "
               "The C++ CPU path will report itself unavailable; the PyTorch reference is used.")
        warnings.warn(msg)
        print("WARNING: " + msg, file=sys.stderr)


ext_modules = []
if Pybind11Extension is not None and os.environ.get("HYBRIDFAST_NO_EXT") != "1":
    args = ["-O3", "-std=c++17"]
    if os.environ.get("HYBRIDFAST_PORTABLE") != "1" and platform.machine() in ("x86_64", "AMD64"):
        args.append("-march=native")  # built on the machine that runs it; HYBRIDFAST_PORTABLE=1 to skip
    link = []
    if sys.platform.startswith("linux"):
        args.append("-fopenmp")
        link.append("-fopenmp")
    ext_modules.append(Pybind11Extension(
        "hybridfast._C",
        sources=["csrc/bindings.cpp", "csrc/route_steer.cpp", "csrc/sample_logprobs.cpp"],
        include_dirs=["csrc"],
        extra_compile_args=args,
        extra_link_args=link,
    ))

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
