"""The batched worker (the server's default): every running request's rows sit in ONE scheduler, so concurrent
requests share decoder forwards (engine/scheduler.py): rows at different steps and canvases step together, a new
request's prefill joins at the next tick, a finished or cancelled request leaves at once.

Per tick the worker thread: opens newly admitted requests (`open_request`: their settings, seeded generator and
text handling, the same as `stream_ids`), drops cancelled ones, runs one `Scheduler.tick()`, and turns each
request's events into its Draft / Text / Done events (`RowText`, shared with `stream_ids`). An infill request's
candidate lengths are one Rows of their own in the same scheduler (`open_job`): it steps beside the others.
An error inside a tick cannot be pinned on one request, so it fails every request of that tick, and the worker goes
on with a fresh scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.scheduler import Rows, Scheduler
from ..engine.stream import RowText
from .worker import InfillText, Job, Ticket, Worker, open_job


@dataclass(eq=False)
class _Live:
    ticket: Ticket
    job: Job
    rows: Rows | None = None
    text: RowText | InfillText | None = None


class BatchedWorker(Worker):
    def __init__(self, engine, **limits):
        super().__init__(engine, **limits)
        self.scheduler = Scheduler(engine.module)  # touched only by the worker thread

    _entry = _Live

    def _close(self, entry: _Live) -> None:
        if entry.rows is not None:
            self.scheduler.remove(entry.rows)
            entry.rows = None

    def _turn(self, entries: list[_Live]) -> None:
        for entry in entries:
            if entry.ticket.cancelled:
                self._finish(entry)
            elif entry.rows is None:
                self._open(entry)
        live = {id(e.rows): e for e in entries if e.rows is not None}
        if not live:
            return
        try:
            events = self.scheduler.tick()
        except Exception as e:  # noqa: BLE001  the server goes on; this tick's requests fail
            for entry in live.values():
                entry.ticket.push(e)
                self._finish(entry)
            self.scheduler = Scheduler(self.engine.module)
            return
        for rows, event in events:
            entry = live[id(rows)]
            for piece in entry.text.on_event(event):
                entry.ticket.push(piece)
        for entry in live.values():
            if entry.text.done or entry.rows.left:
                entry.ticket.push(entry.text.finish())
                self._finish(entry)

    def _open(self, entry: _Live) -> None:
        job = entry.job
        try:
            entry.rows, entry.text = open_job(self.engine, job)
        except Exception as e:  # noqa: BLE001  this request fails alone
            entry.ticket.push(e)
            return self._finish(entry)
        self.scheduler.add(entry.rows)
