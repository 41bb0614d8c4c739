"""RandomStream: the one consumer of a user generator in the samplers (DESIGN.md section 5)."""
import torch

from hybridfast import PowerSampler
from hybridfast.engine import Engine
from hybridfast.ops.rng import RandomStream
from hybridfast.tiny import tiny_model


def _after_one_draw(seed):
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, 2**31 - 1, (1,), generator=g, dtype=torch.int64)
    return g.get_state()


def test_generator_is_read_once_per_call():
    """Sampling, MH and SMC read the user's generator exactly once per call (no per-token draws,
    so no per-token host copy when the generator is on another device than the model)."""
    m = tiny_model("qwen2", seed=1)
    g = torch.Generator().manual_seed(3)
    Engine(m).generate([[1, 2, 3], [4, 5]], 12, temperature=0.8, generator=g)
    assert torch.equal(g.get_state(), _after_one_draw(3))
    for method in ("mh", "smc"):
        g = torch.Generator().manual_seed(4)
        PowerSampler(m, max_new_tokens=8, block_size=4, n_mcmc=2, method=method,
                     n_particles=4).sample([[1, 2, 3]], generator=g)
        assert torch.equal(g.get_state(), _after_one_draw(4)), method


def test_stream_is_deterministic_and_uniform():
    a = RandomStream(torch.Generator().manual_seed(9), "cpu")
    b = RandomStream(torch.Generator().manual_seed(9), "cpu")
    sa = [a.next_seed() for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(sa, [b.next_seed() for _ in range(3)]))
    assert len({int(x) for x in sa}) == 3                 # the counter moves the seed
    u = a.uniform(100_000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) * 12 - 1) < 0.02
    p = torch.tensor([[0.1, 0.0, 0.6, 0.3], [1.0, 1.0, 0.0, 2.0]])
    draws = a.categorical(p, 50_000)
    freq = torch.stack([torch.bincount(r, minlength=4) for r in draws]).double() / 50_000
    assert torch.allclose(freq, p.double() / p.double().sum(1, keepdim=True), atol=0.01)
    assert int(freq[0, 1]) == 0 and int(freq[1, 2]) == 0   # zero-probability entries never drawn


def test_stream_key_is_copied_to_the_model_device():
    """A CPU generator drives a stream whose state lives on the model's device (meta stands in
    for CUDA here: the key is drawn on the generator's device, then moved once)."""
    s = RandomStream(torch.Generator().manual_seed(1), "meta")
    assert s.key.device.type == "meta" and s.counter.device.type == "meta"
    assert s.next_seed().device.type == "meta"
