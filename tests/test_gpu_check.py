"""The one-command GPU check must keep running: its --smoke mode on CPU (Triton interpreted)
exercises every section and must find no failing check."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# ----------------------------------------------------------------------------- CUDA-only hazards
# What the GPU run does differently from the CPU smoke, emulated on CPU.

def _replay_like_cuda_graphs(monkeypatch):
    """Make every compiled step behave like a CUDA-graph replay (``mode="reduce-overhead"``):
    the tensors a call returned are overwritten by the next call (cudagraph trees make reading
    them an error). A caller that keeps a step's output past the next step reads garbage here."""
    import hybridfast.engine
    import hybridfast.hybrid
    import hybridfast.power

    def compile_step(fn, options):
        if options is None:
            return fn
        previous = []

        def step(*args, **kwargs):
            for t in previous:
                t.fill_(-7 if not t.is_floating_point() else float("nan"))
            out = fn(*args, **kwargs)
            previous[:] = [t for t in (out if isinstance(out, tuple) else (out,))
                           if isinstance(t, torch.Tensor)]
            return out
        return step
    for mod in (hybridfast.engine, hybridfast.hybrid, hybridfast.power):
        monkeypatch.setattr(mod, "compile_step", compile_step)


def test_plain_and_power_steps_do_not_keep_step_outputs(monkeypatch):
    from hybridfast import PowerSampler
    from hybridfast.engine import Engine
    from hybridfast.tiny import tiny_model
    m = tiny_model("qwen2", seed=1)
    prompts = [[1, 5, 9, 3], [4, 7], [8, 8, 8, 6, 2]]
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    ref = Engine(m, sync_every=4).generate(prompts, 12, eos_token_id=-1, temperature=0.8, generator=g())
    pkw = dict(max_new_tokens=12, block_size=4, n_mcmc=2, eos_token_id=-1, sync_every=4)
    pref = PowerSampler(m, **pkw).sample(prompts, generator=g())
    _replay_like_cuda_graphs(monkeypatch)
    out = Engine(m, sync_every=4, compile={"backend": "eager"}).generate(
        prompts, 12, eos_token_id=-1, temperature=0.8, generator=g())
    assert out.sequences() == ref.sequences()
    assert torch.allclose(out.logp, ref.logp, atol=1e-4)     # no NaN from a stale step output
    pout = PowerSampler(m, compile={"backend": "eager"}, **pkw).sample(prompts, generator=g())
    assert [r.ids for r in pout] == [r.ids for r in pref]


@pytest.mark.parametrize("mode", ["routed", "paper"])
def test_hybrid_steps_do_not_keep_step_outputs(monkeypatch, mode):
    """The fields the scheduler keeps until its next sync are copies, not the compiled step's
    outputs (a CUDA graph's next replay overwrites those; the test overwrites them likewise)."""
    from hybridfast import HybridModel
    from .helpers import BASE_PROMPTS, THINK_PROMPTS, pair, router_and_vectors
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    kw = dict(sae_layer=1, steer_layer=2, mode=mode, threshold=0.5 if mode == "routed" else None,
              coefficients=[0.5, 1.0, 0.0, 2.0, 1.5] if mode == "routed" else [0.5, 2.0],
              sync_every=4)
    ref = HybridModel(base, think, sae, vec, **kw).generate(BASE_PROMPTS, THINK_PROMPTS, 12, eos_token_id=2)
    _replay_like_cuda_graphs(monkeypatch)
    out = HybridModel(base, think, sae, vec, compile={"backend": "eager"}, **kw).generate(
        BASE_PROMPTS, THINK_PROMPTS, 12, eos_token_id=2)
    assert [r.ids for r in out] == [r.ids for r in ref]
    assert [r.category for r in out] == [r.category for r in ref]


def test_many_compiled_engines_and_batch_sizes_do_not_hit_the_recompile_limit():
    """gpu_check compiles Engine._step for two engines per config (SDPA and flex), two configs,
    four batch sizes: 16 entries on one code object. Under Dynamo's default limit (8) the 9th is
    a hard FailOnRecompileLimitHit with fullgraph=True."""
    from hybridfast.engine import Engine
    from hybridfast.tiny import tiny_model
    m = tiny_model("qwen2", seed=1)
    n = 0
    for _ in range(5):
        e = Engine(m, compile={"backend": "eager"})
        for B in (1, 2):
            e.generate([[3, 4, 5]] * B, 2, eos_token_id=-1)
            n += 1
    assert n == 10


def test_gpu_check_runs_from_a_checkout_that_is_not_installed(tmp_path):
    """A bare GPU machine gets the working tree, not an installed package: ``python
    bench/gpu_check.py`` must import this checkout's hybridfast and its Triton kernels."""
    code = (
        "import os, runpy, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in repr(f)]\n"
        "sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != sys.argv[1]]\n"
        "sys.path.insert(0, os.path.join(sys.argv[1], 'bench'))\n"      # as `python bench/x.py`
        "g = runpy.run_path(os.path.join(sys.argv[1], 'bench', 'gpu_check.py'))\n"
        "import hybridfast, hybridfast.ops as ops\n"
        "assert os.path.dirname(hybridfast.__file__) == os.path.join(sys.argv[1], 'hybridfast')\n"
        "assert 'triton' in ops.available_impls('cpu'), ops._triton_error\n"
        "print(sys.modules['hybridfast.kernels'].__file__)\n")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.strip().endswith(os.path.join("kernels", "__init__.py"))


def test_refused_out_path_fails_before_the_run(tmp_path):
    out = tmp_path / "exists.json"
    out.write_text("{}")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"),
                       timeout=300)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert out.read_text() == "{}"
