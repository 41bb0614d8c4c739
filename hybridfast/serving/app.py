"""The FastAPI app: endpoints (``create_app``), OpenAI-style errors, and a thread to serve it on
(``BackgroundServer``, for tests and benchmarks). Request handling is :mod:`.server`; the models
run on the :mod:`.worker` thread, which the app starts and stops with its lifespan."""
from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .errors import RequestError, error_body
from .model_set import ModelSet
from .protocol import ChatBody, CompletionBody, Reply
from .server import COMPLETION_DEFAULT_MAX_TOKENS, Server

__all__ = ["create_app", "BackgroundServer"]


def _validation_error(_, exc: RequestValidationError) -> JSONResponse:
    """400 naming the field at fault; a field that matches none of its accepted forms (a union)
    lists why each form failed."""
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        msg = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        return JSONResponse(error_body(RequestError(400, msg)), status_code=400)
    param = _field_path(first.get("loc", ())[1:])
    if not param:
        return JSONResponse(error_body(RequestError(400, f"the body must be a JSON object: {first['msg']}")),
                            status_code=400)
    reasons = list(dict.fromkeys(e["msg"] for e in errors if _field_path(e.get("loc", ())[1:]) == param))
    msg = f"{param}: {reasons[0]}" if len(reasons) == 1 else \
        f"{param}: matches none of its accepted forms ({'; '.join(reasons)})"
    return JSONResponse(error_body(RequestError(400, msg, param=param)), status_code=400)


def _field_path(loc) -> str:
    """``loc`` as ``a.0.b``, without pydantic's union-member tags (``str``, ``list[int]``...)."""
    return ".".join(str(x) for x in loc if not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS)))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _request_error(_, exc: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


def _http_error(_, exc: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(RequestError(exc.status_code, str(exc.detail))), status_code=exc.status_code)


def create_app(models: ModelSet, **limits) -> FastAPI:
    """The OpenAI-compatible app serving ``models``; ``limits``: :class:`Server`'s keyword
    arguments (rows, max_model_len, max_tokens, max_queue, max_schedulers, seed). The worker
    thread runs while the app is being served (its lifespan)."""
    server = Server(models, **limits)

    @asynccontextmanager
    async def lifespan(_):
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()

    app = FastAPI(title="hybridfast", lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(HTTPException, _http_error)

    @app.get("/health")
    async def health():
        alive = server.worker.alive
        return JSONResponse(dict(status="ok" if alive else "worker stopped", in_flight=server.in_flight,
                                 **server.worker.snapshot), status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def list_models():
        return dict(object="list", data=[dict(id=models.name, object="model", created=int(time.time()),
                                              owned_by="hybridfast")])

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        s = server.settings(body)
        prompts = server.completion_prompts(body.prompt, s)
        max_tokens = server.max_tokens_of(body.max_tokens, prompts, COMPLETION_DEFAULT_MAX_TOKENS)
        return await server.respond(Reply("completion", models.name), body, s, prompts, max_tokens, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        s = server.settings(body)
        if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
            raise RequestError(400, f"max_tokens={body.max_tokens} and max_completion_tokens="
                                    f"{body.max_completion_tokens} differ; give one", param="max_completion_tokens")
        prompts = [server.chat_prompt(body.messages, s)]
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = server.max_tokens_of(getattr(body, param), prompts, None, param)
        return await server.respond(Reply("chat", models.name), body, s, prompts, max_tokens, request)

    return app


class BackgroundServer:
    """uvicorn serving ``app`` on a daemon thread (tests, benchmarks): ``url``, then ``stop()``.
    ``port=0`` picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
        import socket

        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.sock]), daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"uvicorn did not start within {timeout} s")
            time.sleep(0.01)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()
