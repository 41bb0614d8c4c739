"""Request bodies and response objects of the OpenAI-compatible endpoints.

Bodies are strict: an unknown field is refused (400, naming it), and so is a known OpenAI field
whose feature this server does not implement when it asks for something other than its default
(:func:`refuse_unsupported`). The hybridfast fields (``method``, its settings, ``return_token_ids``)
sit at the top level of the body, where the OpenAI client puts ``extra_body``.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict

from .errors import RequestError
from .methods import PARAMS

__all__ = ["CompletionBody", "ChatBody", "Message", "TextPart", "StreamOptions", "refuse_unsupported", "method_fields",
           "Reply", "usage"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Body(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # hybridfast fields
    method: str | None = None
    return_token_ids: bool = False        #: each choice also carries its generated token ids
    top_k: int | None = None
    threshold: float | None = None
    alpha: float | None = None
    block_size: int | None = None
    n_mcmc: int | None = None
    n_particles: int | None = None
    ess_threshold: float | None = None
    alpha_ramp: int | None = None
    variant: str | None = None
    n_candidates: int | None = None
    n_rollouts: int | None = None
    horizon: int | None = None
    n_proposals: int | None = None
    jackknife: bool | None = None

    def stops(self) -> list:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise RequestError(400, f"stop takes up to 4 non-empty strings, got {stop!r}", param="stop")
        return stop


class CompletionBody(_Body):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: object = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None


#: field -> the values that ask for nothing this server lacks
_DEFAULTS = dict(top_p=(None, 1.0), presence_penalty=(None, 0.0), frequency_penalty=(None, 0.0), logit_bias=(None, {}),
                 logprobs=(None, False), top_logprobs=(None, 0), echo=(False,), suffix=(None, ""),
                 tools=(None, []), tool_choice=(None, "none"), response_format=(None, {"type": "text"}),
                 parallel_tool_calls=(None,))
_WHY = dict(top_p="nucleus sampling is not implemented (use top_k)", logprobs="token log-probabilities are not returned",
            top_logprobs="token log-probabilities are not returned", echo="the prompt is not echoed",
            suffix="insertion is not implemented", tools="tool calls are not implemented",
            tool_choice="tool calls are not implemented", response_format="structured output is not implemented",
            parallel_tool_calls="tool calls are not implemented", logit_bias="logit_bias is not implemented",
            presence_penalty="penalties are not implemented", frequency_penalty="penalties are not implemented")


def refuse_unsupported(body: _Body) -> None:
    """400 naming the first field that asks for a feature this server does not implement."""
    for name, ok in _DEFAULTS.items():
        value = getattr(body, name, None)
        if name in body.model_fields_set and not any(value == v and type(value) is type(v) for v in ok):
            raise RequestError(400, f"{name}={value!r} is not supported: {_WHY[name]}", param=name,
                               code="unsupported")
    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of != body.n:
        raise RequestError(400, f"best_of={best_of} is not supported (only best_of = n, the default)",
                           param="best_of", code="unsupported")


def method_fields(body: _Body) -> dict:
    """The fields :func:`~hybridfast.serving.methods.settings_of` reads."""
    return dict(method=body.method, temperature=body.temperature, seed=body.seed,
                **{k: getattr(body, k) for k in PARAMS})


class Reply:
    """The response objects of one request (one id and creation time for all its chunks)."""

    def __init__(self, kind: str, model: str):
        self.chat = kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.model, self.created = model, int(time.time())

    def _object(self, suffix: str = "") -> dict:
        obj = ("chat.completion" if self.chat else "text_completion") + suffix
        return dict(id=self.id, object=obj, created=self.created, model=self.model)

    def choice(self, index: int, text: str, finish_reason, token_ids: list | None, *, delta: bool,
               role: bool = False) -> dict:
        if self.chat:
            body = dict(content=text) if not role else dict(role="assistant", content=text)
            c = dict(index=index, **{"delta" if delta else "message": body}, logprobs=None,
                     finish_reason=finish_reason)
        else:
            c = dict(index=index, text=text, logprobs=None, finish_reason=finish_reason)
        if token_ids is not None:
            c["token_ids"] = token_ids
        return c

    def full(self, choices: list, usage: dict) -> dict:
        return dict(self._object(), choices=choices, usage=usage)

    def chunk(self, choices: list, usage: dict | None = None) -> dict:
        out = dict(self._object(".chunk" if self.chat else ""), choices=choices)
        if usage is not None:
            out["usage"] = usage
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens)
