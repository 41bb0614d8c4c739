"""What a server (or the lm-evaluation-harness model) runs: the base model and its tokenizer, and
for the hybrid methods the thinking model, its tokenizer and the steering artifacts; and how a
request's :class:`~hybridfast.serving.methods.Settings` become a scheduler or a power sampler."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from ..artifact_settings import SteeringArtifacts
from .methods import HYBRID, METHODS, Settings

__all__ = ["ModelSet", "load_model_set"]


@dataclass
class ModelSet:
    """Loaded models. ``routing``: the routed-mode ``coefficients`` / ``threshold`` to use when a
    request gives none (the ones the vectors artifact records)."""
    name: str
    base: Any
    tokenizer: Any
    thinking: Any = None
    thinking_tokenizer: Any = None
    steering: SteeringArtifacts | None = None
    routing: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.thinking is None) != (self.steering is None):
            raise ValueError("the hybrid methods need both a thinking model and steering artifacts (SAE + vectors); "
                             f"got thinking={'set' if self.thinking is not None else None}, "
                             f"steering={'set' if self.steering is not None else None}")

    @property
    def methods(self) -> tuple:
        """The methods these models can run."""
        return METHODS if self.steering is not None else tuple(m for m in METHODS if m not in HYBRID)

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: ``[0, vocab_size)`` (the base model's output width)."""
        return self.base.lm_head.out_features

    @cached_property
    def thinking_ids_of_added(self) -> dict:
        """Base token id -> the thinking tokenizer's id of the same token (``None``: it has none),
        for the base tokenizer's added tokens (special and chat-template ones) whose id differs
        there. Ordinary tokens share their ids (``HybridModel`` checks it); added ones may not (a
        distilled thinking model renames its special tokens), so a token-id prompt is translated
        through this map for the thinking model. Empty without a thinking tokenizer."""
        tb, tt = self.tokenizer, self.thinking_tokenizer
        if tt is None or tt is tb:
            return {}
        vt = tt.get_vocab()
        out = {}
        for token, i in tb.get_added_vocab().items():
            if vt.get(token) != i:
                out[int(i)] = vt.get(token)
        return out

    @cached_property
    def eos_ids(self) -> list:
        """The ids that end a generation: the base tokenizer's EOS (the model config's when the
        tokenizer has none), as the schedulers and power samplers use them."""
        from ..engine import eos_ids
        return eos_ids(self.base, self.tokenizer.eos_token_id)

    @cached_property
    def engine(self):
        from ..engine import Engine
        return Engine(self.base)

    def _hybrid(self, mode: str, threshold: float | None):
        from ..hybrid import HybridModel
        st = self.steering
        routed = dict(coefficients=self.routing.get("coefficients"),
                      threshold=self.routing.get("threshold") if threshold is None else threshold)
        return HybridModel(self.base, self.thinking, st.sae, st.vectors, sae_layer=st.sae_layer,
                           steer_layer=st.steer_layer, mode=mode, **(routed if mode == "routed" else {}),
                           base_tokenizer=self.tokenizer, thinking_tokenizer=self.thinking_tokenizer)

    def scheduler(self, s: Settings, rows: int, capacity: int, generator: torch.Generator):
        """A continuous-batching scheduler of ``s``'s method over ``rows`` rows of ``capacity``
        tokens per cache (requests carry (base prompt,) or (base prompt, thinking prompt))."""
        eos = self.tokenizer.eos_token_id
        if s.method == "plain":
            return self.engine.scheduler(rows, capacity, temperature=s.temperature, top_k=s.top_k,
                                         generator=generator, eos_token_id=eos, compact=False)
        from ..hybrid import PaperMode, RoutedMode
        hm = self._hybrid(s.method.split("-")[1], s.threshold)
        mode = PaperMode(hm) if s.method == "hybrid-paper" else RoutedMode(hm, s.temperature, s.top_k, generator)
        return hm.scheduler(mode, rows, capacity, capacity, eos, compact=False)

    def power_sampler(self, s: Settings, max_tokens: int):
        """The ``PowerSampler`` of a power request (its constructor checks the settings)."""
        from ..power import PowerSampler
        return PowerSampler(self.base, **s.power_kwargs(), max_new_tokens=max_tokens,
                            eos_token_id=self.tokenizer.eos_token_id)


def load_model_set(model: str, *, thinking: str | None = None, sae=None, vectors=None, sae_layer: int | None = None,
                   steer_layer: int | None = None, override: bool = False, dtype: str = "auto", seed: int = 0,
                   name: str | None = None) -> ModelSet:
    """Load ``model`` (any ``--model`` form, or ``tiny``) and, with ``sae`` and ``vectors``
    folders, the thinking model (default for ``tiny``: the tiny thinking model) and the checked
    steering artifacts. Mistakes are :class:`~hybridfast.errors.UserError` s naming the flag."""
    from ..artifact_settings import load_steering
    from ..errors import UserError
    from ..loading import load_side
    if (sae is None) != (vectors is None):
        raise UserError("--sae and --vectors go together (the hybrid methods need both)")
    if thinking is None and sae is not None:
        if model != "tiny":
            raise UserError("--sae/--vectors need --thinking (the model the SAE reads)")
        thinking = "tiny"
    if thinking is not None and sae is None:
        raise UserError("--thinking needs --sae and --vectors (the hybrid methods use all three)")
    steering = None
    if sae is not None:
        steering = load_steering(sae, vectors, sae_layer=sae_layer, steer_layer=steer_layer, base=model,
                                 thinking=thinking, override=override)
    base = load_side(model, "base", seed=seed, dtype=dtype, flag="--model")
    think = load_side(thinking, "thinking", seed=seed, dtype=dtype, flag="--thinking") if thinking else None
    routing = {k: steering.vectors.meta[k] for k in ("coefficients", "threshold")
               if steering and steering.vectors.meta.get(k) is not None}
    return ModelSet(name or model, base.model, base.tokenizer, think and think.model, think and think.tokenizer,
                    steering, routing)
