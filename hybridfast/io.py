"""Artifacts on disk: safetensors + JSON, written atomically, validated on load.

* SAE folder: ``sae.safetensors`` (W_enc [d, K], b_enc, b_dec, W_dec, optional x_mean) +
  ``config.json`` (layer, model id, K, k, normalisation) + optional ``taxonomy.json``.
* Vectors folder: ``vectors.safetensors`` (V [K, d], optional bias) + ``config.json`` (steer
  layer, model id, K, and the routed-mode coefficients / threshold when they were given).
* Interop: SAELens folders, EleutherAI sparsify folders, the paper's ``.pt`` vector dicts
  (loaded with ``weights_only=True``).

Loading puts the recorded settings in the artifact's ``meta`` (``None`` where an older or foreign
artifact does not record one) and checks that every tensor is finite: a NaN or inf is a
``ValueError`` naming the tensor and the artifact.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .artifacts import SAEParams, SteeringVectors

__all__ = ["atomic_write_text", "parse_jsonl", "read_jsonl", "write_jsonl", "save_tensors", "load_tensors",
           "check_finite", "save_sae", "load_sae", "save_vectors", "load_vectors"]


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_jsonl(text: str, where) -> list[dict]:
    """Rows of JSON-lines text (blank lines skipped); a bad line is reported as ``where:N``."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}:{n}: not valid JSON ({e})") from None
    return rows


def read_jsonl(path) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped); a bad line is reported with its number."""
    with open(path) as f:
        return parse_jsonl(f.read(), path)


def write_jsonl(path, rows) -> None:
    """Write rows as JSON lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def save_tensors(path, tensors: dict) -> None:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(path) -> dict:
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None


def check_finite(tensors: dict, where) -> None:
    """A ``ValueError`` naming the first tensor of ``tensors`` holding a NaN or an inf."""
    for name, t in tensors.items():
        if t is not None and t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{where}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf) "
                                 f"of {t.numel()}")


