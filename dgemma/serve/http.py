"""OpenAI-compatible HTTP over Engine.stream: /health, /v1/models, /v1/chat/completions, /v1/completions.

A thin adapter: requests are checked (schemas.py) and turned into engine.stream options, a worker runs them
(worker.py), and the events are written back as OpenAI JSON or server-sent events. Decisions:
- Committed text is streamed as soon as a canvas commits, in word-sized deltas paced over about one canvas
  time so it reads like a token stream: each delta is due at most MAX_PIECE_DELAY_S after the one before it (a
  deadline: draft chunks arriving in between do not push it back); pacing never delays the end (the rest is
  flushed on Done).
- Thinking goes to `reasoning_content` (message or delta), separate from `content`. Tool calls are returned in
  `tool_calls` (arguments converted to JSON where they parse, else the raw text); /v1/completions keeps them
  in the text with their <|tool_call> markers. finish_reason is "stop", "length" or "tool_calls".
- With "dgemma_drafts": true a stream also carries draft chunks: empty `choices[0].delta` plus
  "dgemma_draft": {"canvas", "step", "text", "tokens", "confidence"}; standard clients ignore them. Order: a
  canvas's text deltas come after all of its draft chunks (its commit releases them), while the next canvas's
  drafts may arrive between them (each names its canvas). A draft shows only the canvas being denoised; the
  committed text so far is always the concatenation of the deltas sent.
- The final chunk (and a non-streamed response) carries "dgemma": steps per canvas, tokens per forward, tok/s.
- A client that disconnects cancels its request within one denoising step and frees its slot.
- `/` is the chat page (static/index.html): it streams from /v1/chat/completions with drafts on. Like /health
  it needs no API key (it holds no data; the page sends the key the user types with each API call).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections import deque
from contextlib import asynccontextmanager
from functools import cache
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine.stream import Done, Draft, Text
from .formats import ChatFormat, CompletionFormat, Format, package_version
from .jobs import chat_job, completion_job
from .schemas import MAX_BODY_BYTES, ApiError, ChatCompletionRequest, CompletionRequest, parse_body
from .worker import Cancelled, Job, Overloaded, SerialWorker, ShuttingDown

WORKERS = {"batched": "BatchedWorker", "serial": "SerialWorker"}  # --scheduling: shared forwards, or turns

MAX_PIECE_DELAY_S = 0.02  # pacing: at most this long between two deltas of already committed text
PUBLIC_PATHS = ("/", "/health")  # served without the API key
# the page runs its own inline script and talks to this server only
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_PIECE = re.compile(r"\s*\S{1,12}|\s+")  # word-sized deltas (long words split); concatenation is the text


def create_app(engine, *, model_name: str, api_key: str | None = None, worker=None, max_concurrency: int = 8,
               max_queue: int = 64, default_max_tokens: int | None = None, scheduling: str = "batched") -> FastAPI:
    """The app for one loaded Engine. `worker` defaults to a BatchedWorker (scheduling="serial": the SerialWorker
    reference); anything with their interface works."""
    if worker is None:
        if scheduling not in WORKERS:
            raise ValueError(f"scheduling must be one of {sorted(WORKERS)}, got {scheduling!r}")
        from .batched import BatchedWorker
        kind = BatchedWorker if scheduling == "batched" else SerialWorker
        worker = kind(engine, max_concurrency=max_concurrency, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="dgemma", version=package_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    created = int(time.time())
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "dgemma",
            "max_model_len": engine.config.max_position_embeddings, "canvas_length": engine.config.canvas_length}

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(ApiError(400, f"invalid request: {e.errors()[0].get('msg')}").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        allowed = (e.headers or {}).get("Allow")
        if e.status_code == 405 and allowed:  # the header is required with a 405 (RFC 9110 15.5.6): kept
            message += f"; this path takes {allowed}"
        body = ApiError(e.status_code, message, type=kind).body()
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        body = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(_page(), headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", **worker.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(model_id, model_name)
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_body(await _read_body(request), ChatCompletionRequest)
        _check_model(req.model, model_name)
        job = await asyncio.to_thread(chat_job, engine, req, default_max_tokens)  # tokenising: off the loop
        fmt = ChatFormat(model_name, req.include_usage(), engine.tokenizer)
        return await _respond(request, worker, job, req.stream, fmt)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_body(await _read_body(request), CompletionRequest)
        _check_model(req.model, model_name)
        job = await asyncio.to_thread(completion_job, engine, req, default_max_tokens)
        fmt = CompletionFormat(model_name, req.include_usage(), engine.tokenizer)
        return await _respond(request, worker, job, req.stream, fmt)

    return app


class BearerAuth:
    """Every path but PUBLIC_PATHS needs `Authorization: Bearer KEY` (plain ASGI: streaming is untouched). The scheme
    is case-insensitive (RFC 9110 11.1: "bearer KEY" is the same credential); the key is compared exactly."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.lstrip(b" "), self.expected):
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                 type="authentication_error", code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")
    return bytes(body)


