"""End to end: the demo pipeline, the discover/train-vectors CLI, the trace viewer."""
import json
import os
import subprocess
import sys

import pytest
import torch



def test_demo_command_runs_end_to_end(tmp_path):
    """`hybridfast demo` through the CLI on the tiny models (the default, SmolLM2, is the same
    code with another model; it runs in minutes, see the README)."""
    r = subprocess.run([sys.executable, "-m", "hybridfast.cli", "demo", "--tiny", "--out", str(tmp_path / "demo"),
                        "--n-train", "12", "--n-eval", "2", "--max-new-tokens", "24"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "report:" in r.stdout
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(s["methods"]) == {"base", "thinking", "hybrid-paper", "hybrid-routed", "power-mh", "power-smc"}
    for name in ("traces.jsonl", "results.jsonl", "summary.json", "report.md", "traces.html",
                 "sae/sae.safetensors", "sae/taxonomy.json", "vectors/vectors.safetensors",
                 "accuracy.svg", "category_usage.svg", "acceptance.svg"):
        assert (tmp_path / "demo" / name).exists(), name
    rows = [json.loads(x) for x in (tmp_path / "demo" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all({"problem", "method", "output", "correct", "tokens"} <= set(r) for r in rows)
    assert s["methods"]["hybrid-paper"]["steered_fraction"] > 0
    assert s["layers"] == {"sae_layer": 2, "steer_layer": 1} and "tiny" in s["models"]
    assert all(len(v) > 0 for v in s["taxonomy_examples"].values())
    html = (tmp_path / "demo" / "traces.html").read_text()
    assert "class='s'" in html and "title='idx" in html
    svg = (tmp_path / "demo" / "acceptance.svg").read_text()
    assert svg.startswith("<svg") and "<polyline" in svg


def test_discover_and_train_vectors_cli(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "hybridfast.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, env=env, timeout=600)
    # traces with real sentences: GSM8K worked solutions stand in for the thinking text
    from hybridfast.datasets import load_problems
    from hybridfast.prompts import thinking_prompt
    from hybridfast.tiny import tiny_tokenizer
    import json as _j
    raw = [_j.loads(x) for x in open(os.path.join(os.path.dirname(__file__), "..", "hybridfast", "data",
                                                  "gsm8k_train_sample.jsonl")).read().splitlines()[:40]]
    tk = tiny_tokenizer()
    traces = [dict(question=r["question"], prompt=thinking_prompt(tk, r["question"]),
                   response="<think>" + r["answer"] + "</think>", thinking=r["answer"]) for r in raw]
    (tmp_path / "traces.jsonl").write_text("".join(_j.dumps(t) + "\n" for t in traces))
    r = run("discover", "--traces", str(tmp_path / "traces.jsonl"), "--K", "4", "--out", str(tmp_path / "tx"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("train-vectors", "--sae", str(tmp_path / "tx" / "sae-L2-K4"), "--steer-layer", "1",
            "--epochs", "2", "--min-target-words", "3", "--min-bias-words", "5", "--out", str(tmp_path / "v"))
    assert r.returncode == 0, r.stderr[-2000:]
    from hybridfast import HybridModel
    from hybridfast.io import load_sae, load_vectors
    from hybridfast.tiny import tiny_pair, tiny_tokenizer
    tok = tiny_tokenizer()
    base, think = tiny_pair(tok, seed=0)
    sae, vec = load_sae(tmp_path / "tx" / "sae-L2-K4"), load_vectors(tmp_path / "v")
    assert sae.n_latents == 4 and vec.V.shape == (4, 64) and vec.bias is not None
    hm = HybridModel(base, think, sae, vec, sae_layer=2, steer_layer=1, base_tokenizer=tok,
                     thinking_tokenizer=tok)
    out = hm.generate(["Question: 1+1?"], ["<s>user: 1+1?\n"], 8)
    assert len(out[0].ids) == 8 and isinstance(out[0].text, str)
