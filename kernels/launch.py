"""How every launcher starts a kernel: directly when eager (and under TRITON_INTERPRET=1),
through ``torch.library.wrap_triton`` while ``torch.compile`` traces a ``triton_op``, so the
compiled graph holds the Triton kernel itself (fusable, CUDA-graph capturable)."""
import torch


def launch(kernel, grid):
    """``kernel[grid]``, wrapped for tracing when torch.compile is tracing."""
    if torch.compiler.is_compiling():
        return torch.library.wrap_triton(kernel)[grid]
    return kernel[grid]