@cache
def _page() -> str:
    return (files(__package__) / "static" / "index.html").read_text(encoding="utf-8")


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise ApiError(404, f"the model {name!r} does not exist: this server serves {served!r} (GET /v1/models)",
                       param="model", code="model_not_found", type="not_found_error")


async def _respond(request: Request, worker, job: Job, stream: bool, fmt: Format):
    try:
        ticket = worker.submit(job)
    except Overloaded as e:
        raise ApiError(429, str(e), type="rate_limit_error", code="server_busy") from None
    except ShuttingDown as e:  # not busy: retrying here cannot help, so no 429 and no Retry-After
        raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
    watcher = asyncio.create_task(_cancel_on_disconnect(request, ticket))
    if stream:
        return StreamingResponse(_sse(ticket, watcher, fmt), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while not isinstance(event := await ticket.next(), Done):
            fmt.add(event)
    except Cancelled:
        raise ApiError(499, "client closed the request", code="cancelled") from None
    except Exception as e:  # noqa: BLE001  (this request fails alone, with the reason)
        raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error") from None
    finally:
        watcher.cancel()
        ticket.cancel()
    return fmt.response(event)


async def _cancel_on_disconnect(request: Request, ticket, poll_s: float = 0.05) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(poll_s)
    ticket.cancel()


async def _sse(ticket, watcher, fmt: Format):
    """Server-sent events: data: {chunk}\\n\\n ... data: [DONE]\\n\\n."""
    started, num_texts, pending, delay, due = time.monotonic(), 0, deque(), 0.0, 0.0
    # The loop gets a turn after every chunk (asyncio.sleep(0)). Writing a backlog of queued events in one go, a
    # client that has gone would be noticed only at its end: every write after the failed one goes to the dead
    # socket, and asyncio logs each one after the fifth. With the turn the server notices and drops the rest.
    # Pacing: the next pending piece is due at a deadline (`due`), not after a wait that each event restarts: drafts
    # of the next canvas, a step apart, would otherwise hold the committed text back until Done.
    try:
        for chunk in fmt.start():
            yield _data(chunk)
        while True:
            await asyncio.sleep(0)
            left = due - time.monotonic()
            if pending and left <= 0:  # pacing: the next piece of committed text
                yield _data(fmt.piece(*pending.popleft()))
                due = time.monotonic() + delay
                continue
            event = await ticket.next(timeout=left if pending else None)
            if event is None:  # the deadline came first: the piece goes out at the top of the loop
                continue
            if isinstance(event, Draft):
                yield _data(fmt.draft(event))
            elif isinstance(event, Text):
                num_texts += 1
                pieces = [event.text] if event.kind == "tool_call" else _PIECE.findall(event.text)
                pending.extend((event.kind, p) for p in pieces)
                if pending:
                    yield _data(fmt.piece(*pending.popleft()))
                per_commit = (time.monotonic() - started) / num_texts  # expected time until the next commit
                delay = min(MAX_PIECE_DELAY_S, 0.8 * per_commit / max(1, len(pending)))
                due = time.monotonic() + delay
            else:  # Done: flush, finish, usage
                while pending:
                    yield _data(fmt.piece(*pending.popleft()))
                    await asyncio.sleep(0)
                yield _data(fmt.finish(event))
                if fmt.include_usage:
                    yield _data(fmt.usage_chunk(event))
                break
    except Cancelled:
        return
    except Exception as e:  # noqa: BLE001  headers are sent: report in the stream, then end it properly
        yield _data(ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body())
    finally:
        watcher.cancel()
        ticket.cancel()
    yield "data: [DONE]\n\n"


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
