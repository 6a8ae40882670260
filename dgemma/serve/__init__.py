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


GRACE_S = 4.0  # on Ctrl-C open requests get this long to finish; the rest then end with a clear error


def server(app, *, grace_s: float = GRACE_S, **config):
    """A uvicorn.Server for `app` (config: uvicorn.Config's keywords) whose shutdown fails the requests still open
    after `grace_s` through the worker, so a stream ends with an error chunk and [DONE]; uvicorn alone would cut
    it mid-body when its graceful timeout (set a second later) cancels the connection."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            loop = asyncio.get_running_loop()
            timer = loop.call_later(grace_s, lambda: loop.run_in_executor(None, app.state.worker.stop))
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return Server(uvicorn.Config(app, timeout_graceful_shutdown=int(grace_s) + 1, **config))


def run(engine, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options) -> None:
    """Serve until interrupted (uvicorn)."""
    server(create_app(engine, **options), host=host, port=port, log_level=log_level).run()
