"""Scalable power sampling of the routed hybrid model (``PowerSampler(method="scalable", steer=)``):
zero steering vectors give exactly the unsteered samples, real ones change them, and every
sampled token's log p equals a teacher-forced recomputation with the routed model (the
``transformers`` forward with a steering hook, not our engine), for both variants and both
prefix layouts; bad ``steer=`` values are refused."""
import pytest
import torch

from hybridfast import HybridModel
from hybridfast.power import PowerSampler
from hybridfast.scalable import expected_token_forwards

from .helpers import pair, routed_logp, router_and_vectors

PROMPTS, THINK = [[5, 6, 7], [8, 9, 10, 11, 12]], [[3, 4], [20, 21, 22, 23]]
KW = dict(method="scalable", alpha=4, max_new_tokens=7, n_candidates=3, n_rollouts=3, horizon=3,
          n_proposals=4, block_size=3, eos_token_id=2)


@pytest.fixture(scope="module")
def models():
    base, think = pair("qwen2")
    return base, think, router_and_vectors(64, 64)


def hybrid(models, vectors=None):
    base, think, (sae, vec) = models
    return HybridModel(base, think, sae, vec if vectors is None else vectors, sae_layer=2, steer_layer=1,
                       mode="routed", threshold=-1e9)


def run(base, variant, steer=None, prefix_kv="shared"):
    ps = PowerSampler(base, variant=variant, prefix_kv=prefix_kv, steer=steer, **KW)
    return ps.sample(PROMPTS, n_chains=2, generator=torch.Generator().manual_seed(3),
                     thinking_prompts=None if steer is None else THINK)


@pytest.mark.parametrize("variant", ["token", "block"])
def test_steered_scalable_samples_the_routed_model(models, variant):
    base = models[0]
    plain = run(base, variant)
    zero = run(base, variant, hybrid(models, (torch.zeros(5, 64), torch.zeros(64))))
    assert [(r.ids, r.logp, r.logq) for r in zero] == [(r.ids, r.logp, r.logq) for r in plain]
    hm = hybrid(models)
    runs = {kv: run(base, variant, hm, kv) for kv in ("shared", "copy")}
    for out in runs.values():
        assert [r.ids for r in out] != [r.ids for r in plain]        # steering is on
        for r in out:
            ref = routed_logp(hm, PROMPTS[r.prompt_index], THINK[r.prompt_index], r.ids)
            assert r.logp == pytest.approx(ref.tolist(), abs=1e-4)
    assert [r.ids for r in runs["shared"]] == [r.ids for r in runs["copy"]]


@pytest.mark.parametrize("variant", ["token", "block"])
def test_every_forward_is_routed(models, variant):
    """Without EOS the rows fed after the prefill (candidates, proposals, duplicate ones too, and
    rollouts) follow the closed form, and every one of them is routed."""
    hm, routed = hybrid(models), []
    route = hm.route

    def counting(h, x, *args):
        routed.append(h.shape[0])
        return route(h, x, *args)
    hm.route = counting
    ps = PowerSampler(models[0], variant=variant, steer=hm, **dict(KW, eos_token_id=-1))
    ps.sample(PROMPTS, generator=torch.Generator().manual_seed(3), thinking_prompts=THINK)
    assert routed[0] == len(PROMPTS) * max(map(len, PROMPTS))        # the prefill, every position
    settings = {k: KW[k] for k in ("n_candidates", "n_rollouts", "horizon", "n_proposals", "block_size")}
    fed = [expected_token_forwards(KW["max_new_tokens"], len(p), variant=variant, **settings) - len(p)
           for p in PROMPTS]
    assert sum(routed[1:]) == sum(fed) > 0


def test_bad_steer_is_refused(models):
    base, think, (sae, vec) = models
    with pytest.raises(ValueError, match="HybridModel in routed mode"):
        PowerSampler(base, method="scalable", steer=HybridModel(base, think, sae, vec, sae_layer=2, steer_layer=1))
    with pytest.raises(ValueError, match="base model must be the sampled model"):
        PowerSampler(think, method="scalable", steer=hybrid(models))
    with pytest.raises(ValueError, match="one thinking prompt per prompt"):
        PowerSampler(base, steer=hybrid(models), **KW).sample(PROMPTS)
