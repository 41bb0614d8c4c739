"""Steering-vector training with shared trace prefixes (hybridfast.steering, DESIGN.md 1.2): the
per-example losses and gradients equal a plain full-sequence forward with the vector added at the
target positions, whatever part of the prefix KV is kept across epochs, and the trained vectors
equal the per-batch form's."""
import pytest
import torch

from hybridfast.baselines import steering_hook
from hybridfast.steering import (VectorExample, kv_bytes_per_token, _PrefixPlan, _shared_loss,
                                 group_prefixes, train_vectors)
from hybridfast.tiny import tiny_model

COLD = 0.7
LAYER = 1


def _traces_examples(seed=0, vocab=96):
    """Examples as build_vector_examples makes them: prompt = task + thinking up to sentence i,
    target = sentence i, from three traces with ragged sentence lengths, plus a prompt whose last
    prefix token differs from its trace's (a different tokenization at the boundary), a one-token
    prompt (empty prefix) and a prompt shared by two examples."""
    g = torch.Generator().manual_seed(seed)
    exs = []
    for tr in range(3):
        task = torch.randint(3, vocab, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g).tolist()
        sent = [torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                for _ in range(6)]
        for i in range(5):
            prompt = task + sum(sent[:i], [])
            exs.append(VectorExample(prompt, sent[i], (tr + i) % 3))
        odd = task + sum(sent[:3], [])
        odd = odd[:-2] + [(odd[-2] + 1 - 3) % (vocab - 3) + 3] + odd[-1:]
        exs.append(VectorExample(odd, sent[3], tr % 3))
    exs.append(VectorExample([5], [6, 7, 8], 1))
    exs.append(VectorExample(list(exs[2].prompt_ids), [9, 10], 2))
    return exs


def _reference_loss(model, ex, v):
    """Plain forward of prompt + target with ``v`` added entering LAYER at the positions
    predicting the target."""
    p, t = len(ex.prompt_ids), len(ex.target_ids)
    ids = torch.tensor([list(ex.prompt_ids) + list(ex.target_ids)])
    mask = torch.zeros(1, p + t, 1)
    mask[0, p - 1: p + t - 1] = 1
    with torch.enable_grad(), steering_hook(model, LAYER, lambda h: h + mask * v):
        logits = model(input_ids=ids).logits[0, p - 1: p + t - 1].float() * COLD
        return torch.nn.functional.cross_entropy(logits, torch.tensor(list(ex.target_ids)))


def test_group_prefixes_shares_only_agreeing_token_ids():
    a = (1, 2, 3, 4, 5, 6)
    root, used, roots = group_prefixes([a[:2], a, a[:4], (1, 2, 9), (), (7, 8), a[:4]])
    assert roots[root[1]] == a and used[1] == 6
    assert root[0] == root[1] == root[2] == root[6] and used[0] == 2 and used[2] == used[6] == 4
    assert root[3] == root[1] and used[3] == 2          # (1, 2, 9): shares the 2 agreeing tokens
    assert root[4] == -1 and used[4] == 0
    assert roots[root[5]] == (7, 8) and used[5] == 2
    assert len(roots) == 2
    # a sequence agreeing on less than half its length gets a root of its own
    root, used, roots = group_prefixes([(1, 2, 3, 4, 5), (1, 9, 9, 9, 9)])
    assert len(roots) == 2 and used == [5, 5]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("budget", ["all", "none", "some"])
def test_shared_prefix_losses_and_gradients_match_full_forward(family, budget):
    model = tiny_model(family, seed=2)
    for p in model.parameters():
        p.requires_grad_(False)
    exs = _traces_examples()
    roots = group_prefixes([e.prompt_ids[:-1] for e in exs])[2]
    assert len(roots) == 3                   # one per trace (the odd rows share most of theirs)
    one = min(len(r) for r in roots) * kv_bytes_per_token(model)
    plan = _PrefixPlan(model, exs, budget_bytes=dict(all=1 << 30, none=0, some=one)[budget],
                       batch_size=4, pad_id=0)
    assert len(plan.offset) == dict(all=3, none=0, some=1)[budget]
    assert sum(u < len(e.prompt_ids) - 1 for u, e in zip(plan.used, exs)) == 3    # the odd rows
    g = torch.Generator().manual_seed(1)
    V = torch.randn(len(exs), model.config.hidden_size, generator=g)
    order = torch.randperm(len(exs), generator=g).tolist()
    for idx in (order[:7], order[7:]):       # rows of several traces, ragged lengths
        add = V[idx].clone().requires_grad_(True)
        loss, _ = _shared_loss(model, plan, exs, idx, add, LAYER, COLD, torch.device("cpu"))
        loss.sum().backward()
        for r, i in enumerate(idx):
            v = V[i].clone().requires_grad_(True)
            ref = _reference_loss(model, exs[i], v)
            ref.backward()
            assert torch.allclose(loss[r], ref, atol=1e-5, rtol=1e-5), (i, loss[r].item(), ref.item())
            assert torch.allclose(add.grad[r], v.grad, atol=1e-5, rtol=1e-4), i
    assert all(p.grad is None for p in model.parameters())


KW = dict(epochs=4, batch_size=4, seed=3, patience=100)


@pytest.fixture(scope="module")
def per_batch_run():
    """The per-batch form (``share_prefixes=False``) on the trace examples, with a bias vector."""
    model = tiny_model("qwen2", seed=1)
    exs = _traces_examples(seed=3)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(9)) * 0.1
    return model, exs, bias, train_vectors(model, exs, 3, LAYER, bias=bias, share_prefixes=False, **KW)


@pytest.mark.parametrize("budget", ["all", "none", "one"])
def test_trained_vectors_match_per_batch_prefixes(per_batch_run, budget):
    model, exs, bias, old = per_batch_run
    roots = group_prefixes([tuple(e.prompt_ids[:-1]) for e in exs])[2]
    one = min(map(len, roots)) * kv_bytes_per_token(model)
    new = train_vectors(model, exs, 3, LAYER, bias=bias, **KW,
                        prefix_cache_bytes=dict(all=1 << 30, none=0, one=one)[budget])
    assert new.steps == old.steps and new.epochs == old.epochs == 4
    assert torch.allclose(torch.tensor(new.history), torch.tensor(old.history), atol=1e-5, rtol=1e-5)
    assert torch.allclose(new.V, old.V, atol=1e-5), (new.V - old.V).abs().max()
    # every prefix is encoded without autograd: the kept roots once per call, the others per batch
    if budget == "all":                      # one padded pass over the three roots
        assert sum(map(len, roots)) <= new.token_forwards["prefix"] <= 3 * max(map(len, roots))
    else:
        assert new.token_forwards["prefix"] > 3 * max(map(len, roots))
    assert new.token_forwards["grad"] < old.token_forwards["grad"]
