"""Runs that cannot silently give wrong numbers, part two: a non-finite tensor in an artifact is
refused naming it, checkpoints resume only their own configuration, the CLI reports its version,
its usage errors are one line, and a benchmark never overwrites a result unasked."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hybridfast
import hybridfast.eval as ev
from hybridfast.artifacts import SAEParams, SteeringVectors
from hybridfast.eval import main
from hybridfast.io import save_sae, save_vectors

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--limit", "1", "--batch-size", "1", "--max-new-tokens", "4"]



def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hybridfast.cli", *args], capture_output=True, text=True,
                          timeout=600)


def _error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridfast: error: "), text
    return lines[0]


def _refused(argv, capsys, entry=main) -> str:
    with pytest.raises(SystemExit) as e:
        entry(argv)
    assert e.value.code == 2
    return _error_line(capsys.readouterr().err)


def _forbid_model_loading(monkeypatch):
    monkeypatch.setattr(ev, "_models", lambda *a, **k: pytest.fail("a model was loaded"))


def _artifacts(folder, *, sae_layer=3, steer_layer=2, K=3, vectors_K=None, threshold=None,
               sae_model="tiny-thinking", vectors_model="tiny-base", d=64):
    """An SAE and a vectors folder for the tiny pair (hidden size 64, 4 blocks)."""
    g = torch.Generator().manual_seed(0)
    sae = SAEParams(torch.randn(d, K, generator=g), torch.zeros(K), torch.zeros(d))
    vec = SteeringVectors(torch.randn(vectors_K or K, d, generator=g), torch.randn(d, generator=g))
    save_sae(folder / "sae", sae, layer=sae_layer, model_id=sae_model)
    save_vectors(folder / "vec", vec, steer_layer=steer_layer, model_id=vectors_model, threshold=threshold)
    return str(folder / "sae"), str(folder / "vec")


@pytest.mark.parametrize("which,tensor,value", [("vec", "V", float("nan")), ("vec", "bias", float("inf")),
                                                ("sae", "b_enc", float("-inf")), ("sae", "W_enc", float("nan"))])
def test_a_non_finite_tensor_is_refused_naming_it_and_its_artifact(tmp_path, capsys, monkeypatch, which, tensor,
                                                                   value):
    from hybridfast.io import load_tensors, save_tensors
    sae, vec = _artifacts(tmp_path)
    path = Path(sae if which == "sae" else vec, "sae.safetensors" if which == "sae" else "vectors.safetensors")
    t = load_tensors(path)
    t[tensor].view(-1)[1] = value
    save_tensors(path, t)
    _forbid_model_loading(monkeypatch)
    line = _refused(["--method", "hybrid-routed", "--sae", sae, "--vectors", vec, "--out", str(tmp_path / "r"), *FAST],
                    capsys)
    flag, kind, folder = ("--sae", "SAE", sae) if which == "sae" else ("--vectors", "vectors", vec)
    assert line.startswith(f"hybridfast: error: {flag} {folder}: {kind} {folder}: tensor {tensor!r} has 1 "
                           f"non-finite value(s) (NaN or inf)")


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


def test_version_and_top_level_errors():
    r = _cli("--version")
    assert (r.returncode, r.stdout) == (0, f"hybridfast {hybridfast.__version__}\n")
    r = _cli("no-such-command")
    assert r.returncode == 2
    assert "argument COMMAND: invalid choice: 'no-such-command'" in _error_line(r.stderr)
    r = _cli()
    assert r.returncode == 2 and "the following arguments are required: COMMAND" in _error_line(r.stderr)



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
    line = _refused([*args[1:], "--out", str(new[0])], capsys, lambda argv: cli.main(["bench", *argv]))
    assert line == f"hybridfast: error: hybridfast bench: --out {new[0]} exists; pass --overwrite to replace it " \
                   f"(see --help)"
    cli.main([*args, "--overwrite"])
    assert json.loads(cited.read_text())["rows"][0]["B"] == 1
    assert len(list(tmp_path.glob("*.json"))) == 3
