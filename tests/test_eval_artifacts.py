"""Runs that cannot silently give wrong numbers, part two: artifacts carry their settings (layers
come from them, a differing flag, another K, another model or a non-finite tensor is refused),
checkpoints resume only their own configuration, each model reads prompts in its own chat
template, every power setting is a flag in the run identity, and the CLI reports its version,
documents every flag and never overwrites a benchmark result unasked."""
import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hybridfast
from hybridfast import cli
from hybridfast.eval import ResultsLog, main, routed_steered_tokens, run_eval
from hybridfast.io import load_vectors
from hybridfast.provenance import text_hash
from hybridfast.tiny import tiny_pair, tiny_tokenizer

from .helpers import error_line, forbid_model_loading, refused, steering_artifacts

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--limit", "1", "--batch-size", "1", "--max-new-tokens", "4"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hybridfast.cli", *args], capture_output=True, text=True,
                          timeout=600)


def _spy_hybrid_layers(monkeypatch) -> list:
    """Record (sae_layer, steer_layer) of every HybridModel built from now on."""
    from hybridfast.hybrid import HybridModel
    seen, init = [], HybridModel.__init__

    @functools.wraps(init)          # keeps the signature the run identity reads
    def spy(self, *a, **k):
        seen.append((k["sae_layer"], k["steer_layer"]))
        init(self, *a, **k)
    monkeypatch.setattr(HybridModel, "__init__", spy)
    return seen


# ------------------------------------------------------------------------------ artifact settings

def test_layers_come_from_the_artifacts_and_a_differing_flag_is_refused_naming_both(tmp_path, capsys,
                                                                                      monkeypatch):
    sae, vec = steering_artifacts(tmp_path, sae_layer=3, steer_layer=2)
    used = _spy_hybrid_layers(monkeypatch)
    run_eval("hybrid-routed", sae_dir=sae, vectors_dir=vec, limit=1, max_new_tokens=4, out=tmp_path / "a",
             progress=False)
    row, = ResultsLog(tmp_path / "a" / "results.jsonl").rows()
    assert used == [(3, 2)]                                     # the artifacts' layers, not 2 / 1
    assert (row["run"]["hybrid"]["sae_layer"], row["run"]["hybrid"]["steer_layer"]) == (3, 2)
    assert row["run"]["artifacts"]["sae"]["layer"] == 3 and row["run"]["artifacts"]["vectors"]["steer_layer"] == 2
    # the real command: exit 2 and one line naming the flag, both values and the way out
    r = _cli("eval", "--method", "hybrid-routed", "--sae", sae, "--vectors", vec, "--sae-layer", "2",
             "--out", str(tmp_path / "b"), *FAST)
    assert r.returncode == 2, r.stderr[-2000:]
    assert error_line(r.stderr) == (f"hybridfast: error: --sae-layer 2 differs from the layer 3 that --sae {sae} was "
                                     f"made for; drop --sae-layer to use 3, or pass --override-artifact-settings "
                                     f"to use 2 anyway")
    forbid_model_loading(monkeypatch)
    line = refused(["--method", "hybrid-paper", "--sae", sae, "--vectors", vec, "--steer-layer", "1",
                     "--out", str(tmp_path / "b"), *FAST], capsys)
    assert "--steer-layer 1 differs from the layer 2 that --vectors" in line
    assert not (tmp_path / "b").exists()
    monkeypatch.undo()
    used = _spy_hybrid_layers(monkeypatch)
    run_eval("hybrid-routed", sae_dir=sae, vectors_dir=vec, sae_layer=2, override_artifact_settings=True, limit=1,
             max_new_tokens=4, out=tmp_path / "c", progress=False)
    row, = ResultsLog(tmp_path / "c" / "results.jsonl").rows()
    assert used == [(2, 2)] and row["run"]["hybrid"]["sae_layer"] == 2 and row["run"]["artifacts"]["sae"]["layer"] == 3


def test_an_artifact_that_records_no_layer_needs_the_flag(tmp_path, capsys, monkeypatch):
    sae, vec = steering_artifacts(tmp_path)
    cfg = json.loads(Path(vec, "config.json").read_text())
    del cfg["steer_layer"]                                      # as an older hybridfast wrote it
    Path(vec, "config.json").write_text(json.dumps(cfg))
    assert load_vectors(vec).meta["steer_layer"] is None
    base = ["--method", "hybrid-routed", "--sae", sae, "--vectors", vec, "--out", str(tmp_path / "run"), *FAST]
    forbid_model_loading(monkeypatch)
    assert refused(base, capsys) == (f"hybridfast: error: --vectors {vec} records no layer (an older or foreign "
                                      f"artifact): pass --steer-layer")
    monkeypatch.undo()
    used = _spy_hybrid_layers(monkeypatch)
    main([*base, "--steer-layer", "1"])
    assert used == [(3, 1)]


