"""The generation worker: one thread owns the Engine (which is not thread-safe) and runs admitted requests.

http.py only uses this interface, so a batched scheduler (rows of different requests stepping together,
issue 6 item 3) can replace `SerialWorker` without touching it:

    worker.submit(job) -> Ticket     from the event loop; raises Overloaded when `max_concurrency` requests
                                     run and `max_queue` wait
    worker.load() -> dict            {"running", "waiting", "max_concurrency", "max_queue"} for /health
    worker.start() / worker.stop()   from the app's lifespan
    await ticket.next(timeout=None)  the request's next engine.stream event (Draft | Text | Done), None on
                                     timeout; raises the generation's error, or Cancelled after cancel()
    ticket.cancel()                  idempotent: work stops within one denoising step and the slot is freed

`BatchedWorker` (serve/batched.py, the default) puts every running request's rows in one scheduler, so they share
decoder forwards. `SerialWorker` (the slow reference) interleaves its running requests: it advances each by one
event (one denoising step) in turn, so every admitted request makes progress and a short answer is not stuck behind
a long one, but throughput equals one request at a time.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field

from ..engine.infill import InfillRun, open_infill
from ..engine.scheduler import Commit, run_alone
from ..engine.stream import Done, Text, open_request
from ..text.parse import ParsedOutput


class Overloaded(Exception):
    """No running slot and no queue place left (HTTP 429)."""


class ShuttingDown(Exception):
    """The worker is stopping and admits nothing more (HTTP 503: another try will not be answered here)."""


class Cancelled(Exception):
    """The ticket was cancelled (its client went away)."""


@dataclass
class Job:
    prompt_ids: list[int]
    options: dict = field(default_factory=dict)  # keywords of engine.stream.stream_ids (an infill's: of engine.infill)
    drafts: bool = False  # deliver Draft events (the worker always steps one denoising step at a time)
    infill: tuple[str, str] | None = None  # (prefix, suffix): the completion is the middle


class Ticket:
    """One request's event stream from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel):
        self._loop = loop
        self._events: deque = deque()
        self._ready = asyncio.Event()
        self._on_cancel = on_cancel
        self.cancelled = False  # read by the worker thread between steps

    def push(self, item) -> None:
        """From any thread: an event, or an exception to raise in the consumer."""
        try:
            self._loop.call_soon_threadsafe(self._push, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _push(self, item) -> None:
        if not self.cancelled:  # after cancel() the consumer only ever sees Cancelled
            self._events.append(item)
            self._ready.set()

    async def next(self, timeout: float | None = None):
        while not self._events:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                return None
        item = self._events.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """On the event loop's thread (it touches the asyncio side); the worker notices before the next step."""
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel(self)
            self._events.clear()
            self._events.append(Cancelled("request cancelled"))
            self._ready.set()


class InfillText:
    """An infill request's events (`RowText`'s interface, for both workers): nothing per step, the middle as one Text
    at its last commit, then Done: finish_reason "length" when the middle used all of `limit` (max_tokens), else
    "stop" (the middle met the suffix)."""

    def __init__(self, run: InfillRun, prompt_len: int, limit: int):
        self.run, self.prompt_len, self.limit = run, prompt_len, limit
        self.result = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def on_event(self, event, row: int = 0) -> list:
        self.run.on_event(event)
        if not (isinstance(event, Commit) and self.run.rows.left):
            return []
        self.result = self.run.result()
        return [Text(self.result.middle)]

    def finish(self) -> Done:
        r = self.result if self.result is not None else self.run.result()
        ids = r.middle_ids  # no stop id: free positions exclude them (infill.middle_class), a continuation cuts there
        return Done("length" if len(ids) >= self.limit else "stop", ParsedOutput(None, r.middle), self.prompt_len,
                    len(ids), ids, r.steps_per_canvas, r.wall_s, r.wall_s)


def open_job(engine, job: Job):
    """A job -> its canvas-loop Rows and the object that turns their events into the request's events (`RowText`,
    or `InfillText` for an infill); nothing runs yet, bad options raise here."""
    if job.infill is None:
        return open_request(engine, job.prompt_ids, drafts=job.drafts, **job.options)
    run = open_infill(engine, *job.infill, **job.options)
    limit = job.options.get("max_middle_tokens") or max(run.lengths)  # the server's max_tokens (jobs.py)
    return run.rows, InfillText(run, len(job.prompt_ids), limit)


def job_events(engine, job: Job):
    """One job run alone: an item per canvas-loop event (None for a step that delivers nothing), then Done."""
    rows, text = open_job(engine, job)
    for event in run_alone(engine.module, rows):
        yield from text.on_event(event) or [None]
        if text.done:
            break
    yield text.finish()


class Worker:
    """Admission, queueing, cancellation and the thread's life; subclasses say how admitted requests advance:
    `_entry(ticket, job)` makes a running entry, `_turn(entries)` advances the running ones (it calls `_finish`
    for those that are over), `_close(entry)` releases an entry's resources."""

    def __init__(self, engine, *, max_concurrency: int = 8, max_queue: int = 64):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError(f"need max_concurrency >= 1 and max_queue >= 0, got {max_concurrency}, {max_queue}")
        self.engine = engine
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self._cond = threading.Condition()
        self._waiting: deque[tuple[Ticket, Job]] = deque()
        self._running: list = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dgemma-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def load(self) -> dict:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "max_concurrency": self.max_concurrency, "max_queue": self.max_queue}

    def submit(self, job: Job) -> Ticket:
        ticket = Ticket(asyncio.get_running_loop(), self._cancel)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down; send the request to another instance or after "
                                   "it restarts")
            if len(self._running) + len(self._waiting) >= self.max_concurrency + self.max_queue:
                raise Overloaded(self._busy())
            self._waiting.append((ticket, job))
            self._cond.notify()
        return ticket

    def _busy(self) -> str:
        """The 429 message (under the lock). An admitted request waits in the queue until the worker thread takes
        it, even with a slot free: it counts as running here, since it runs as soon as the thread gets to it."""
        admitted = len(self._running) + len(self._waiting)
        running = min(admitted, self.max_concurrency)
        waiting = admitted - running

        def n(count, what):
            return f"{count} {what}{'' if count == 1 else 's'}"

        queue = "no queue (max_queue 0)" if self.max_queue == 0 else \
            f"{waiting} waiting (the queue holds {n(self.max_queue, 'request')})"
        return (f"server busy: {n(running, 'request')} running (at most {self.max_concurrency} at a time) and "
                f"{queue}; retry shortly")

    def _cancel(self, ticket: Ticket) -> None:
        with self._cond:  # a waiting request leaves at once; a running one after its current step
            self._waiting = deque(w for w in self._waiting if w[0] is not ticket)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._running and not self._waiting:
                    self._cond.wait()
                if self._stopping:
                    break
                while self._waiting and len(self._running) < self.max_concurrency:
                    self._running.append(self._entry(*self._waiting.popleft()))
                turn = list(self._running)
            self._turn(turn)
        with self._cond:
            left = [r.ticket for r in self._running] + [t for t, _ in self._waiting]
            for entry in self._running:
                self._close(entry)
            self._running, self._waiting = [], deque()
        for ticket in left:
            ticket.push(RuntimeError("the server shut down before this request finished"))

    def _finish(self, entry) -> None:
        self._close(entry)
        with self._cond:
            if entry in self._running:
                self._running.remove(entry)

    def _entry(self, ticket: Ticket, job: Job):
        raise NotImplementedError

    def _turn(self, entries: list) -> None:
        raise NotImplementedError

    def _close(self, entry) -> None:
        pass


@dataclass(eq=False)
class _Running:
    ticket: Ticket
    job: Job
    events: object = None  # the stream_ids generator, created in the worker thread


class SerialWorker(Worker):
    """The slow reference: each running request has its own canvas loop; they take turns, one event each."""

    _entry = _Running

    def _turn(self, entries: list) -> None:
        for slot in entries:
            self._advance(slot)

    def _close(self, slot: _Running) -> None:
        if slot.events is not None:
            slot.events.close()

    def _advance(self, slot: _Running) -> None:
        """One event (at most one denoising step) of one request."""
        if slot.ticket.cancelled:
            return self._finish(slot)
        try:
            if slot.events is None:
                slot.events = job_events(self.engine, slot.job)
            event = next(slot.events)
        except StopIteration:
            return self._finish(slot)
        except Exception as e:  # noqa: BLE001  this request fails alone; the worker and the other requests go on
            slot.ticket.push(e)
            return self._finish(slot)
        if event is None:  # a step with nothing to deliver: the turn ends here
            return
        slot.ticket.push(event)
        if isinstance(event, Done):
            self._finish(slot)
