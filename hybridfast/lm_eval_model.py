"""The lm-evaluation-harness model ``hybridfast``.

lm-eval 0.4.x finds models only in its own registry (no entry points, no plugin path), so the
model is registered when this module is imported. Run the harness through this module, which
registers it and then hands its arguments to lm-eval's own command line::

    python -m hybridfast.lm_eval_model --model hybridfast \\
        --model_args model=tiny,method=hybrid-routed,sae=runs/sae,vectors=runs/vectors \\
        --tasks gsm8k --limit 8

or from Python: ``import hybridfast.lm_eval_model`` and then
``lm_eval.simple_evaluate(model="hybridfast", model_args=...)``, or pass a
``HybridfastLM(models=ModelSet(...))`` object as ``model``.

model_args: ``model`` (any ``--model`` form, or ``tiny``), ``method`` (plain, hybrid-paper,
hybrid-routed, power-mh, power-smc, power-scalable), ``thinking``/``sae``/``vectors``/``sae_layer``/
``steer_layer``/``override_artifact_settings`` (as ``hybridfast serve`` takes them), ``dtype``,
``seed``, ``rows`` (requests decoded at once), ``max_length`` (tokens per request, prompt +
completion; longer contexts lose their start), ``max_gen_toks`` (completion length of requests
that give none; default: 256, at most half of ``max_length``), ``temperature`` (plain and
hybrid-routed; default 0: greedy), and the method's settings (``top_k``, ``threshold``,
``alpha``, ``block_size``, ``n_mcmc``, ``n_particles``, ``ess_threshold``, ``alpha_ramp``,
``variant``, ``n_candidates``, ``n_rollouts``, ``horizon``, ``n_proposals``, ``jackknife``). The
harness's ``batch_size`` and ``device`` are not used: the models run where hybridfast loads them
(CUDA when available, else the CPU).

``generate_until`` runs every method: plain and the hybrid methods through the continuous-batching
scheduler (all of a call's requests queued at once), the power methods one request at a time. A
request's ``until`` strings end it (and free its row) as soon as they appear, and its
``max_gen_toks`` bounds it. Its ``do_sample``/``temperature`` and ``top_k`` apply to plain and
hybrid-routed (``do_sample=True`` with no temperature above 0, the request's or the model's, is
refused rather than decoded greedily); hybrid-paper (greedy) and the power methods (proposals at temperature 1/alpha)
sample as their method defines. ``loglikelihood`` and ``loglikelihood_rolling`` score with the
base model (``method=plain`` only: the other methods define no likelihood of a given text).
"""
from __future__ import annotations

import importlib
import logging
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .engine import pad_prompts
from .serving.methods import PARAMS, settings_of
from .serving.model_set import ModelSet, load_model_set
from .serving.text import TextStream
from .serving.worker import Failed, Job, Tokens, Worker

__all__ = ["HybridfastLM", "main"]

log = logging.getLogger("hybridfast.lm_eval")

# the built-in models register first: lm-eval loads them only into an empty registry
importlib.import_module("lm_eval.models")

#: generation kwargs a request may carry
_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


