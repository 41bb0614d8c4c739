"""route_steer: every implementation against the PyTorch reference (hypothesis)."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hybridfast.ops as ops
from hybridfast.ops.reference import route_steer_ref
from hybridfast.testing import TIE_RTOL, check_close

KERNELS = ["cpp", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _strided(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """Same values, non-contiguous layout (every other column of a wider buffer)."""
    if not strided or t.ndim != 2:
        return t
    buf = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
    buf[:, ::2] = t
    return buf[:, ::2]


@st.composite
def problems(draw):
    B = draw(st.one_of(st.integers(1, 9), st.integers(1, 257)))
    d = draw(st.integers(1, 200))
    d_r = draw(st.integers(1, 160))
    K = draw(st.integers(1, 64))
    hdt = draw(st.sampled_from(DTYPES))
    rdt = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    p = dict(
        h=r(B, d).to(hdt), x=r(B, d_r).to(rdt), W_enc=r(d_r, K).to(rdt), b_enc=r(K).to(rdt),
        b_dec=r(d_r).to(rdt) * 0.1, V=r(K, d).to(hdt),
        coef=torch.rand(K, generator=g) * draw(st.sampled_from([0.0, 1.0, 3.0])),
    )
    if draw(st.booleans()):
        p["bias"] = r(d).to(hdt)
    if draw(st.booleans()):
        p["x_mean"] = r(d_r).to(rdt)
    p["normalize"] = draw(st.booleans())
    mode = draw(st.sampled_from(["none", "median", "all_below"]))
    if draw(st.booleans()):
        p["coefs"] = torch.rand(draw(st.integers(1, 5)), generator=g)
        p["coef"] = None
    if draw(st.booleans()):
        p["h"] = _strided(p["h"], True)
        p["x"] = _strided(p["x"], True)
        p["W_enc"] = _strided(p["W_enc"], True)
    return p, mode


def _z64(p):
    u = p["x"].double()
    if p.get("x_mean") is not None:
        u = u - p["x_mean"].double()
    if p.get("normalize"):
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (u - p["b_dec"].double()) @ p["W_enc"].double() + p["b_enc"].double()


def _threshold(p, mode):
    if mode == "none":
        return -math.inf
    zmax = _z64(p).max(-1).values
    if mode == "all_below":
        return float(zmax.max()) + 1.0
    return float(zmax.median())


def _as64(p):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}


def compare(impl, p, threshold):
    kw = {k: p.get(k) for k in ("bias", "x_mean", "coefs")}
    args = [p[k] for k in ("h", "x", "W_enc", "b_enc", "b_dec", "V", "coef")]
    out, cat = ops.route_steer(*args, **kw, normalize=p["normalize"], threshold=threshold, impl=impl)
    ref_out, ref_cat = route_steer_ref(*args, **kw, normalize=p["normalize"], threshold=threshold)
    q = _as64(p)
    args64 = [q[k] for k in ("h", "x", "W_enc", "b_enc", "b_dec", "V", "coef")]
    kw64 = {k: q.get(k) for k in ("bias", "x_mean", "coefs")}
    true_out, true_cat = route_steer_ref(*args64, **kw64, normalize=p["normalize"],
                                         threshold=threshold)
    assert out.dtype == p["h"].dtype and out.shape == ref_out.shape
    assert cat.dtype == torch.int64
    # Categories: exact except at near-ties (top-2 or threshold within TIE_RTOL).
    z = _z64(p)
    zmax = z.max(-1).values
    scale = 1 + zmax.abs()
    near = ((z >= (zmax - TIE_RTOL * scale)[:, None]).sum(-1) > 1) | \
        ((zmax - threshold).abs() < TIE_RTOL * scale)
    differ = cat != true_cat
    assert not (differ & ~near).any(), f"{impl}: category mismatch at rows {(differ & ~near).nonzero().flatten().tolist()}"
    keep = ~differ & ~(ref_cat != true_cat)
    check_close(f"{impl} route_steer out", out[keep], ref_out[keep], true_out[keep], p["h"].dtype)
    return out, cat


@pytest.mark.parametrize("impl", KERNELS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prob=problems())
def test_matches_reference(impl, prob):
    p, mode = prob
    compare(impl, p, _threshold(p, mode))


@pytest.mark.parametrize("impl", KERNELS)
def test_realistic_shape(impl):
    g = torch.Generator().manual_seed(0)
    B, d, K = 8, 1536, 15
    p = dict(h=torch.randn(B, d, generator=g).bfloat16(), x=torch.randn(B, d, generator=g),
             W_enc=torch.randn(d, K, generator=g), b_enc=torch.randn(K, generator=g),
             b_dec=torch.randn(d, generator=g), V=torch.randn(K, d, generator=g).bfloat16(),
             coef=torch.rand(K, generator=g), bias=torch.randn(d, generator=g).bfloat16(),
             x_mean=torch.randn(d, generator=g), normalize=True)
    out, cat = compare(impl, p, -math.inf)
    assert (cat >= 0).all()
    # steering changed every row (the test would fail if steering were off)
    assert ((out.float() - p["h"].float()).abs().amax(-1) > 0).all()


@pytest.mark.parametrize("impl", ["torch"] + KERNELS)
def test_exact_ties_pick_lowest_index(impl):
    B, d, d_r, K = 6, 10, 7, 5
    x = torch.randn(B, d_r)
    w = torch.randn(d_r, 1)
    W = w.repeat(1, K)                      # every latent identical -> exact tie everywhere
    W[:, 0] = -w[:, 0]                      # except latent 0, which loses or ties below
    x = x * torch.sign(x @ w)               # make latent 0 strictly worse
    V = torch.arange(K * d, dtype=torch.float32).reshape(K, d)
    out, cat = ops.route_steer(torch.zeros(B, d), x, W, torch.zeros(K), torch.zeros(d_r), V,
                               torch.ones(K), impl=impl)
    assert cat.tolist() == [1] * B
    assert torch.equal(out, V[1].expand(B, d))


@pytest.mark.parametrize("impl", ["torch"] + KERNELS)
def test_all_below_threshold_and_zero_coef(impl):
    B, d, d_r, K = 4, 9, 5, 3
    h = torch.randn(B, d)
    args = (h, torch.randn(B, d_r), torch.randn(d_r, K), torch.zeros(K), torch.zeros(d_r),
            torch.randn(K, d))
    out, cat = ops.route_steer(*args, torch.ones(K), threshold=1e9, impl=impl)
    assert torch.equal(out, h) and (cat == -1).all()
    out, cat = ops.route_steer(*args, torch.zeros(K), impl=impl)
    assert torch.equal(out, h) and (cat >= 0).all()
    out, cat = ops.route_steer(*args, torch.ones(K), impl=impl)
    assert not torch.equal(out, h)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("where", ["x", "h"])
def test_nan_raises(impl, where):
    B, d, d_r, K = 3, 8, 6, 4
    h, x = torch.randn(B, d), torch.randn(B, d_r)
    (x if where == "x" else h)[1, 2] = float("nan")
    with pytest.raises(ValueError, match=f"NaN.*{where}|NaN in .*{where}"):
        ops.route_steer(h, x, torch.randn(d_r, K), torch.zeros(K), torch.zeros(d_r),
                        torch.randn(K, d), torch.ones(K), impl=impl)


def test_nan_triton_marks_row():
    B, d, d_r, K = 3, 8, 6, 4
    h, x = torch.randn(B, d), torch.randn(B, d_r)
    x[1, 2] = float("nan")
    out, cat = ops.route_steer(h, x, torch.randn(d_r, K), torch.zeros(K), torch.zeros(d_r),
                               torch.randn(K, d), torch.ones(K), impl="triton")
    assert cat[1].item() == -2 and cat[0].item() >= 0 and cat[2].item() >= 0
    assert torch.equal(out[1], h[1])


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(3, 7)), r"x width 7 .* d_r=6"),
    (dict(V=torch.randn(4, 9)), r"V must have shape \[K=4, d=8\].*\(4, 9\)"),
    (dict(b_enc=torch.randn(5)), r"b_enc must have shape \[K=4\], got \(5,\)"),
    (dict(coef=torch.randn(3)), r"coef must have shape \[K=4\]"),
    (dict(bias=torch.randn(7)), r"bias must have shape \[d=8\]"),
    (dict(h=torch.randn(2, 8)), r"x has 3 rows but h has 2"),
    (dict(V=torch.randn(4, 8).double()), r"V has dtype torch.float64 but h has torch.float32"),
])
def test_bad_input_names_argument(bad, match):
    a = dict(h=torch.randn(3, 8), x=torch.randn(3, 6), W_enc=torch.randn(6, 4),
             b_enc=torch.randn(4), b_dec=torch.randn(6), V=torch.randn(4, 8), coef=torch.ones(4))
    kw = {}
    for k, v in bad.items():
        (kw if k == "bias" else a)[k] = v
    with pytest.raises((ValueError, TypeError), match=match):
        ops.route_steer(*a.values(), **kw)


def test_explicit_impl_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("HYBRIDFAST_IMPL", "cpp")
    with pytest.raises(RuntimeError, match="cpp.*float16/bfloat16"):
        ops.route_steer(torch.randn(1, 2).double(), torch.randn(1, 2).double(),
                        torch.randn(2, 1).double(), torch.zeros(1).double(),
                        torch.zeros(2).double(), torch.randn(1, 2).double(), torch.ones(1))
    monkeypatch.setenv("HYBRIDFAST_IMPL", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        ops.resolve_impl(torch.device("cpu"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("HYBRIDFAST_IMPL", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.resolve_impl(torch.device("cpu"), torch.float32)


def test_torch_library_op_registered_and_compiles():
    B, d, d_r, K = 2, 8, 6, 3
    args = (torch.randn(B, d), torch.randn(B, d_r), torch.randn(d_r, K), torch.zeros(K),
            torch.zeros(d_r), torch.randn(K, d), torch.ones(K))
    out, cat = torch.ops.hybridfast.route_steer(*args, None, None, False, -math.inf, None, "cpp")
    ref, rcat = route_steer_ref(*args)
    assert torch.equal(cat, rcat) and torch.allclose(out, ref)
    f = torch.compile(lambda *a: ops.route_steer(*a), backend="eager", fullgraph=True)
    out2, cat2 = f(*args)
    assert torch.equal(cat2, rcat) and torch.allclose(out2, ref)


@st.composite
def large_k_problems(draw):
    """SAE-sized latent counts: the fused path's K tiles (K <= 1024) and the tiled path."""
    p, mode = draw(problems())
    K = draw(st.sampled_from([129, 700, 1025, 2500]))
    B = draw(st.sampled_from([1, 3, 17, 40]))
    g = torch.Generator().manual_seed(K + B)
    d_r, d = p["x"].shape[1], p["h"].shape[1]
    rdt, hdt = p["x"].dtype, p["h"].dtype
    p.update(h=torch.randn(B, d, generator=g).to(hdt), x=torch.randn(B, d_r, generator=g).to(rdt),
             W_enc=torch.randn(d_r, K, generator=g).to(rdt), b_enc=torch.randn(K, generator=g).to(rdt),
             V=torch.randn(K, d, generator=g).to(hdt))
    if p["coef"] is not None:
        p["coef"] = torch.rand(K, generator=g)
    return p, mode


