"""The lm-evaluation-harness model ``hybridfast``: a local GSM8K task (bundled JSONL, no network)
through the harness gives Engine.generate's greedy text cut at the task's stop strings; every
method generates; loglikelihood equals a direct forward of the Hugging Face model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from hybridfast.artifact_settings import SteeringArtifacts
from hybridfast.artifacts import as_sae, as_vectors
from hybridfast.engine import Engine
from hybridfast.hybrid import HybridModel
from hybridfast.lm_eval_model import HybridfastLM
from hybridfast.serving.model_set import ModelSet
from hybridfast.tiny import tiny_pair, tiny_tokenizer

from .helpers import router_and_vectors

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"
TASK = "hybridfast_gsm8k_local"
UNTIL = ["\n\n", "Question:"]          # the task's stop strings
TASK_TOKENS = 24                      # the task's max_gen_toks


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer()
    base, think = tiny_pair(tok)
    sae, vec = router_and_vectors(base.config.hidden_size, base.config.hidden_size)
    return ModelSet("tiny", base, tok, think, tok, SteeringArtifacts(as_sae(sae), as_vectors(vec), 1, 2))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)                  # the task's data_files path is relative to the repository


def cut(text: str, until) -> str:
    """``text`` up to its first stop string."""
    return text[: min([text.index(u) for u in until if u in text], default=len(text))]


def generate(lm, contexts, until, max_gen_toks):
    reqs = [Instance("generate_until", {}, (c, dict(until=until, max_gen_toks=max_gen_toks)), i)
            for i, c in enumerate(contexts)]
    return lm.generate_until(reqs)


def questions(k):
    return [json.loads(line)["question"] for line in
            (ROOT / "hybridfast" / "data" / "gsm8k_test_sample.jsonl").read_text().splitlines()[:k]]


def test_local_gsm8k_task_gives_engine_greedy_text(models):
    out = simple_evaluate(model="hybridfast", model_args=dict(models=models, max_length=512), tasks=[TASK],
                          task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), limit=4, log_samples=True)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    contexts = [f"Question: {s['doc']['question']}\nAnswer:" for s in samples]
    tok = models.tokenizer
    ref = Engine(models.base).generate([tok(c, add_special_tokens=False)["input_ids"] for c in contexts],
                                       TASK_TOKENS, eos_token_id=tok.eos_token_id).sequences()
    assert [s["resps"][0][0] for s in samples] == [cut(tok.decode(r, skip_special_tokens=True), UNTIL) for r in ref]
    assert out["results"][TASK]["sample_len"] == 4 and "exact_match,none" in out["results"][TASK]


@pytest.mark.parametrize("mode", ["routed", "paper"])
def test_hybrid_generate_until_equals_hybrid_model(models, mode):
    lm = HybridfastLM(models=models, method=f"hybrid-{mode}", rows=4, max_length=256)
    contexts = [q[:80] for q in questions(5)]
    got = generate(lm, contexts, ["."], 20)
    st, tok = models.steering, models.tokenizer
    hm = HybridModel(models.base, models.thinking, st.sae, st.vectors, sae_layer=st.sae_layer,
                     steer_layer=st.steer_layer, mode=mode, base_tokenizer=tok, thinking_tokenizer=tok)
    ref = hm.generate(contexts, contexts, 20, eos_token_id=tok.eos_token_id)
    assert got == [cut(r.text, ["."]) for r in ref.results]


@pytest.mark.parametrize("method,settings", [("power-mh", dict(alpha=2.0, block_size=4, n_mcmc=1)),
                                             ("power-smc", dict(alpha=2.0, n_particles=2)),
                                             ("power-scalable", dict(alpha=2.0, n_candidates=2, n_rollouts=2,
                                                                     horizon=2))])
def test_power_generate_until_is_reproducible_and_stops(models, method, settings):
    contexts = [q[:60] for q in questions(2)]
    run = lambda: generate(HybridfastLM(models=models, method=method, seed=3, max_length=128, **settings),  # noqa: E731
                           contexts, [" "], 8)
    first = run()
    assert first == run()                      # the same seed, the same samples
    assert all(" " not in text for text in first) and len(first) == 2


def test_sampled_plain_uses_request_temperature(models):
    lm = HybridfastLM(models=models, rows=4, max_length=128, seed=1)
    ctx = ["Question: How many eggs?\nAnswer:"] * 3
    reqs = [Instance("generate_until", {}, (c, dict(until=[], max_gen_toks=12, do_sample=True, temperature=1.5)), i)
            for i, c in enumerate(ctx)]
    sampled = lm.generate_until(reqs)
    greedy = generate(lm, ctx, [], 12)
    assert len(set(greedy)) == 1 and len(set(sampled)) > 1   # the rows of one batch draw different noise


def test_loglikelihood_matches_a_direct_forward(models):
    lm = HybridfastLM(models=models, rows=2, max_length=512)
    pairs = [("Question: Janet has 3 ducks.\nAnswer:", " 3"), ("The robe takes", " 2 bolts of blue fiber"),
             ("", "Hello world")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    tok = models.tokenizer
    for (ctx, cont), (logp, greedy) in zip(pairs, got):
        if ctx:
            ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
            cont_ids = tok(ctx + cont, add_special_tokens=False)["input_ids"][len(ctx_ids):]
        else:
            ctx_ids, cont_ids = [tok.bos_token_id], tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(models.base(torch.tensor([ctx_ids + cont_ids])).logits[0].double(), -1)
        rows = lp[len(ctx_ids) - 1: -1]
        target = torch.tensor(cont_ids)
        assert logp == pytest.approx(float(rows.gather(1, target[:, None]).sum()), abs=1e-3)
        assert greedy == bool((rows.argmax(-1) == target).all())
    text = "Janet sells 16 - 3 - 4 = 9 duck eggs a day."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(models.base(torch.tensor([ids])).logits[0].double(), -1)
    assert rolling == pytest.approx(float(lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum()), abs=1e-3)


def test_refusals_name_the_bad_value(models):
    with pytest.raises(NotImplementedError, match="loglikelihood is defined for method=plain only"):
        HybridfastLM(models=models, method="hybrid-routed").loglikelihood(
            [Instance("loglikelihood", {}, ("a", " b"), 0)])
    with pytest.raises(ValueError, match=r"unknown model_args \['alhpa'\]"):
        HybridfastLM(models=models, method="power-mh", alhpa=2.0)
    with pytest.raises(ValueError, match="n_mcmc is not a setting of method plain"):
        HybridfastLM(models=models, n_mcmc=2)
    with pytest.raises(ValueError, match=r"top_p=0.9 is not supported"):
        lm = HybridfastLM(models=models, max_length=64)
        lm.generate_until([Instance("generate_until", {}, ("a", dict(until=[], top_p=0.9)), 0)])


def test_module_runs_lm_eval_with_the_model_registered():
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "hybridfast.lm_eval_model", "--model", "hybridfast", "--model_args",
                        "model=tiny,max_length=256,rows=2", "--tasks", TASK, "--include_path", str(TASKS),
                        "--limit", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert TASK in r.stdout and "exact_match" in r.stdout


def direct_score(models, ctx_ids, cont_ids, max_length):
    """``sum log p(cont | ctx)`` from a direct forward of the last ``max_length`` input tokens."""
    inp = (ctx_ids + cont_ids)[-(max_length + 1):][:-1]
    with torch.no_grad():
        lp = torch.log_softmax(models.base(torch.tensor([inp])).logits[0].double(), -1)
    return float(lp[len(inp) - len(cont_ids):].gather(1, torch.tensor(cont_ids)[:, None]).sum())


def test_truncated_and_rolling_windows_match_a_direct_forward(models):
    lm = HybridfastLM(models=models, rows=2, max_length=24)      # every input but the last is longer than 24 tokens
    pairs = [("Question: Janet's ducks lay 16 eggs per day and she eats three.\nAnswer:", " 9 eggs"),
             ("The robe takes", " 2 bolts of blue"), ("a", " b")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (logp, _) in zip(pairs, got):
        assert logp == pytest.approx(direct_score(models, *lm._encode_pair(ctx, cont), 24), abs=1e-3)
    text = "Janet sells 16 - 3 - 4 = 9 duck eggs a day. She bakes muffins for her friends every day with four."
    ids = models.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * 24                                       # three windows, the last partial
    want = direct_score(models, [models.tokenizer.bos_token_id], ids[:24], 24) + \
        sum(direct_score(models, ids[:k], ids[k: k + 24], 24) for k in range(24, len(ids), 24))
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(want, abs=1e-3)


def test_loglikelihood_refuses_what_it_cannot_score(models):
    lm = HybridfastLM(models=models, max_length=16)
    with pytest.raises(ValueError, match=r"request 1: its continuation has \d+ tokens, more than max_length=16"):
        pairs = [("a", " b"), ("The robe", " takes 2 bolts of blue fiber and half that much white fiber")]
        lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    with pytest.raises(ValueError, match="request 0 has no context tokens"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("  ", "Hello"), 0)])


def test_do_sample_without_a_temperature_is_refused_not_greedy(models):
    lm = HybridfastLM(models=models, max_length=64)
    for kwargs in (dict(do_sample=True), dict(do_sample=True, temperature=0.0)):
        with pytest.raises(ValueError, match=r"do_sample=True needs a temperature > 0, got temperature=0.0"):
            req = Instance("generate_until", {}, ("a", dict(until=[], max_gen_toks=4, **kwargs)), 0)
            lm.generate_until([req])
    sampled = HybridfastLM(models=models, max_length=64, temperature=1.0)   # the model's temperature serves
    assert len(generate(sampled, ["a"], [], 4)) == 1
    assert sampled._request_settings(dict(do_sample=True))[0].temperature == 1.0
