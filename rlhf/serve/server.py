"""``rlhf serve``: an OpenAI-compatible HTTP server for any policy folder or named model.

Endpoints (the subset of the OpenAI API that evaluation and labeling tools call):

* ``GET /v1/models`` — the one served model;
* ``POST /v1/completions`` — raw-text completions; ``logprobs: k`` returns each token's
  log-probability and the k most likely alternatives (at most ``--max-logprobs``), ``echo`` with
  ``max_tokens: 0`` scores a given text;
* ``POST /v1/chat/completions`` — the model's chat template applied to ``messages``;
  ``logprobs: true`` with ``top_logprobs: k`` as in the chat API.

Errors come back in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with 400
for a bad request, 401 for a missing or wrong key, 404 for an unknown model.

Security: the server binds to 127.0.0.1 unless told otherwise, because anyone who can reach it can
make it compute. With ``--api-key`` every request must carry ``Authorization: Bearer <key>``.
"""

# No `from __future__ import annotations`: FastAPI and pydantic read the annotations at runtime.

import json
import logging
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import click
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from rlhf.config import config_command, opt
from rlhf.engine.config import EngineConfig
from rlhf.engine.runtime import start
from rlhf.errors import ConfigError
from rlhf.serve.engine import Completion, ServedModel, TokenInfo, check_serving_engine, finite

log = logging.getLogger("rlhf.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other clients send fields we do not implement (user, ...)
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: Literal[False] = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: Literal[False] = False


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _legacy_logprobs(tokens: list[TokenInfo], start_offset: int) -> dict:
    """The completions API's logprobs object: parallel lists of tokens, their log-probs, top dicts, offsets."""
    offsets, at = [], start_offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [finite(t.logprob) for t in tokens],
            "top_logprobs": [None if t.logprob is None else {k: finite(v) for k, v in t.top} for t in tokens],
            "text_offset": offsets}


def _chat_logprobs(tokens: list[TokenInfo]) -> dict:
    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": finite(lp), "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(k, v) for k, v in t.top]} for t in tokens]}


def create_app(served: ServedModel, name: str, api_key: str = "", max_tokens_limit: int = 1024,
               max_logprobs: int = 20) -> FastAPI:
    app = FastAPI(title="rlhf serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": None}},
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse({"error": {"message": f"{param or 'body'}: {first.get('msg')}", "type": "invalid_request_error",
                                       "param": param, "code": None}}, status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=exc.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "missing or wrong API key (Authorization: Bearer <key>)",
                                           "type": "authentication_error", "param": None, "code": None}}, status_code=401)
        return await call_next(request)

    def check(model: str, max_tokens: int, logprobs: int | None, prompt_tokens: int) -> None:
        if model != name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {name!r}", param="model")
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}", param="max_tokens")
        if logprobs is not None and logprobs > max_logprobs:
            raise ApiError(400, f"logprobs {logprobs} exceeds this server's limit of {max_logprobs}", param="logprobs")
        if prompt_tokens + max_tokens > served.context_length:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {served.context_length} tokens", param="prompt")

    def usage(prompt_tokens: int, completions: list[Completion]) -> dict:
        completion_tokens = sum(len(c.tokens) for c in completions)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "rlhf"}]}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": name}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        choices, prompt_tokens, completion_list = [], 0, []
        top_k = req.logprobs or 0
        for prompt in prompts:
            ids = served.encode(prompt)
            check(req.model, req.max_tokens, req.logprobs, len(ids))
            if not ids and (req.echo or req.max_tokens == 0):
                raise ApiError(400, "prompt is empty", param="prompt")
            prompt_tokens += len(ids)
            with served.lock:
                echoed = served.prompt_logprobs(ids, top_k) if req.echo else []
                outs = served.complete(ids, req.max_tokens, req.temperature, req.top_p, req.n, req.seed,
                                       _stops(req.stop), top_k)
            for c in outs:
                text = (prompt if req.echo else "") + c.text
                logprobs = None
                if req.logprobs is not None:
                    logprobs = _legacy_logprobs(echoed + c.tokens, 0)
                choices.append({"index": len(choices), "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
                completion_list.append(c)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": choices, "usage": usage(prompt_tokens, completion_list)}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict:
        max_tokens = req.max_completion_tokens or req.max_tokens or 256
        if req.logprobs is False and req.top_logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        ids = served.encode(served.chat_text([m.model_dump() for m in req.messages]))
        check(req.model, max_tokens, req.top_logprobs, len(ids))
        with served.lock:
            outs = served.complete(ids, max_tokens, req.temperature, req.top_p, req.n, req.seed, _stops(req.stop),
                                   req.top_logprobs or 0)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c.tokens) if req.logprobs else None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(outs)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": choices, "usage": usage(len(ids), outs)}

    return app


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """Serve a model over an OpenAI-compatible HTTP API."""

    model: str = opt("bundled", help="A policy folder (any local Hugging Face causal LM) or a named model ('bundled').")
    host: str = opt("127.0.0.1", help="Address to bind. The default answers this machine only; 0.0.0.0 exposes the "
                                      "model to the network (then set --api-key).")
    port: int = opt(8000, help="Port to listen on (0 = any free port; the chosen address is printed).")
    served_name: str = opt("", help="The model name clients send and /v1/models lists (default: --model as given).")
    api_key: str = opt("", help="Require 'Authorization: Bearer <key>' on every request (empty = no key).")
    max_tokens_limit: int = opt(1024, help="Largest max_tokens a request may ask for.")
    max_logprobs: int = opt(20, help="Most alternatives a request may ask for per token (logprobs / top_logprobs).")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the model runs: device, dtype, threads, CPU GEMM routing "
                                                          "(the rollout options do not apply: the server samples itself).")

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.max_tokens_limit < 1 or self.max_logprobs < 0:
            raise ConfigError("--max-tokens-limit must be at least 1 and --max-logprobs not negative")
        check_serving_engine(self.engine, "rlhf serve")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)  # connections queue from now on, before uvicorn starts accepting
    return sock


@config_command(ServeConfig, name="serve")
def serve_command(cfg: ServeConfig) -> None:
    """OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models for one model.

    Prints one JSON line with the base URL once the server listens; runs until interrupted.
    """
    import uvicorn

    rt = start(cfg.engine)
    if cfg.host not in LOOPBACK and not cfg.api_key:
        click.echo(f"warning: serving on {cfg.host} without --api-key: anyone who can reach this port can use the model",
                   err=True)
    served = ServedModel(cfg.model, rt.device, rt.dtype)
    name = cfg.served_name or cfg.model
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    app = create_app(served, name, cfg.api_key, cfg.max_tokens_limit, cfg.max_logprobs)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    click.echo(json.dumps({"url": url, "model": name}))
    sys.stdout.flush()
    server.run(sockets=[sock])