@pytest.mark.parametrize("impl", KERNELS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prob=large_k_problems())
def test_large_k_matches_reference(impl, prob):
    p, mode = prob
    compare(impl, p, _threshold(p, mode))


@pytest.mark.parametrize("K", [300, 3000])
def test_triton_ties_across_k_tiles_go_to_lowest_index(K):
    from hybridfast.kernels.route_steer import launch_config
    g = torch.Generator().manual_seed(K)
    d = 24
    W = torch.randn(d, K, generator=g)
    W[:, K - 2] = W[:, 3] * 4            # equal best latents in the first and the last tile
    W[:, 3] = W[:, K - 2]
    x = W[:, 3][None, :].repeat(2, 1)
    p = dict(h=torch.randn(2, 8, generator=g), x=x, W_enc=W, b_enc=torch.zeros(K),
             b_dec=torch.zeros(d), V=torch.randn(K, 8, generator=g), coef=torch.ones(K))
    out, cat = ops.route_steer(*p.values(), impl="triton")
    assert cat.tolist() == [3, 3], (launch_config(2, 8, d, K)["path"], cat)
    x[1, 0] = float("nan")
    _, cat = ops.route_steer(*p.values(), impl="triton", check_nan=False)
    assert cat.tolist() == [3, -2]


def test_triton_op_and_device_kernels():
    """The Triton path is a triton_op (eager here through the interpreter); the device-dispatched
    op picks the C++ kernel on CPU when asked for "auto"."""
    B, d, d_r, K = 3, 8, 6, 5
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(B, d, generator=g), torch.randn(B, d_r, generator=g),
            torch.randn(d_r, K, generator=g), torch.zeros(K), torch.zeros(d_r),
            torch.randn(K, d, generator=g), torch.ones(K))
    ref, rcat = route_steer_ref(*args)
    ops.route_steer(*args, impl="triton")       # loading the Triton path defines its triton_ops
    out, cat = torch.ops.hybridfast.route_steer_triton(*args, None, None, False, -math.inf, None)
    assert torch.equal(cat, rcat) and torch.allclose(out, ref, atol=1e-6)
    out, cat = torch.ops.hybridfast.route_steer(*args, None, None, False, -math.inf, None, "auto")
    assert torch.equal(cat, rcat) and torch.allclose(out, ref, atol=1e-6)
    tok, lp, lq = torch.ops.hybridfast.sample_logprobs_triton(torch.randn(4, 50, generator=g), 0.5,
                                                              torch.tensor([3]), None)
    assert tok.shape == (4,) and torch.isfinite(lp).all() and torch.isfinite(lq).all()


