"""Models and tokenizers as the commands load them: ``tiny`` (the bundled random pair, built from
the seed) or anything :func:`hybridfast.models.load_model` takes (the named default, a GGUF file
or folder, a Hugging Face folder or hub id). Each model comes with its own tokenizer. A spec that
cannot be loaded is a :class:`~hybridfast.errors.UserError` naming the flag.

``--dtype auto`` (the default of every command) runs a model in its stored dtype on CPU (float32
for ``tiny`` and for GGUF conversions) and in bf16 on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

__all__ = ["DTYPES", "DTYPE_CHOICES", "DTYPE_HELP", "device", "dtype_name", "model_id", "Loaded", "load_side",
           "load_tokenizer"]

DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
DTYPE_CHOICES = ("auto", *DTYPES)
DTYPE_HELP = ("model dtype: fp32, bf16, fp16, or auto = the model's stored dtype on CPU, bf16 on CUDA "
              "(default: %(default)s)")


def device() -> str:
    """Where the commands run models: ``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_name(requested: str, spec: str) -> str:
    """The dtype ``--dtype requested`` runs ``spec`` in: ``requested`` unless it is ``auto``, which
    is ``bf16`` on CUDA and on CPU the stored dtype: ``fp32`` for ``tiny``, else ``stored``."""
    if requested not in DTYPE_CHOICES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested
    if device() == "cuda":
        return "bf16"
    return "fp32" if spec == "tiny" else "stored"


def model_id(spec: str, side: str) -> str:
    """How artifacts record the model ``spec`` loads: ``tiny-<side>`` for the tiny pair, the
    absolute path of a local model, else the name or hub id as given."""
    if spec == "tiny":
        return f"tiny-{side}"
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


@dataclass
class Loaded:
    """A loaded model, its own tokenizer, and its :func:`model_id`."""
    model: Any
    tokenizer: Any
    model_id: str


def _tiny(side: str, seed: int, dtype: str) -> Loaded:
    from .tiny import tiny_pair, tiny_tokenizer
    tok = tiny_tokenizer()
    base, think = tiny_pair(tok, seed=seed)
    model = base if side == "base" else think
    if dtype != "fp32":
        model = model.to(DTYPES[dtype])
    return Loaded(model, tok, model_id("tiny", side))


def load_side(spec: str, side: str, *, seed: int = 0, dtype: str = "auto", tokenizer: str | None = None,
              flag: str = "--model") -> Loaded:
    """The ``side`` (``base`` or ``thinking``) model of ``spec`` in ``--dtype dtype``, with its own
    tokenizer (or ``tokenizer``'s, when given)."""
    name = dtype_name(dtype, spec)
    if spec == "tiny":
        return _tiny(side, seed, name)
    from .models import load_model
    try:
        model, tok = load_model(spec, dtype=None if name == "stored" else DTYPES[name], device=device())
        if tokenizer:
            tok = _pretrained_tokenizer(tokenizer)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {spec}: {e}") from None
    return Loaded(model, tok, model_id(spec, side))


def _pretrained_tokenizer(spec: str, **kw):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(spec, **kw)


def load_tokenizer(spec: str, *, flag: str = "--model"):
    """The tokenizer :func:`load_side` gives ``spec``'s model, without loading the model."""
    if spec == "tiny":
        from .tiny import tiny_tokenizer
        return tiny_tokenizer()
    from .models import resolve_model
    try:
        kind, gguf = resolve_model(spec)
        if kind == "gguf":
            return _pretrained_tokenizer(str(gguf.parent), gguf_file=gguf.name)
        return _pretrained_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {spec}: {e}") from None