@register_model("hybridfast")
class HybridfastLM(TemplateLM):
    """hybridfast's methods as an lm-eval model (see the module docstring). ``models``: already
    loaded models (instead of ``model``/``thinking``/``sae``/``vectors``)."""

    def __init__(self, model: str = "tiny", method: str = "plain", *, thinking=None, sae=None, vectors=None,
                 sae_layer=None, steer_layer=None, override_artifact_settings: bool = False, dtype: str = "auto",
                 seed: int = 0, rows: int = 16, max_length: int = 2048, max_gen_toks: int | None = None,
                 temperature: float | None = None, models: ModelSet | None = None, batch_size=None, max_batch_size=None,
                 device=None, **settings):
        super().__init__()
        from .loading import device as run_device
        if device is not None and str(device).split(":")[0] != run_device():
            log.warning("device=%s is not used: hybridfast runs its models on %s here", device, run_device())
        unknown = sorted(set(settings) - set(PARAMS))
        if unknown:
            raise ValueError(f"unknown model_args {unknown}; hybridfast takes {sorted(PARAMS)} besides its own")
        max_gen_toks = min(256, max_length // 2) if max_gen_toks is None else max_gen_toks
        if not 1 <= max_gen_toks < max_length:
            raise ValueError(f"max_gen_toks must be in [1, max_length={max_length}), got {max_gen_toks}")
        self.models = models or load_model_set(model, thinking=thinking, sae=sae, vectors=vectors, sae_layer=sae_layer,
                                               steer_layer=steer_layer, override=override_artifact_settings,
                                               dtype=dtype, seed=seed)
        self.tokenizer = self.models.tokenizer
        self.fields = dict(settings, method=method, temperature=temperature)
        self.settings = self._settings(self.fields)                 # checked now, once
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        self.worker = Worker(self.models, rows=rows, max_model_len=self.max_length, max_schedulers=4, seed=seed)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    @property
    def tokenizer_name(self) -> str:
        return self.models.name.replace("/", "__")

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ generation
    def _request_settings(self, gen_kwargs: dict):
        """The settings and ``(until, max_gen_toks)`` of one request's generation kwargs."""
        unknown = sorted(set(gen_kwargs) - set(_GEN_KWARGS))
        if unknown:
            raise ValueError(f"generation kwargs {unknown} are not supported (supported: {list(_GEN_KWARGS)})")
        if gen_kwargs.get("top_p") not in (None, 1, 1.0):
            raise ValueError(f"top_p={gen_kwargs['top_p']} is not supported (nucleus sampling is not implemented)")
        fields = dict(self.fields)
        if self.settings.method in ("plain", "hybrid-routed"):
            fields.update(self._sampling_fields(gen_kwargs))
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        if not 1 <= max_gen < self.max_length:
            raise ValueError(f"max_gen_toks must be in [1, max_length={self.max_length}), got {max_gen}")
        return self._settings(fields), until, max_gen

    def _sampling_fields(self, gen_kwargs: dict) -> dict:
        """A plain or hybrid-routed request's ``temperature``/``top_k``: ``do_sample=False`` is
        greedy; ``do_sample=True`` needs a positive temperature (the request's or the model's)."""
        fields, do_sample = {}, gen_kwargs.get("do_sample")
        if do_sample is False:
            fields["temperature"] = 0.0
        elif gen_kwargs.get("temperature") is not None:
            fields["temperature"] = gen_kwargs["temperature"]
        temperature = fields.get("temperature", self.settings.temperature)
        if do_sample is True and not float(temperature) > 0:
            raise ValueError(f"do_sample=True needs a temperature > 0, got temperature={temperature} (give one in the "
                             "request's generation kwargs or in model_args, or use do_sample=False for greedy)")
        if gen_kwargs.get("top_k") is not None:
            fields["top_k"] = gen_kwargs["top_k"]
        return fields

    def _settings(self, fields: dict):
        """Greedy unless a temperature is given (the harness's convention)."""
        return settings_of(fields, available=self.models.methods, default_temperature=0.0)

    def _prompts(self, context: str, method: str, max_gen: int) -> tuple:
        """The context through each side's tokenizer, its start dropped to leave ``max_gen`` tokens."""
        sides = [self.tokenizer] + ([self.models.thinking_tokenizer] if method.startswith("hybrid-") else [])
        keep = self.max_length - max_gen
        prompts = tuple(tok(context, add_special_tokens=False)["input_ids"][-keep:] for tok in sides)
        return tuple(p or [self.prefix_token_id] for p in prompts)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        out, errors = [""] * len(requests), {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            settings, until, max_gen = self._request_settings(dict(gen_kwargs))
            ids = self.worker.new_ids(1)
            emit = self._collector(i, ids, TextStream(self.tokenizer, until), out, errors)
            self.worker.submit(Job(settings, [self._prompts(context, settings.method, max_gen)], max_gen, ids, emit))
        self.worker.drain()
        if errors:
            i, e = min(errors.items())
            raise RuntimeError(f"request {i} of {len(requests)} failed: {e.message}")
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _collector(self, i: int, ids: list, text: TextStream, out: list, errors: dict):
        """The ``emit`` of request ``i``'s job (choice ``ids``): its text into ``out[i]``, cut at
        its ``until`` strings."""
        def emit(ev):
            if isinstance(ev, Failed):
                errors[i] = ev.error
            elif isinstance(ev, Tokens):
                piece = text.feed(ev.tokens, ev.finish_reason)
                out[i] += piece.text
                if piece.finish_reason is not None and ev.finish_reason is None:
                    self.worker.cancel(ids)
        return emit

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """``(sum log p(continuation | context), whether greedy decoding gives the continuation)``
        per request, from the base model; inputs longer than ``max_length`` lose their start."""
        if self.settings.method != "plain":
            raise NotImplementedError(f"loglikelihood is defined for method=plain only (got method="
                                      f"{self.settings.method}: it defines no likelihood of a given text)")
        for i, (_, ctx, cont) in enumerate(requests):
            self._check_scorable(i, ctx, cont)
        rows = [((ctx + cont)[-(self.max_length + 1):][:-1], cont) for _, ctx, cont in requests]
        order = sorted(range(len(rows)), key=lambda j: -len(rows[j][0]))
        out = [None] * len(rows)
        for start in range(0, len(order), self.worker.rows):
            batch = order[start: start + self.worker.rows]
            logp = self._log_probs([rows[j][0] for j in batch])
            for b, j in enumerate(batch):
                inp, cont = rows[j]
                lp = logp[b, len(inp) - len(cont): len(inp)]
                target = torch.tensor(cont)
                out[j] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def _check_scorable(self, i: int, ctx: list, cont: list) -> None:
        """Request ``i`` needs a context token before its continuation, and its continuation must
        fit in ``max_length`` (only the context loses its start)."""
        if not ctx:
            raise ValueError(f"loglikelihood request {i} has no context tokens (a whitespace-only context?): its "
                             "continuation's first token has nothing to be scored after")
        if len(cont) > self.max_length:
            raise ValueError(f"loglikelihood request {i}: its continuation has {len(cont)} tokens, more than "
                             f"max_length={self.max_length}")

    @torch.inference_mode()
    def _log_probs(self, inputs: list) -> torch.Tensor:
        """log p (temperature 1) of the next token at every position of every input, ``[B, S, V]``
        (float32, CPU), from the engine's prefill pass."""
        engine = self.models.engine
        m = engine.m
        ids, lengths = pad_prompts(inputs, self.prefix_token_id, m.device)
        S = ids.shape[1]
        cache = engine.new_cache(len(inputs), S)
        plan = m.prefill_plan(lengths, S, cache, cache.scratch + S)
        h = m.forward(ids, plan, cache)
        return m.logits(h).float().log_softmax(-1).cpu()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """The log-likelihood of each whole text, in disjoint windows of ``max_length`` tokens."""
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out


def main(argv=None) -> None:
    """lm-eval's command line, with the ``hybridfast`` model registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
