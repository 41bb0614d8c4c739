"""The settings a steered run takes from its ``--sae`` and ``--vectors`` artifacts.

* ``--sae-layer`` / ``--steer-layer`` default to the layers the artifacts record. A flag that
  differs from its artifact's layer is refused (exit 2) naming both values, unless
  ``--override-artifact-settings`` is given; an artifact that records no layer (written by an
  older hybridfast, or a foreign format) needs the flag.
* The SAE and the vectors must have the same K (one vector per SAE category).
* An artifact that records the model it was made with must match the run's model on that side
  (the SAE: the thinking model, the vectors: the base model), unless
  ``--override-artifact-settings``.
* Every tensor of both artifacts is finite (checked when loading; the error names the tensor).

Everything here runs before any model loads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .artifacts import SAEParams, SteeringVectors
from .errors import UserError

__all__ = ["OVERRIDE_FLAG", "SteeringArtifacts", "load_artifact", "layer_setting", "check_model",
           "load_steering"]

OVERRIDE_FLAG = "--override-artifact-settings"


@dataclass(frozen=True)
class SteeringArtifacts:
    """The loaded, checked SAE and vectors, and the layers the run uses."""
    sae: SAEParams
    vectors: SteeringVectors
    sae_layer: int
    steer_layer: int


def load_artifact(loader, path, flag: str):
    """``loader(path)``, its ``OSError``/``ValueError`` a :class:`UserError` naming ``flag``."""
    try:
        return loader(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: {e}") from None


def layer_setting(flag: str, given: int | None, recorded: int | None, artifact_flag: str, path,
                  override: bool) -> int:
    """The layer a run uses: ``given`` (the flag) or ``recorded`` (the artifact's); see the module
    doc for when that is refused."""
    if given is None and recorded is None:
        raise UserError(f"{artifact_flag} {path} records no layer (an older or foreign artifact): pass {flag}")
    if given is None:
        return recorded
    if recorded is not None and given != recorded and not override:
        raise UserError(f"{flag} {given} differs from the layer {recorded} that {artifact_flag} {path} was made "
                        f"for; drop {flag} to use {recorded}, or pass {OVERRIDE_FLAG} to use {given} anyway")
    return given


def _names(spec: str, side: str) -> set:
    """The ids an artifact may record for the ``side`` model loaded from ``spec``."""
    if spec == "tiny":
        return {"tiny", f"tiny-{side}"}
    p = Path(spec).expanduser()
    return {spec} | ({str(p.resolve())} if p.exists() else set())


def check_model(artifact_flag: str, path, recorded: str | None, model_flag: str, spec: str, side: str,
                override: bool) -> None:
    """Refuse an artifact made with another model than the run's ``side`` model (unless
    ``override``); an artifact that records no model is not checked."""
    if recorded is None or override:
        return
    p = Path(recorded).expanduser()
    if {recorded, str(p.resolve()) if p.exists() else recorded} & _names(spec, side):
        return
    raise UserError(f"{artifact_flag} {path} was made with the model {recorded!r}, but the {side} model is "
                    f"{model_flag} {spec}; pass the model it was made with, or {OVERRIDE_FLAG} to use it anyway")


def load_steering(sae_dir, vectors_dir, *, sae_layer: int | None, steer_layer: int | None, base: str,
                  thinking: str, override: bool, base_flag: str = "--model",
                  thinking_flag: str = "--thinking") -> SteeringArtifacts:
    """Load and check the ``--sae`` and ``--vectors`` artifacts of a run whose base and thinking
    models are ``base`` and ``thinking`` (specs); see the module doc."""
    from .io import load_sae, load_vectors
    sae = load_artifact(load_sae, sae_dir, "--sae")
    vectors = load_artifact(load_vectors, vectors_dir, "--vectors")
    if sae.n_latents != vectors.V.shape[0]:
        raise UserError(f"--sae {sae_dir} has K={sae.n_latents} categories but --vectors {vectors_dir} has "
                        f"K={vectors.V.shape[0]} vectors; they must come from the same taxonomy")
    check_model("--sae", sae_dir, sae.meta.get("model_id"), thinking_flag, thinking, "thinking", override)
    check_model("--vectors", vectors_dir, vectors.meta.get("model_id"), base_flag, base, "base", override)
    return SteeringArtifacts(
        sae, vectors,
        layer_setting("--sae-layer", sae_layer, sae.meta.get("layer"), "--sae", sae_dir, override),
        layer_setting("--steer-layer", steer_layer, vectors.meta.get("steer_layer"), "--vectors", vectors_dir,
                      override))