def _read_json(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


#: the settings an SAE's ``meta`` holds after loading (written by :func:`save_sae` from its arguments)
_SAE_SETTINGS = ("layer", "model_id", "K", "k", "normalize")


def save_sae(folder, sae: SAEParams, *, layer: int, model_id: str | None = None, k: int = 3,
             taxonomy: dict | None = None) -> Path:
    folder = Path(folder)
    t = dict(W_enc=sae.W_enc, b_enc=sae.b_enc, b_dec=sae.b_dec)
    if sae.W_dec is not None:
        t["W_dec"] = sae.W_dec
    if sae.x_mean is not None:
        t["x_mean"] = sae.x_mean
    save_tensors(folder / "sae.safetensors", t)
    extra = {kk: v for kk, v in sae.meta.items()
             if isinstance(v, (int, float, str, bool)) and kk not in _SAE_SETTINGS}
    cfg = {**extra, **dict(format="hybridfast-sae", version=1, layer=int(layer), model_id=model_id, k=int(k),
                           d_in=sae.d_in, n_latents=sae.n_latents, normalize=bool(sae.normalize),
                           has_mean=sae.x_mean is not None)}
    atomic_write_text(folder / "config.json", json.dumps(cfg, indent=1))
    if taxonomy is not None:
        atomic_write_text(folder / "taxonomy.json", json.dumps(taxonomy, indent=1))
    return folder


def _expect(name, t, shape, where):
    if t is None:
        raise ValueError(f"{where}: missing tensor {name!r}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, config says {tuple(shape)}")


def _sae_meta(layer, model_id, k, K: int, normalize: bool) -> dict:
    """The settings an SAE artifact records (``None``: not recorded)."""
    return dict(layer=None if layer is None else int(layer), model_id=model_id,
                k=None if k is None else int(k), K=int(K), normalize=bool(normalize))


def load_sae(folder) -> SAEParams:
    """Load our SAE folder, a SAELens folder or an EleutherAI sparsify folder; ``meta`` holds the
    recorded ``layer``, ``model_id``, ``K``, ``k`` and ``normalize`` (``None`` if not recorded)."""
    sae = _load_sae_tensors(Path(folder))
    check_finite(dict(W_enc=sae.W_enc, b_enc=sae.b_enc, b_dec=sae.b_dec, x_mean=sae.x_mean, W_dec=sae.W_dec),
                 f"SAE {folder}")
    return sae


def _load_sae_tensors(folder: Path) -> SAEParams:
    if (folder / "sae.safetensors").exists() and (folder / "config.json").exists():
        cfg = _read_json(folder / "config.json")
        t = load_tensors(folder / "sae.safetensors")
        d, K = int(cfg["d_in"]), int(cfg["n_latents"])
        where = str(folder)
        _expect("W_enc", t.get("W_enc"), (d, K), where)
        _expect("b_enc", t.get("b_enc"), (K,), where)
        _expect("b_dec", t.get("b_dec"), (d,), where)
        if cfg.get("has_mean"):
            _expect("x_mean", t.get("x_mean"), (d,), where)
        normalize = bool(cfg.get("normalize", False))
        return SAEParams(t["W_enc"], t["b_enc"], t["b_dec"], t.get("x_mean"), normalize, t.get("W_dec"),
                         _sae_meta(cfg.get("layer"), cfg.get("model_id"), cfg.get("k"), K, normalize))
    if (folder / "sae_weights.safetensors").exists():          # SAELens
        cfg = _read_json(folder / "cfg.json") if (folder / "cfg.json").exists() else {}
        t = load_tensors(folder / "sae_weights.safetensors")
        W = t.get("W_enc")
        if W is None or W.ndim != 2:
            raise ValueError(f"{folder}: SAELens weights need W_enc [d_in, d_sae]")
        d, K = W.shape
        _expect("b_enc", t.get("b_enc"), (K,), str(folder))
        _expect("b_dec", t.get("b_dec"), (d,), str(folder))
        norm = cfg.get("normalize_activations", "none")
        if norm not in (None, "none"):
            raise ValueError(f"{folder}: SAELens normalize_activations={norm!r} is not supported "
                             f"(only 'none')")
        return SAEParams(W, t["b_enc"], t["b_dec"], None, False, t.get("W_dec"),
                         _sae_meta(cfg.get("hook_layer"), cfg.get("model_name"), cfg.get("k"), K, False))
    if (folder / "sae.safetensors").exists():                  # EleutherAI sparsify
        t = load_tensors(folder / "sae.safetensors")
        enc = t.get("encoder.weight")
        if enc is None or enc.ndim != 2:
            raise ValueError(f"{folder}: sparsify weights need encoder.weight [K, d]")
        K, d = enc.shape
        _expect("encoder.bias", t.get("encoder.bias"), (K,), str(folder))
        _expect("b_dec", t.get("b_dec"), (d,), str(folder))
        return SAEParams(enc.T.contiguous(), t["encoder.bias"], t["b_dec"], None, False, t.get("W_dec"),
                         _sae_meta(None, None, None, K, False))
    raise FileNotFoundError(f"{folder}: no SAE found (expected sae.safetensors + config.json, "
                            f"a SAELens or a sparsify folder)")


def save_vectors(folder, vec: SteeringVectors, *, steer_layer: int, model_id: str | None = None,
                 coefficients=None, threshold: float | None = None, extra: dict | None = None) -> Path:
    """Write a vectors folder; ``coefficients`` (one, or one per category) and ``threshold`` are the
    routed-mode settings the vectors were tuned with, recorded when given."""
    folder = Path(folder)
    t = dict(V=vec.V)
    if vec.bias is not None:
        t["bias"] = vec.bias
    save_tensors(folder / "vectors.safetensors", t)
    cfg = dict(format="hybridfast-vectors", version=1, steer_layer=int(steer_layer),
               model_id=model_id, n_categories=vec.V.shape[0], d=vec.V.shape[1],
               has_bias=vec.bias is not None, names=list(vec.names), **(extra or {}))
    if coefficients is not None:
        cfg["coefficients"] = [float(c) for c in torch.as_tensor(coefficients).reshape(-1).tolist()]
    if threshold is not None:
        cfg["threshold"] = float(threshold)
    atomic_write_text(folder / "config.json", json.dumps(cfg, indent=1))
    return folder


def _vectors_meta(cfg: dict, K: int) -> dict:
    """The settings a vectors artifact records (``None``: not recorded)."""
    layer = cfg.get("steer_layer")
    return dict(steer_layer=None if layer is None else int(layer), model_id=cfg.get("model_id"), K=int(K),
                coefficients=cfg.get("coefficients"), threshold=cfg.get("threshold"))


def load_vectors(path) -> SteeringVectors:
    """Load our vectors folder, or the paper's ``.pt`` dict ``{category: tensor}``; ``meta`` holds
    the recorded ``steer_layer``, ``model_id``, ``K``, ``coefficients`` and ``threshold``."""
    vec = _load_vectors_tensors(Path(path))
    check_finite(dict(V=vec.V, bias=vec.bias), f"vectors {path}")
    return vec


def _load_vectors_tensors(path: Path) -> SteeringVectors:
    if path.suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or not obj:
            raise ValueError(f"{path}: expected a non-empty dict of tensors")
        from .artifacts import as_vectors
        vec = as_vectors({str(k): v for k, v in obj.items()})
        vec.meta = _vectors_meta({}, vec.V.shape[0])
        return vec
    cfg = _read_json(path / "config.json")
    t = load_tensors(path / "vectors.safetensors")
    K, d = int(cfg["n_categories"]), int(cfg["d"])
    _expect("V", t.get("V"), (K, d), str(path))
    if cfg.get("has_bias"):
        _expect("bias", t.get("bias"), (d,), str(path))
    return SteeringVectors(t["V"], t.get("bias"), cfg.get("names"), _vectors_meta(cfg, K))
