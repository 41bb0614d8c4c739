"""Runs that cannot silently give wrong numbers, part two: the CLI reports its version, its
usage errors are one line, and a benchmark never overwrites a result unasked."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hybridfast

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hybridfast.cli", *args], capture_output=True, text=True,
                          timeout=600)


def _error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridfast: error: "), text
    return lines[0]


def _refused(argv, capsys, entry) -> str:
    with pytest.raises(SystemExit) as e:
        entry(argv)
    assert e.value.code == 2
    return _error_line(capsys.readouterr().err)


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
