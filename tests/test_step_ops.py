"""A decode step's counted cost: non-view aten ops per layer and host syncs (hybridfast.opcount)."""
import pytest
import torch

from hybridfast.model import DecoderModel, rotate
from hybridfast.opcount import MODES, count_ops, decode_step_counts
from hybridfast.tiny import bundled_config, tiny_model

MAX_OPS_PER_LAYER = 30


def test_counting_rule():
    x, w = torch.arange(6.0), torch.ones(2, 6)
    assert count_ops(lambda: x.view(2, 3).transpose(0, 1).unsqueeze(0)).ops == 0   # views
    assert count_ops(lambda: x.view(2, 3).t().reshape(-1)).ops == 1                 # copy
    assert count_ops(lambda: torch.nn.functional.linear(x[None], w)).ops == 1
    assert count_ops(lambda: x.add_(1)).ops == 1
    assert count_ops(lambda: x + 1).syncs == 0
    assert count_ops(lambda: bool((x > 3).any())).syncs == 1
    assert count_ops(lambda: x[x > 3]).syncs == 1                                     # bool index
    assert count_ops(lambda: (x > 3).nonzero()).syncs == 1


@pytest.mark.parametrize("mode", MODES)
def test_decode_step_ops(mode, monkeypatch):
    # the reference sampler/router: every op they run is dispatched (the C++ CPU kernels are
    # opaque calls that take their seed as a host integer)
    monkeypatch.setenv("HYBRIDFAST_IMPL", "torch")
    r = decode_step_counts(mode, bundled_config("tiny-qwen2"))
    assert r["ops_per_layer"] < MAX_OPS_PER_LAYER, r["by_op_per_layer"]
    assert r["syncs_per_step"] == 0, r["by_op_per_step"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_is_hf_rope_bit_for_bit(dtype):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
    m = DecoderModel(tiny_model("qwen2", dtype=dtype))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, m.head_dim, generator=g).to(dtype) for n in (4, 2, 2))
    pos = torch.tensor([[0, 5, 9], [100, 101, 102]])
    plan = m.plan(pos, pos, torch.ones(2, 3, 3, dtype=torch.bool))
    rq, kv = rotate(q, k, v, plan)
    cos, sin = m.rotary(q, pos)
    wq, wk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.equal(rq, wq.transpose(1, 2)) and torch.equal(kv[:, :, :2], wk.transpose(1, 2))
    assert torch.equal(kv[:, :, 2:], v)
    with pytest.raises(NotImplementedError, match="rotate-half"):
        m._check_rotary(lambda q, k, cos, sin: (q, k))
