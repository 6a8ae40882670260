"""OpenAI-compatible HTTP server over Engine.stream (`dgemma serve`): a thin adapter, no sampling or model logic.

    http.py      app factory, routes, events -> OpenAI JSON / server-sent events
    schemas.py   request bodies (strict) and OpenAI-style errors
    worker.py    the thread that owns the Engine; admission (429), cancellation; SerialWorker (turns, the reference)
    batched.py   BatchedWorker (the default): running requests share decoder forwards (engine/scheduler.py)
"""

from __future__ import annotations


def create_app(engine, **options):
    """See dgemma.serve.http.create_app (imported lazily: importing dgemma.serve does not import FastAPI)."""
    from .http import create_app as create
    return create(engine, **options)


def run(engine, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options) -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn
    # open streams get 5 s to finish on Ctrl-C; the worker then fails what is left with a clear error
    uvicorn.run(create_app(engine, **options), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
