"""How every launcher starts a kernel: directly when eager (and under TRITON_INTERPRET=1),
through ``torch.library.wrap_triton`` while a ``triton_op`` is traced (torch.compile, make_fx),
so the compiled graph holds the Triton kernel itself (fusable, CUDA-graph capturable).

"Traced" is read from the arguments (fake or functional tensors), not only from
``torch.compiler.is_compiling()``: before torch 2.12 that flag is False in code that Dynamo does
not trace itself, such as a ``triton_op``'s fake kernel and AOTAutograd's decomposition of it,
where launching the raw kernel fails ("Cannot access data pointer of Tensor")."""
import torch


def _traced(args, kwargs) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and type(a) is not torch.Tensor and \
                not isinstance(a, torch.nn.Parameter):
            return True                # FakeTensor, FunctionalTensor, ...: no data to launch on
    return False


def launch(kernel, grid):
    """``kernel[grid]``, wrapped for tracing when its arguments are being traced."""
    def run(*args, **kwargs):
        if torch.compiler.is_compiling() or _traced(args, kwargs):
            return torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
        return kernel[grid](*args, **kwargs)
    return run
