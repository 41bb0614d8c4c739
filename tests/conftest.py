import os

# Triton kernels run on CPU through the interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_report_header(config):
    import hybridfast.ops as ops
    impls = ops.available_impls("cpu")
    cpp = "compiled and loaded" if ops.cpp_available() else f"UNAVAILABLE ({ops._cpp_error})"
    return [f"hybridfast implementations on CPU: {', '.join(impls)}",
            f"hybridfast C++ extension: {cpp}",
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]


def pytest_configure(config):
    # In CI every implementation must really run: a missing C++ build is a failure, not a skip.
    if os.environ.get("CI") or os.environ.get("HYBRIDFAST_REQUIRE_ALL_IMPLS"):
        import hybridfast.ops as ops
        missing = {"cpp", "triton"} - set(ops.available_impls("cpu"))
        if missing:
            raise pytest.UsageError(f"CI requires every implementation; missing: {missing} "
                                    f"({ops._cpp_error or ops._triton_error})")


IMPLS = ["torch", "cpp", "triton"]


# CI runs a fixed (derandomised) set of hypothesis examples so a green run is reproducible;
# local runs explore new examples each time.
from hypothesis import settings as _hsettings  # noqa: E402

_hsettings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hsettings.load_profile("ci")
