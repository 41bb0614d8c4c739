"""Run identity: what decides a run's answers, recorded in every result row, and a short id.

A model or artifact on disk is identified by its path and a fingerprint of its files: sha256 over
every regular file under it (hidden entries skipped), in name order, of the relative name, the
size, and the content's sha256 for files up to 1 MiB (configs, tokenizers, chat templates) or the
modification time in ns for larger ones (weights). A hub id is recorded as given (its revision is
not pinned); ``tiny`` is built from code and the seed.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

__all__ = ["RunIdentity", "fingerprint", "model_identity", "artifact_identity", "text_hash", "differences"]

SMALL_FILE = 1 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _plain(obj):
    """``obj`` as it reads back from JSON (tuples become lists, other objects their str)."""
    return json.loads(json.dumps(obj, default=str))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(path) -> str:
    """16 hex digits identifying the files at ``path`` (a file or a folder); see the module doc."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        what = _sha256_file(f) if st.st_size <= SMALL_FILE else f"mtime {st.st_mtime_ns}"
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{st.st_size}\0{what}\n".encode())
    return h.hexdigest()[:16]


def text_hash(text: str) -> str:
    """12 hex digits of the sha256 of ``text`` (prompt templates)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _looks_like_path(spec: str) -> bool:
    """Absolute, ``./``/``~`` relative, several components, or ``dir/name`` under an existing dir."""
    parts = Path(spec).parts
    return (spec.startswith(("/", ".", "~")) or "\\" in spec or spec.endswith("/") or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def artifact_identity(path, flag: str) -> dict:
    """``{path, fingerprint}`` of an existing file or folder; a missing one is a :class:`UserError`."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {path}: no such file or directory")
    return dict(path=str(p.resolve()), fingerprint=fingerprint(p))


def model_identity(spec: str, flag: str) -> dict:
    """``{tiny}``, ``{name, path, fingerprint}`` of a named model (its GGUF file), ``{path,
    fingerprint}`` of a local model, or ``{hub_id}``. A spec that names no existing path is a hub
    id when it has that form (``name`` or ``org/name``); one that looks like a path is reported as a
    missing path."""
    from .models import NAMED_MODELS, resolve_model
    if spec == "tiny":
        return dict(tiny=True)
    if spec in NAMED_MODELS:
        try:
            return dict(name=spec, **artifact_identity(resolve_model(spec)[1], flag))
        except FileNotFoundError as e:
            raise UserError(f"{flag} {spec}: {e}") from None
    if Path(spec).exists() or _looks_like_path(spec):
        return artifact_identity(spec, flag)
    if not _HUB_ID.match(spec):
        raise UserError(f"{flag} {spec!r} is neither an existing path nor a hub id (org/name)")
    return dict(hub_id=spec)


@dataclass(frozen=True)
class RunIdentity:
    """What decides a run's answers (``config``) and where its problems came from (``data``).

    ``id`` hashes ``config`` only: problems from another file or a larger ``--limit`` join the same
    run, and each row's ``run["data"]`` still says which file it came from."""
    config: dict
    data: dict

    def __post_init__(self):
        object.__setattr__(self, "config", _plain(self.config))
        object.__setattr__(self, "data", _plain(self.data))

    @property
    def id(self) -> str:
        blob = json.dumps(self.config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def record(self) -> dict:
        """The ``run`` object stored in a result row: the configuration plus ``data``."""
        return {**self.config, "data": self.data}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_ABSENT = object()


def _show(v, width: int = 60) -> str:
    s = "(absent)" if v is _ABSENT else json.dumps(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two configurations."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {_show(a.get(k, _ABSENT))} -> {_show(b.get(k, _ABSENT))}"
            for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