_TRACE_SCRIPT = r'''
import contextlib, os, sys, torch
if sys.argv[1] == "pre-2.12":      # is_compiling() False outside Dynamo-traced code, as before 2.12
    torch.compiler._compile_session_context = contextlib.nullcontext
import triton
from triton.backends.compiler import GPUTarget
class FakeDriver:                  # mutation analysis of wrap_triton needs a target, not a GPU
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, *a): return 0
    def get_active_torch_device(self): return torch.device("cpu")
    def is_active(self): return True
triton.runtime.driver.set_active(FakeDriver())
import hybridfast.kernels          # JIT functions (not interpreted): what CUDA runs
import hybridfast.ops as ops
os.environ["TRITON_INTERPRET"] = "1"   # only so that impl="triton" accepts CPU tensors
assert ops._triton() is not None, ops._triton_error
from torch._functorch.aot_autograd import aot_module_simplified
class Traced(Exception): pass
seen = []
def backend(gm, inputs):
    def fw(g, ins):
        seen.append(sum("triton_kernel_wrapper" in str(n.target) for n in g.graph.nodes))
        def never(*a): raise Traced()
        return never
    return aot_module_simplified(gm, inputs, fw_compiler=fw)
B, d = 3, 16
def route(K):
    a = (torch.randn(B, d), torch.randn(B, d), torch.randn(d, K), torch.zeros(K), torch.zeros(d),
         torch.randn(K, d), torch.ones(K))
    return (lambda *t: ops.route_steer(*t, bias=t[0][0], threshold=0.0, impl="triton",
                                       check_nan=False, validate=False)), a
sample = lambda lg, seed: ops.sample_logprobs(lg, 0.5, seed=seed, impl="triton", top_k=5, check_nan=False)
for fn, a in [route(5), route(3000), (sample, (torch.randn(4, 300), torch.tensor([5]))),
              (sample, (torch.randn(1, 151936), torch.tensor([5])))]:
    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*a)
    except Traced:
        pass
print(seen)
'''


@pytest.mark.parametrize("torch_semantics", ["pre-2.12", "current"])
def test_compiled_triton_ops_trace_to_kernels(torch_semantics):
    """Under torch.compile (the compiled decode steps on CUDA) each op must trace to its Triton
    kernels (fused: 1, tiled: 2, sampler: 1 or 2), never launch a kernel on fake tensors. Also with
    torch < 2.12, where is_compiling() is False inside AOTAutograd (the GPU image runs 2.11)."""
    pytest.importorskip("triton.backends.nvidia")
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT, torch_semantics], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[1, 2, 1, 2]", r.stdout[-500:]
