"""Ahead-of-time compile check of the Triton kernels for real GPU targets, without a GPU.

Every kernel is compiled (TTIR -> PTX -> cubin with the ptxas bundled in the Triton wheel) at
the launch configurations the launchers really choose for the shapes users run, for sm_80 and
sm_90; ptxas reports registers, spill stores/loads and stack per kernel. The check fails on a
compile error or any spill.

    python -m hybridfast.aot                       # the full grid, table + JSON line
    python -m hybridfast.aot --out bench/results/aot.json

Argument specialisation follows Triton's launcher: pointers and integers divisible by 16 get
the 16-byte divisibility hint, integers equal to 1 become constants.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

__all__ = ["KernelSpec", "specs", "compile_spec", "run", "main"]

ARCHS = (80, 90)
D_GRID = (1536, 3584, 5120)
K_GRID = (15, 50, 16384, 65536, 131072)
V_GRID = (49152, 151936, 152064)
B_GRID = (1, 2, 8, 32, 64, 256)
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class Ptr:
    """A pointer argument of element type ``ty`` (Triton's names: fp32, bf16, i64, i32)."""
    ty: str


@dataclass
class KernelSpec:
    """One kernel launch to compile: the jit function, its runtime args and constexprs."""
    kernel: object
    args: dict                 #: name -> Ptr | int | float (runtime arguments)
    constexprs: dict           #: name -> value
    num_warps: int
    shapes: list = field(default_factory=list)  #: the user-facing shapes it serves

    @property
    def key(self):
        items = tuple(sorted((k, repr(_spec_of(v))) for k, v in self.args.items()))
        return (self.kernel.__name__, items, tuple(sorted(self.constexprs.items())), self.num_warps)


def _spec_of(v):
    if isinstance(v, Ptr):
        return ("ptr", v.ty)
    if isinstance(v, bool):
        return ("const", v)
    if isinstance(v, int):
        return ("const", 1) if v == 1 else ("i64" if abs(v) >= 2**31 else "i32", v % 16 == 0)
    return ("fp32",)


def _sample_specs(B, V, dtype, mode):
    from .kernels import sample_logprobs as k
    cfg = k.launch_config(B, V)
    split = cfg["nsplit"] > 1
    greedy, topk = mode == "greedy", mode == "topk"
    out = [KernelSpec(k._sample_chunk_kernel, dict(
        logits_ptr=Ptr(dtype), seed_ptr=Ptr("i64"), thr_ptr=Ptr("fp32"), tok_ptr=Ptr("i64"),
        logp_ptr=Ptr("fp32"), logq_ptr=Ptr("fp32"), part_f_ptr=Ptr("fp32"), part_i_ptr=Ptr("i32"),
        B=B, V=V, s_b=V, chunk=cfg["chunk"], inv_t=0.0 if greedy else 4.0),
        dict(GREEDY=greedy, HAS_TOPK=topk, SPLIT=split, ROWS=cfg["ROWS"], BLOCK=cfg["BLOCK"]),
        cfg["num_warps"])]
    if split:
        out.append(KernelSpec(k._sample_merge_kernel, dict(
            part_f_ptr=Ptr("fp32"), part_i_ptr=Ptr("i32"), tok_ptr=Ptr("i64"), logp_ptr=Ptr("fp32"),
            logq_ptr=Ptr("fp32"), nsplit=cfg["nsplit"], inv_t=0.0 if greedy else 4.0),
            dict(GREEDY=greedy, BLOCK_S=cfg["BLOCK_S"]), 1))
    return out


def _route_specs(B, d, K, dtype, C):
    from .kernels import route_steer as k
    cfg = k.launch_config(B, d, d, K)
    h, x = Ptr(dtype), Ptr("fp32")
    flags = dict(HAS_BIAS=True, EXPAND=C > 0, BLOCK_D=cfg["BLOCK_D"])
    steer_args = dict(h_ptr=h, v_ptr=h, bias_ptr=h, coef_ptr=Ptr("fp32"), coefs_ptr=Ptr("fp32"),
                      out_ptr=h, cat_ptr=Ptr("i64"))
    strides = dict(s_hb=d, s_hd=1, s_vk=d, s_vd=1)
    if cfg["path"] == "fused":
        args = dict(steer_args, x_ptr=x, w_ptr=x, benc_ptr=x, bdec_ptr=x, xmean_ptr=x, d=d, d_r=d,
                    K=K, C=C, threshold=0.0, s_xb=d, s_xd=1, s_wr=K, s_wk=1, **strides)
        return [KernelSpec(k._route_steer_fused_kernel, args, dict(
            flags, HAS_MEAN=True, NORMALIZE=True, BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"]),
            cfg["num_warps"])]
    enc = KernelSpec(k._route_encode_tile_kernel, dict(
        x_ptr=x, w_ptr=x, benc_ptr=x, bdec_ptr=x, xmean_ptr=x, part_z_ptr=Ptr("fp32"),
        part_c_ptr=Ptr("i32"), B=B, d_r=d, K=K, s_xb=d, s_xd=1, s_wr=K, s_wk=1),
        dict(HAS_MEAN=True, NORMALIZE=True, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"],
             BLOCK_R=cfg["BLOCK_R"]), cfg["num_warps"])
    app = KernelSpec(k._route_apply_kernel, dict(
        steer_args, part_z_ptr=Ptr("fp32"), part_c_ptr=Ptr("i32"), d=d, K=K, C=C,
        n_tiles=cfg["n_tiles"], threshold=0.0, **strides),
        dict(flags, BLOCK_T=cfg["BLOCK_T"]), cfg["num_warps"])
    return [enc, app]


def specs(quick: bool = False) -> list[KernelSpec]:
    """Distinct kernel launches over the shape grid (``quick``: a representative subset)."""
    out: dict = {}
    Bs = (1, 8, 256) if quick else B_GRID
    for B, V, dt, mode in itertools.product(Bs, V_GRID[:1] if quick else V_GRID, DTYPES,
                                            ("greedy", "sample", "topk")):
        for s in _sample_specs(B, V, dt, mode):
            out.setdefault(s.key, s).shapes.append(dict(op="sample_logprobs", B=B, V=V, dtype=dt,
                                                        mode=mode))
    for B, d, K, dt, C in itertools.product(Bs, D_GRID[:1] if quick else D_GRID, K_GRID, DTYPES,
                                            (0, 10)):
        for s in _route_specs(B, d, K, dt, C):
            out.setdefault(s.key, s).shapes.append(dict(op="route_steer", B=B, d=d, K=K, dtype=dt,
                                                         C=C))
    return list(out.values())


def _ptxas() -> list[str]:
    import triton
    env = os.environ.get("TRITON_PTXAS_PATH")
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cands = ([env] if env else []) + [os.path.join(d, n) for n in ("ptxas-blackwell", "ptxas")]
    return [c for c in cands if c and os.path.exists(c)]


_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _resources(ptx: str, arch: int) -> dict:
    """Registers, stack and spills of the kernel in ``ptx`` as ptxas reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        errors = []
        for exe in _ptxas():
            r = subprocess.run([exe, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", path,
                                "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
            if r.returncode == 0:
                log = r.stdout + r.stderr
                u, g = _USAGE.search(log), _REGS.search(log)
                return dict(registers=int(g.group(1)), stack=int(u.group(1)),
                            spill_stores=int(u.group(2)), spill_loads=int(u.group(3)))
            errors.append(f"{os.path.basename(exe)}: {r.stderr.strip()[-200:]}")
        raise RuntimeError("no bundled ptxas accepted the PTX: " + "; ".join(errors))


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    """Compile one spec for ``sm_<arch>`` and return its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = spec.kernel
    sig, consts, attrs = {}, dict(spec.constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in spec.constexprs:
            sig[name] = "constexpr"
            continue
        kind = _spec_of(spec.args[name])
        if kind[0] == "ptr":
            sig[name] = "*" + kind[1]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind[0] == "const":
            sig[name] = "constexpr"
            consts[name] = kind[1]
        elif kind[0] in ("i32", "i64"):
            sig[name] = kind[0]
            if kind[1]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    # as the launchers set it: no FMA in the sampler (exact scores), FMA in route_steer
    opts = dict(num_warps=spec.num_warps, enable_fp_fusion=not fn.__name__.startswith("_sample"))
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                       options=opts)
    res = _resources(k.asm["ptx"], arch)
    res["shared"] = int(getattr(k.metadata, "shared", 0))
    return res


def run(quick: bool = False, archs=ARCHS) -> list[dict]:
    """Compile every spec for every arch; rows with resources or the compile error."""
    rows = []
    for spec, arch in itertools.product(specs(quick), archs):
        row = dict(kernel=spec.kernel.__name__, arch=f"sm_{arch}", num_warps=spec.num_warps,
                   **spec.shapes[0], serves=len(spec.shapes), shapes=spec.shapes,
                   **{k: v for k, v in spec.constexprs.items() if k.startswith("BLOCK") or k == "ROWS"})
        try:
            row.update(compile_spec(spec, arch))
            row["ok"] = row["spill_stores"] == 0 and row["spill_loads"] == 0
        except Exception as e:  # noqa: BLE001 - a compile error is a failed row
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a representative subset of the grid")
    ap.add_argument("--out", help="write the rows as JSON here")
    a = ap.parse_args(argv)
    rows = run(a.quick)
    cols = ["kernel", "arch", "op", "B", "V", "d", "K", "C", "dtype", "mode", "serves", "num_warps",
            "registers", "spill_stores", "stack", "shared", "ok", "error"]
    for r in rows:
        print(" ".join(f"{c}={r[c]}" for c in cols if c in r))
    bad = [r for r in rows if not r["ok"]]
    summary = dict(compiled=len(rows), failed=len(bad),
                   max_registers=max((r.get("registers", 0) for r in rows), default=0))
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(summary, rows=rows), f, indent=1)
        os.replace(tmp, a.out)
    print(json.dumps(summary))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