@pytest.mark.parametrize("change,message", [
    (dict(vectors_K=4), "--sae {sae} has K=3 categories but --vectors {vec} has K=4 vectors"),
    (dict(sae_model="tiny-base"), "--sae {sae} was made with the model 'tiny-base', but the thinking model is "
                                  "--thinking tiny"),
    (dict(vectors_model="/models/other-base"), "--vectors {vec} was made with the model '/models/other-base', "
                                               "but the base model is --model tiny"),
])
def test_artifacts_of_another_taxonomy_or_model_are_refused(tmp_path, capsys, monkeypatch, change, message):
    sae, vec = steering_artifacts(tmp_path, **change)
    forbid_model_loading(monkeypatch)
    line = refused(["--method", "hybrid-paper", "--sae", sae, "--vectors", vec, "--out", str(tmp_path / "r"), *FAST],
                    capsys)
    assert line.startswith("hybridfast: error: " + message.format(sae=sae, vec=vec))


@pytest.mark.parametrize("which,tensor,value", [("vec", "V", float("nan")), ("vec", "bias", float("inf")),
                                                ("sae", "b_enc", float("-inf")), ("sae", "W_enc", float("nan"))])
def test_a_non_finite_tensor_is_refused_naming_it_and_its_artifact(tmp_path, capsys, monkeypatch, which, tensor,
                                                                   value):
    from hybridfast.io import load_tensors, save_tensors
    sae, vec = steering_artifacts(tmp_path)
    path = Path(sae if which == "sae" else vec, "sae.safetensors" if which == "sae" else "vectors.safetensors")
    t = load_tensors(path)
    t[tensor].view(-1)[1] = value
    save_tensors(path, t)
    forbid_model_loading(monkeypatch)
    line = refused(["--method", "hybrid-routed", "--sae", sae, "--vectors", vec, "--out", str(tmp_path / "r"), *FAST],
                    capsys)
    flag, kind, folder = ("--sae", "SAE", sae) if which == "sae" else ("--vectors", "vectors", vec)
    assert line.startswith(f"hybridfast: error: {flag} {folder}: {kind} {folder}: tensor {tensor!r} has 1 "
                           f"non-finite value(s) (NaN or inf)")


# ------------------------------------------------------------------------------ stale checkpoints

@pytest.fixture(scope="module")
def taxonomy(tmp_path_factory):
    """A discovered tiny taxonomy (traces + SAE folder), as `hybridfast discover` writes it."""
    from hybridfast.io import write_jsonl
    from hybridfast.prompts import thinking_prompt
    from hybridfast.taxonomy import discover, write_discovery
    folder = tmp_path_factory.mktemp("tax")
    raw = [json.loads(x) for x in (ROOT / "hybridfast" / "data" / "gsm8k_train_sample.jsonl").read_text().splitlines()]
    tok = tiny_tokenizer()
    _, think = tiny_pair(tok, seed=0)
    traces = [dict(question=r["question"], prompt=thinking_prompt(tok, r["question"]),
                   response="<think>" + r["answer"] + "</think>", thinking=r["answer"]) for r in raw[:30]]
    write_jsonl(folder / "traces.jsonl", traces)
    sae, tax, ann = discover(traces, think, tok, layer=2, n_latents=3, k=2, sae_kwargs=dict(epochs=20))
    return write_discovery(folder / "sae-L2-K3", sae, tax, ann, traces, layer=2, model_id="tiny-thinking")


