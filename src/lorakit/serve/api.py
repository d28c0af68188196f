"""`lorakit serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one `Engine`.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with
`stream: true` as server-sent events ending `data: [DONE]`). Every request goes to the engine's batching
worker, so concurrent requests share forward passes. Errors are OpenAI-shaped: `{"error": {"message",
"type", "param", "code"}}`. A client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import ConfigError
from lorakit.generate.params import GenerationParams
from lorakit.generate.params import Request as GenRequest
from lorakit.generate.runner import Engine
from lorakit.generate.session import PromptTooLongError, UnknownModelError
from lorakit.serve.config import ServeConfig
from lorakit.serve.errors import APIError, ApiKeyMiddleware, error_body
from lorakit.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

log = logging.getLogger("lorakit")


def create_app(engine: Engine, api_key: str | None = None, max_tokens_limit: int = 2048,
               default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI application; `engine` is shared by all requests (its worker batches them)."""
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None)
    stats: Counter[str] = Counter()
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid body")
        return JSONResponse(error_body(message, param=param, code="invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        sizes = engine.batch_sizes
        return {"status": "ok", "models": engine.model_names, "batches": engine.batches_run,
                "max_batch_size": max(sizes, default=0), "finished": dict(stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "lorakit"} for name in engine.model_names]}

    def params_of(body: SamplingFields, max_tokens: int | None) -> GenerationParams:
        max_tokens = max_tokens or default_max_tokens
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}",
                           param="max_tokens")
        try:
            return GenerationParams.from_fields(body, max_new_tokens=max_tokens, stop=body.stop_list())
        except ConfigError as e:
            raise APIError(400, str(e)) from None

    def adapter_of(body: SamplingFields) -> str | None:
        try:
            return engine.resolve_model(body.model)
        except UnknownModelError as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None

    def choices_of(body: SamplingFields, params: GenerationParams) -> list[GenerationParams]:
        """Per-choice params for `n` choices: seeded requests get seed, seed + 1, ... (distinct, reproducible)."""
        if body.n > 1 and params.num_beams > 1:
            raise APIError(400, "n > 1 is not supported with beam search", param="n")
        return [replace(params, seed=None if params.seed is None else params.seed + i) for i in range(body.n)]

    def submit(ids: list[int], choices: list[GenerationParams], adapter: str | None, stream: bool):
        """Queue one engine request per choice; events ("text", i, chunk) (when streaming) and
        ("done", i, request) arrive on one asyncio queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()

        def put(item: tuple[str, int, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (server shutting down)
                loop.call_soon_threadsafe(events.put_nowait, item)

        def callbacks(indices: range) -> dict[str, Any]:
            """Events of one engine request, delivered to each choice index it answers."""
            def done(r: GenRequest) -> None:
                stats[r.finish_reason or "error"] += 1
                for i in indices:
                    put(("done", i, r))

            def text(t: str) -> None:
                for i in indices:
                    put(("text", i, t))

            return {"on_text": text if stream else None, "on_done": done}

        # Greedy choices are all the same answer (the seed plays no part): one request answers them all.
        if len(choices) > 1 and choices[0].temperature == 0:
            jobs = [(choices[0], range(len(choices)))]
        else:
            jobs = [(params, range(i, i + 1)) for i, params in enumerate(choices)]
        reqs: list[GenRequest] = []  # one entry per choice index
        try:
            for params, indices in jobs:
                reqs += [engine.submit(ids, params, adapter, **callbacks(indices))] * len(indices)
        except BaseException as e:
            for r in reqs:  # the choices already queued must not run on without a client
                r.cancel()
            if isinstance(e, PromptTooLongError):
                raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
            raise
        return reqs, events

    async def wait_done(http: Request, reqs: list[GenRequest], events: asyncio.Queue) -> list[GenRequest]:
        """The finished requests of a non-streaming submit (only "done" events come), in choice order."""
        finished: dict[int, GenRequest] = {}
        try:
            while len(finished) < len(reqs):
                try:
                    _, i, value = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:  # quiet: is the client still there?
                    if await http.is_disconnected():
                        raise APIError(499, "client closed the request") from None
                    continue
                if value.error is not None:
                    raise value.error
                finished[i] = value
        finally:
            for r in reqs:  # no-op for finished ones; stops the rest after an error or a disconnect
                r.cancel()
        return [finished[i] for i in range(len(reqs))]

    def usage(reqs: list[GenRequest]) -> dict[str, int]:
        """The prompt counts once (it is shared by the choices), completions add up."""
        prompt, completion = reqs[0].prompt_tokens, sum(r.completion_tokens for r in reqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def sse(reqs: list[GenRequest], events: asyncio.Queue, chunk, include_usage: bool) -> AsyncIterator[dict]:
        """Server-sent events: a chunk per text piece of each choice (`index`), a chunk with each choice's
        finish_reason, optionally the usage, then [DONE]."""
        try:
            finished: dict[int, GenRequest] = {}
            while len(finished) < len(reqs):
                kind, i, value = await events.get()
                if kind == "text":
                    yield {"data": json.dumps(chunk(i, value, None))}
                    continue
                if value.error is not None:
                    yield {"data": json.dumps(error_body(f"generation failed: {value.error}", "server_error"))}
                    break
                finished[i] = value
                yield {"data": json.dumps(chunk(i, None, value.finish_reason))}
            else:
                if include_usage:
                    ordered = [finished[i] for i in range(len(reqs))]
                    yield {"data": json.dumps({**chunk(0, None, None), "choices": [], "usage": usage(ordered)})}
            yield {"data": "[DONE]"}
        finally:  # also runs when the client disconnects (the generator is cancelled/closed)
            for r in reqs:
                r.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        adapter = adapter_of(body)
        params = params_of(body, body.max_completion_tokens or body.max_tokens)
        messages = [m.as_dict() for m in body.messages]
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages must contain at least one user message", param="messages")
        ids = engine.chat_ids(messages)
        reqs, events = submit(ids, choices_of(body, params), adapter, body.stream)
        cid, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", body.model or engine.default_model
        now = int(time.time())
        if body.stream:
            started: set[int] = set()

            def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if i not in started:  # each choice's first delta carries the role
                    started.add(i)
                    delta["role"] = "assistant"
                    delta.setdefault("content", "")
                return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model,
                        "choices": [{"index": i, "delta": delta, "finish_reason": finish}]}

            include = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(sse(reqs, events, chunk, include), ping=15)
        done = await wait_done(http, reqs, events)
        return {"id": cid, "object": "chat.completion", "created": now, "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r.text.strip()},
                             "finish_reason": r.finish_reason, "logprobs": None} for i, r in enumerate(done)],
                "usage": usage(done)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        adapter = adapter_of(body)
        params = params_of(body, body.max_tokens)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: exactly one prompt string per request is supported", param="prompt")
        ids = engine.encode(prompts[0], special=True)
        reqs, events = submit(ids, choices_of(body, params), adapter, body.stream)
        cid, model = f"cmpl-{uuid.uuid4().hex[:24]}", body.model or engine.default_model
        now = int(time.time())

        def choice(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

        def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": now, "model": model,
                    "choices": [choice(i, text, finish)]}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(sse(reqs, events, chunk, include), ping=15)
        done = await wait_done(http, reqs, events)
        return {"id": cid, "object": "text_completion", "created": now, "model": model,
                "choices": [choice(i, r.text, r.finish_reason) for i, r in enumerate(done)], "usage": usage(done)}

    app.state.engine, app.state.stats = engine, stats
    return app


def run_serve(cfg: ServeConfig) -> int:
    """The `lorakit serve` verb: load the engine and serve the API until interrupted; returns the exit code."""
    import uvicorn

    api_key = cfg.api_key or os.environ.get("LORAKIT_API_KEY") or None
    from lorakit.generate.backends import load_engine

    engine = load_engine(cfg, max_batch_size=cfg.max_concurrency, gather_ms=cfg.gather_ms)
    app = create_app(engine, api_key, cfg.max_tokens_limit, cfg.default_max_tokens)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", cfg.host)
    print(f"serving {', '.join(engine.model_names)} at http://{cfg.host}:{cfg.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        engine.close()
    return 0
