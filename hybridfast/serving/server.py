"""Request handling on the event loop: validation, tokenization, jobs for the :class:`Worker`,
and their responses.

An endpoint hands the worker a :class:`~hybridfast.serving.worker.Job` and awaits its events on
an ``asyncio.Queue`` (the worker's ``emit`` posts them with ``loop.call_soon_threadsafe``). A
streaming response is an SSE stream of the released text (:mod:`hybridfast.serving.text`); when
the client disconnects, the response closes and the job's unfinished choices are cancelled, which
frees their rows. A non-streaming request checks at least every quarter second while it waits
whether its client is gone, with the same effect.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import RequestError, error_body
from .methods import HYBRID, Settings, settings_of
from .model_set import ModelSet
from .protocol import Reply, method_fields, refuse_unsupported, usage
from .text import Piece, TextStream
from .worker import Failed, Job, Worker

__all__ = ["Server", "Run", "EventStream", "COMPLETION_DEFAULT_MAX_TOKENS"]

COMPLETION_DEFAULT_MAX_TOKENS = 16        # OpenAI's default for /v1/completions


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected."""


class Run:
    """The event-loop side of one submitted job."""

    def __init__(self, server: "Server", job: Job, events: asyncio.Queue, texts: list):
        self.server, self.job, self.events, self.texts = server, job, events, texts
        self.open = set(range(len(job.ids)))       # choices not finished yet
        self.closed = False
        self.checked = time.monotonic()             # when the client was last seen connected

    async def pieces(self, request: Request | None = None):
        """``(choice, Piece)`` as text is released, until every choice finished; raises the
        job's :class:`RequestError` if it fails. With ``request``, a disconnected client raises
        :class:`_ClientGone`."""
        while self.open:
            ev = await self._next(request)
            if isinstance(ev, Failed):
                raise ev.error
            piece = self.texts[ev.choice].feed(ev.tokens, ev.finish_reason)
            if piece.finish_reason is not None:
                self.open.discard(ev.choice)
                if ev.finish_reason is None:          # a stop string ended it: free its row now
                    self.server.worker.cancel([self.job.ids[ev.choice]])
            if piece.text or piece.tokens or piece.finish_reason:
                yield ev.choice, piece

    async def _next(self, request: Request | None):
        """The next event; with ``request``, checks at least every quarter second (events or not)
        whether its client is gone."""
        if request is None:
            return await self.events.get()
        while True:
            if time.monotonic() - self.checked >= 0.25:
                self.checked = time.monotonic()
                if await request.is_disconnected():
                    raise _ClientGone()
            try:
                return await asyncio.wait_for(self.events.get(), 0.25)
            except asyncio.TimeoutError:
                pass

    def close(self) -> None:
        """Cancel the unfinished choices and release the job's queue places (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.open:
            self.server.worker.cancel([self.job.ids[i] for i in self.open])
        self.server.in_flight -= len(self.job.ids)


class EventStream(StreamingResponse):
    """An SSE response that closes its :class:`Run` however the response ends (finished, client
    gone, or never started)."""

    def __init__(self, run: Run, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Server:
    """Request handling shared by the endpoints. Bounds: ``max_tokens`` per choice,
    ``max_model_len`` tokens per row (prompt + completion), ``max_queue`` choices held at once
    (running or waiting for a row; one more is answered 503), ``n`` at most ``rows``."""

    def __init__(self, models: ModelSet, *, rows: int = 16, max_model_len: int = 2048, max_tokens: int = 512,
                 max_queue: int = 256, max_schedulers: int = 4, seed: int = 0):
        if not 1 <= max_tokens < max_model_len:
            raise ValueError(f"max_tokens must be in [1, max_model_len={max_model_len}), got {max_tokens}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.models, self.rows, self.max_model_len = models, rows, max_model_len
        self.max_tokens, self.max_queue = max_tokens, max_queue
        self.worker = Worker(models, rows=rows, max_model_len=max_model_len, max_schedulers=max_schedulers, seed=seed)
        self.in_flight = 0                  # choices submitted and not closed (event-loop thread only)

    # ------------------------------------------------------------------ checks and prompts
    def settings(self, body) -> Settings:
        """The request's settings, after the checks every request gets (model, unsupported
        fields, ``n``)."""
        if body.model != self.models.name:
            raise RequestError(404, f"model {body.model!r} is not served here; this server serves "
                                    f"{self.models.name!r}", param="model", code="model_not_found")
        refuse_unsupported(body)
        if not 1 <= body.n <= self.rows:
            raise RequestError(400, f"n must be in [1, {self.rows}] (--rows), got {body.n}", param="n")
        return settings_of(method_fields(body), available=self.models.methods)

    def _ids(self, prompt, i: int) -> list:
        """Token-id prompt ``i``, its ids checked against the vocabulary."""
        vocab = self.models.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(400, f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                               param="prompt")
        return list(prompt)

    def completion_prompts(self, prompt, s: Settings) -> list:
        """One tuple of token-id prompts per prompt: (base,) or (base, thinking) for hybrid methods
        (the thinking model reads the same text, through its own tokenizer)."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise RequestError(400, "prompt is empty", param="prompt")
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                sides = [self.models.tokenizer] + ([self.models.thinking_tokenizer] if s.method in HYBRID else [])
                ids = tuple(tok(p, add_special_tokens=False)["input_ids"] for tok in sides)
            else:
                base = self._ids(p, i)
                ids = (base, self._thinking_ids(base, i)) if s.method in HYBRID else (base,)
            if not ids[0]:
                raise RequestError(400, f"prompt {i} is empty (no tokens)", param="prompt")
            out.append(ids)
        return out

    def _thinking_ids(self, ids: list, i: int) -> list:
        """Token-id prompt ``i`` (base ids) as the thinking model's ids: ordinary tokens keep
        their ids, added tokens (special, chat markers) take the thinking tokenizer's id of the
        same token; one it lacks is refused (as text it would be split into other tokens)."""
        added = self.models.thinking_ids_of_added
        missing = sorted({t for t in ids if t in added and added[t] is None})
        if missing:
            names = self.models.tokenizer.convert_ids_to_tokens(missing[:5])
            raise RequestError(400, f"prompt {i} has token ids the thinking model's tokenizer has no token for: "
                                    f"{dict(zip(missing[:5], names))}; send the prompt as text", param="prompt")
        return [added.get(t, t) for t in ids]

    def chat_prompt(self, messages, s: Settings) -> tuple:
        """The messages in each side's own chat template, with the generation prompt."""
        if not messages:
            raise RequestError(400, "messages is empty", param="messages")
        for i, m in enumerate(messages):
            if m.name is not None:
                raise RequestError(400, f"messages.{i}.name={m.name!r} is not supported: chat templates do not "
                                        f"show participant names to the model; omit it or put it in the content",
                                   param=f"messages.{i}.name", code="unsupported")
        msgs = [dict(role="system" if m.role == "developer" else m.role, content=m.text()) for m in messages]
        sides = [("base", self.models.tokenizer)]
        if s.method in HYBRID:
            sides.append(("thinking", self.models.thinking_tokenizer))
        out = []
        for side, tok in sides:
            if not getattr(tok, "chat_template", None):
                raise RequestError(400, f"the {side} model's tokenizer has no chat template; use /v1/completions",
                                   param="messages", code="no_chat_template")
            try:
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 - a template's own refusal (e.g. role order)
                raise RequestError(400, f"the {side} model's chat template refused the messages: {e}",
                                   param="messages") from None
            out.append(tok(text, add_special_tokens=False)["input_ids"])
        return tuple(out)

    def max_tokens_of(self, requested: int | None, prompts: list, default: int | None,
                      param: str = "max_tokens") -> int:
        """The max_tokens of every choice, checked against the bounds (``param``: the field that
        gave ``requested``, named in errors)."""
        longest = max(len(p) for sides in prompts for p in sides)
        if longest >= self.max_model_len:
            raise RequestError(400, f"the prompt has {longest} tokens; this server holds {self.max_model_len} "
                                    f"tokens per request, prompt + completion (--max-model-len)", param="prompt",
                               code="context_length_exceeded")
        n = requested if requested is not None else default
        n = min(self.max_tokens, self.max_model_len - longest) if n is None else n
        what = param if requested is not None else "the default max_tokens"
        if n < 1:
            raise RequestError(400, f"{what} must be >= 1, got {n}", param=param)
        if n > self.max_tokens:
            raise RequestError(400, f"{what} {n} exceeds this server's bound of {self.max_tokens} (--max-tokens)",
                               param=param)
        if longest + n > self.max_model_len:
            raise RequestError(400, f"prompt of {longest} tokens + {what} {n} exceeds the {self.max_model_len} "
                                    f"tokens a request may hold (--max-model-len)", param=param,
                               code="context_length_exceeded")
        return n

    # ------------------------------------------------------------------ jobs
    async def start(self, s: Settings, choices: list, max_tokens: int, stop: list) -> Run:
        """Submit one choice per entry of ``choices`` and wait until the worker admits them."""
        if self.in_flight + len(choices) > self.max_queue:
            raise RequestError(503, f"server busy: {self.in_flight} choices in flight, at most {self.max_queue} "
                                    f"(--max-queue); retry later", code="server_busy")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:          # the loop is closed: nobody waits for this job any more
                pass
        job = Job(s, choices, max_tokens, self.worker.new_ids(len(choices)), emit)
        run = Run(self, job, events, [TextStream(self.models.tokenizer, stop) for _ in choices])
        self.in_flight += len(choices)
        try:
            self.worker.submit(job)
            first = await events.get()
            if isinstance(first, Failed):
                raise first.error
        except BaseException:
            run.close()
            raise
        return run

    async def respond(self, reply: Reply, body, s: Settings, prompts: list, max_tokens: int, request: Request):
        """Run ``body.n`` choices per prompt; a JSON response, or an SSE stream with ``stream``."""
        choices = [p for p in prompts for _ in range(body.n)]
        run = await self.start(s, choices, max_tokens, body.stops())
        prompt_tokens = sum(len(p[0]) for p in prompts)
        if body.stream:
            return EventStream(run, self._stream(run, reply, body, prompt_tokens))
        try:
            return JSONResponse(await self._collect(run, reply, body, prompt_tokens, request))
        except _ClientGone:
            return Response(status_code=499)
        finally:
            run.close()

    async def _collect(self, run: Run, reply: Reply, body, prompt_tokens: int, request: Request) -> dict:
        k = len(run.texts)
        got = [Piece("", []) for _ in range(k)]
        async for i, piece in run.pieces(request):
            got[i] = Piece(got[i].text + piece.text, got[i].tokens + piece.tokens, piece.finish_reason)
        tokens = lambda i: got[i].tokens if body.return_token_ids else None  # noqa: E731
        choices = [reply.choice(i, got[i].text, got[i].finish_reason, tokens(i), delta=False, role=True)
                   for i in range(k)]
        return reply.full(choices, usage(prompt_tokens, sum(len(p.tokens) for p in got)))

    async def _stream(self, run: Run, reply: Reply, body, prompt_tokens: int):
        count = 0
        try:
            if reply.chat:
                yield _sse(reply.chunk([reply.choice(i, "", None, None, delta=True, role=True)
                                        for i in range(len(run.texts))]))
            async for i, piece in run.pieces():
                count += len(piece.tokens)
                ids = piece.tokens if body.return_token_ids else None
                yield _sse(reply.chunk([reply.choice(i, piece.text, piece.finish_reason, ids, delta=True)]))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse(reply.chunk([], usage(prompt_tokens, count)))
            yield "data: [DONE]\n\n"
        except RequestError as e:
            yield _sse(error_body(e))