def test_train_vectors_resumes_only_its_own_configuration(taxonomy, tmp_path):
    out = tmp_path / "vec"
    args = ["train-vectors", "--sae", str(taxonomy), "--epochs", "2", "--min-target-words", "3", "--n-train", "8",
            "--min-bias-words", "100000", "--out", str(out)]           # no bias vector: seconds, not minutes
    r = _cli(*args, "--steer-layer", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    finished = (out / "vectors.safetensors").read_bytes()
    # a finished layer-1 run in OUT: asking for layer 3 is refused, naming the key and the way out
    r = _cli(*args, "--steer-layer", "3")
    assert r.returncode == 2, r.stderr[-2000:]
    line = error_line(r.stderr)
    assert f"--out {out}: {out / 'checkpoint'} holds a checkpoint of another configuration (" in line
    assert "steer_layer: 1 -> 3" in line and line.endswith("pass --restart to discard it and train from scratch, "
                                                           "or another --out")
    assert (out / "vectors.safetensors").read_bytes() == finished          # the layer-1 vectors are untouched
    assert load_vectors(out).meta["steer_layer"] == 1                      # and keep their true layer
    r = _cli(*args, "--steer-layer", "3", "--restart")
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_vectors(out).meta["steer_layer"] == 3
    assert json.loads((out / "checkpoint" / "config.json").read_text())["config"]["steer_layer"] == 3
    layer3 = load_vectors(out).V
    r = _cli(*args, "--steer-layer", "3")                                  # the same configuration resumes
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.equal(load_vectors(out).V, layer3)


def test_a_checkpoint_without_a_recorded_configuration_is_not_resumed(tmp_path):
    from hybridfast.checkpoints import CheckpointMismatch, claim_checkpoint
    (tmp_path / "ck" / "categories").mkdir(parents=True)
    (tmp_path / "ck" / "categories" / "checkpoint.json").write_text("{}")
    with pytest.raises(CheckpointMismatch, match="records no configuration"):
        claim_checkpoint(tmp_path / "ck", dict(steer_layer=1))
    claim_checkpoint(tmp_path / "ck", dict(steer_layer=1), restart=True)
    assert not (tmp_path / "ck" / "categories").exists()
    with pytest.raises(CheckpointMismatch, match=r"steer_layer: 1 -> 2"):
        claim_checkpoint(tmp_path / "ck", dict(steer_layer=2))


# ------------------------------------------------------------------------------ prompt formats

THINK_TEMPLATE = ("{% for m in messages %}<s>THINKER {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<think>\n{% endif %}")


def test_the_thinking_model_reads_its_own_chat_template_and_the_run_records_it(tmp_path, monkeypatch):
    from hybridfast.engine import Engine
    from hybridfast.hybrid import HybridModel
    tok = tiny_tokenizer()
    base, think = tiny_pair(tok, seed=0)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    think.save_pretrained(tmp_path / "think")
    tok.chat_template = THINK_TEMPLATE
    tok.save_pretrained(tmp_path / "think")
    models = dict(model=str(tmp_path / "base"), thinking=str(tmp_path / "think"))
    fed, stream = [], Engine.stream
    monkeypatch.setattr(Engine, "stream", functools.wraps(stream)(
        lambda self, prompts, *a, **k: fed.extend(prompts) or stream(self, prompts, *a, **k)))
    run_eval("thinking", **models, limit=2, max_new_tokens=4, out=tmp_path / "t", progress=False)
    assert len(fed) == 2 and all(tok.decode(ids).startswith("<s>THINKER ") for ids in fed)
    row = ResultsLog(tmp_path / "t" / "results.jsonl").rows()[0]
    assert row["run"]["prompts"] == {"thinking": dict(model="thinking", format="chat template",
                                                      template=text_hash(THINK_TEMPLATE))}
    assert text_hash(tiny_tokenizer().chat_template) != text_hash(THINK_TEMPLATE)
    # a hybrid run: the thinking side gets the thinking template, the base side its task prompt
    sae, vec = steering_artifacts(tmp_path, sae_model=str(tmp_path / "think"), vectors_model=str(tmp_path / "base"))
    seen, hstream = {}, HybridModel.stream
    monkeypatch.setattr(HybridModel, "stream", functools.wraps(hstream)(
        lambda self, b, t, *a, **k: seen.update(base=b, thinking=t) or hstream(self, b, t, *a, **k)))
    run_eval("hybrid-routed", **models, sae_dir=sae, vectors_dir=vec, limit=2, max_new_tokens=4,
             out=tmp_path / "h", progress=False)
    assert all(p.startswith("<s>THINKER ") for p in seen["thinking"])
    assert all(p.startswith("Task: Answer the question below.") for p in seen["base"])
    row = ResultsLog(tmp_path / "h" / "results.jsonl").rows()[0]
    assert row["run"]["prompts"]["thinking"]["template"] == text_hash(THINK_TEMPLATE)
    assert row["run"]["prompts"]["base"]["model"] == "base" and row["run"]["dtype"] == "stored"


# ------------------------------------------------------------------------------ power settings

def test_every_power_setting_is_a_flag_in_the_run_identity(tmp_path, capsys, monkeypatch):
    for method in ("power-mh", "power-smc"):
        main(["--method", method, "--out", str(tmp_path / method), *FAST])
    capsys.readouterr()
    row = ResultsLog(tmp_path / "power-smc" / "results.jsonl").rows()[0]
    assert {k: row["run"]["power"][k] for k in ("alpha", "block_size", "n_mcmc", "n_particles")} == \
        dict(alpha=4.0, block_size=1, n_mcmc=2, n_particles=8)
    forbid_model_loading(monkeypatch)
    for method, flags, change in [("power-mh", ["--alpha", "5"], "power.alpha: 4.0 -> 5.0"),
                                  ("power-mh", ["--block-size", "2"], "power.block_size: 1 -> 2"),
                                  ("power-mh", ["--n-mcmc", "3"], "power.n_mcmc: 2 -> 3"),
                                  ("power-mh", ["--dtype", "bf16"], 'dtype: "fp32" -> "bf16"'),
                                  ("power-smc", ["--n-particles", "4"], "power.n_particles: 8 -> 4")]:
        line = refused(["--method", method, "--out", str(tmp_path / method), *FAST, *flags], capsys)
        assert f"differs in {change};" in line, line


def test_power_hybrid_reports_the_tokens_it_steered(tmp_path):
    from hybridfast.hybrid import HybridModel
    from hybridfast.io import load_sae
    from hybridfast.prompts import base_prompt, thinking_prompt
    sae, vec = steering_artifacts(tmp_path)
    tok = tiny_tokenizer()
    base, think = tiny_pair(tok, seed=0)
    qs = ["What is 2 + 3?", "Tom has 5 apples and eats 2. How many are left?"]
    tp = [thinking_prompt(tok, q) for q in qs]
    partial = False
    for threshold in (-1e9, 20.0, 50.0, 100.0):   # the recomputation agrees with routed generation's own record
        hm = HybridModel(base, think, load_sae(sae), load_vectors(vec), sae_layer=3, steer_layer=2, mode="routed",
                         threshold=threshold, base_tokenizer=tok, thinking_tokenizer=tok)
        out = hm.generate([base_prompt(q) for q in qs], tp, 16, eos_token_id=tok.eos_token_id)
        counts = [sum(r.steered) for r in out.results]
        assert routed_steered_tokens(hm, tp, out.results) == counts
        partial |= any(0 < c < len(r.ids) for c, r in zip(counts, out.results))
    assert partial
    for threshold, steered_all in ((-1e9, True), (1e9, False)):     # the vectors' recorded threshold is used
        sae, vec = steering_artifacts(tmp_path / str(threshold), threshold=threshold)
        run_eval("power-hybrid", sae_dir=sae, vectors_dir=vec, limit=2, batch_size=2, max_new_tokens=6,
                 out=tmp_path / f"p{threshold}", progress=False)
        rows = ResultsLog(tmp_path / f"p{threshold}" / "results.jsonl").rows()
        assert all(r["run"]["hybrid"]["threshold"] == threshold for r in rows)
        assert [r["steered_tokens"] for r in rows] == [r["tokens"] if steered_all else 0 for r in rows]
        assert all(r["tokens"] > 0 for r in rows)


def test_power_sample_rows_hold_their_own_stats_and_the_summary_the_batch_totals(tmp_path, capsys):
    from hybridfast.power_cli import main as power_main
    (tmp_path / "in.jsonl").write_text('{"question": "What is 2+2?"}\n{"id": "b", "prompt": "Hello"}\n')
    out = tmp_path / "out.jsonl"
    args = [str(tmp_path / "in.jsonl"), str(out), "--max-new-tokens", "4", "--block-size", "2", "--n-mcmc", "1",
            "--chains", "2", "--batch", "1"]
    power_main(args)
    rows = ResultsLog(out).rows()
    assert sorted((r["id"], r["chain"]) for r in rows) == [("0", 0), ("0", 1), ("b", 0), ("b", 1)]
    assert all({"acceptance_rate", "proposals"} <= set(r) for r in rows)
    assert not any({"token_forwards", "decoded_tokens", "seconds", "chains"} & set(r) for r in rows)
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert [b["ids"] for b in summary["batches"]] == [["0"], ["b"]]
    assert summary["totals"]["token_forwards"] == sum(b["token_forwards"] for b in summary["batches"]) > 0
    assert summary["run"]["chains"] == 2 and {r["run_id"] for r in rows} == {summary["run_id"]}
    capsys.readouterr()
    line = refused([*args, "--chains", "3"], capsys, power_main)
    assert "differs in chains: 2 -> 3;" in line
    power_main(args)
    assert capsys.readouterr().out.startswith("0 prompts sampled, 2 already done")


# ------------------------------------------------------------------------------ CLI hygiene

def test_version_and_top_level_errors():
    r = _cli("--version")
    assert (r.returncode, r.stdout) == (0, f"hybridfast {hybridfast.__version__}\n")
    r = _cli("no-such-command")
    assert r.returncode == 2
    assert "argument COMMAND: invalid choice: 'no-such-command'" in error_line(r.stderr)
    r = _cli()
    assert r.returncode == 2 and "the following arguments are required: COMMAND" in error_line(r.stderr)


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_and_flag_has_help(command, monkeypatch):

    def capture(self, *a, **k):
        raise _Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(_Parsed) as e:
        cli.main([command])
    parser = e.value.parser
    assert parser.description and cli.COMMANDS[command][0]
    undocumented = [a.option_strings or a.dest for a in parser._actions
                    if not a.help or a.help == argparse.SUPPRESS]
    assert undocumented == []


def test_bench_writes_a_new_result_file_unless_overwrite(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import common
    from hybridfast import cli
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    tag = "cuda" if torch.cuda.is_available() else "cpu"
    cited = tmp_path / f"hybrid-tiny-qwen2-{tag}.json"
    cited.write_text("the result the README cites\n")
    args = ["bench", "--batch", "1", "--new-tokens", "2", "--K", "2", "--naive-max-batch", "0"]
    cli.main(args)
    cli.main(args)
    new = sorted(tmp_path.glob(f"hybrid-tiny-qwen2-{tag}-*.json"))
    assert len(new) == 2 and all(json.loads(f.read_text())["rows"][0]["B"] == 1 for f in new)
    assert cited.read_text() == "the result the README cites\n"
    capsys.readouterr()
    line = refused([*args[1:], "--out", str(new[0])], capsys, lambda argv: cli.main(["bench", *argv]))
    assert line == f"hybridfast: error: hybridfast bench: --out {new[0]} exists; pass --overwrite to replace it " \
                   f"(see --help)"
    cli.main([*args, "--overwrite"])
    assert json.loads(cited.read_text())["rows"][0]["B"] == 1
    assert len(list(tmp_path.glob("*.json"))) == 3


@pytest.mark.parametrize("method, settings, recorded", [
    ("power-hybrid-scalable", dict(scalable=dict(n_candidates=2, n_rollouts=2, horizon=2)),
     dict(method="scalable", n_candidates=2)),
    ("power-hybrid-smc", dict(n_particles=3), dict(method="smc", n_particles=3)),
])
def test_steered_power_methods_sample_the_routed_model(tmp_path, method, settings, recorded):
    """--method power-hybrid-scalable / power-hybrid-smc: PowerSampler(method=..., steer=routed
    HybridModel); the run records the sampler's settings and the routing, steered_tokens follows
    the threshold, and steering changes the samples."""
    outs = {}
    for threshold, steered_all in ((-1e9, True), (1e9, False)):
        sae, vec = steering_artifacts(tmp_path / str(threshold), threshold=threshold)
        out = tmp_path / f"s{threshold}"
        run_eval(method, sae_dir=sae, vectors_dir=vec, limit=3, batch_size=2, max_new_tokens=4, out=out,
                 progress=False, **settings)
        rows = ResultsLog(out / "results.jsonl").rows()
        assert len(rows) == 3 and all(r["tokens"] > 0 for r in rows)
        run = rows[0]["run"]
        assert {k: run["power"][k] for k in recorded} == recorded
        assert run["hybrid"]["mode"] == "routed" and run["hybrid"]["threshold"] == threshold
        assert [r["steered_tokens"] for r in rows] == [r["tokens"] if steered_all else 0 for r in rows]
        outs[threshold] = [r["output"] for r in rows]
    assert outs[-1e9] != outs[1e9]
