"""BatchedWorker (serve/batched.py): concurrent requests share decoder forwards, answer exactly what each answers
alone, and a cancelled request leaves without disturbing the others. (The 8-client test over real HTTP in
test_serve.py runs on it too: it is the server's default worker.)"""

from __future__ import annotations

import asyncio

import pytest

import dgemma
from dgemma.bundled import build_random_model
from dgemma.engine.stream import Done, Draft, Text, stream_ids
from dgemma.serve.batched import BatchedWorker
from dgemma.serve.worker import Cancelled, Job, SerialWorker

FAST = {"max_denoising_steps": 4}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return dgemma.load(build_random_model(tmp_path_factory.mktemp("m") / "random"), quiet=True)


def _jobs(engine, n):
    prompts = ["Hello there", "Hi", "Tell me about the sea and the ships on it", "Why?"]
    return [Job(engine.prompt_ids(prompts[i % len(prompts)]), {"max_tokens": 40 + 30 * (i % 3), "seed": i, **FAST},
                drafts=i % 2 == 0) for i in range(n)]


async def _drain(ticket):
    events = []
    while True:
        event = await ticket.next(timeout=60)
        assert event is not None, "no event within 60 s"
        events.append(event)
        if isinstance(event, Done):
            return events


def _run(worker, scenario):
    worker.start()
    try:
        return asyncio.run(scenario())
    finally:
        worker.stop()


def _alone(engine, job) -> Done:
    *_, done = stream_ids(engine, job.prompt_ids, drafts=False, **job.options)
    return done


def test_eight_concurrent_requests_share_forwards_and_answer_as_alone(engine):
    jobs = _jobs(engine, 8)
    alone = [_alone(engine, job) for job in jobs]
    worker = BatchedWorker(engine, max_concurrency=8, max_queue=0)

    async def scenario():
        tickets = [worker.submit(job) for job in jobs]
        return await asyncio.gather(*(_drain(t) for t in tickets))

    results = _run(worker, scenario)
    for job, events, done in zip(jobs, results, alone):
        got = events[-1]
        assert got.completion_ids == done.completion_ids and got.finish_reason == done.finish_reason
        assert "".join(e.text for e in events if isinstance(e, Text) and e.kind == "answer") == done.output.answer
        assert any(isinstance(e, Draft) for e in events) == job.drafts
    solo = sum(sum(d.steps_per_canvas) for d in alone)
    print(f"decoder forwards: {worker.scheduler.forwards} batched vs {solo} one request at a time")
    assert worker.scheduler.forwards < solo / 3
    assert worker.load()["running"] == 0 and not worker.scheduler.rows


def test_a_cancelled_request_leaves_at_once_and_the_others_are_unchanged(engine):
    jobs = _jobs(engine, 3)
    jobs[1] = Job(jobs[1].prompt_ids, {"max_tokens": 640, "eos_token_id": [], **FAST}, drafts=True)  # 10 canvases
    alone = {i: _alone(engine, jobs[i]) for i in (0, 2)}
    worker = BatchedWorker(engine, max_concurrency=3, max_queue=0)

    async def scenario():
        tickets = [worker.submit(job) for job in jobs]
        assert isinstance(await tickets[1].next(timeout=60), Draft)  # it is running
        tickets[1].cancel()
        with pytest.raises(Cancelled):
            await tickets[1].next()
        others = await asyncio.gather(_drain(tickets[0]), _drain(tickets[2]))
        while worker.load()["running"]:
            await asyncio.sleep(0.005)
        return others

    first, third = _run(worker, scenario)
    assert first[-1].completion_ids == alone[0].completion_ids
    assert third[-1].completion_ids == alone[2].completion_ids
    assert not worker.scheduler.rows


def test_scheduling_picks_the_worker(engine):
    from dgemma.serve.http import create_app
    assert isinstance(create_app(engine, model_name="m").state.worker, BatchedWorker)  # the default
    assert isinstance(create_app(engine, model_name="m", scheduling="serial").state.worker, SerialWorker)
    with pytest.raises(ValueError, match="scheduling must be one of"):
        create_app(engine, model_name="m", scheduling="fifo")


@pytest.mark.parametrize("kind", [BatchedWorker, SerialWorker])
def test_an_infill_steps_beside_other_requests_and_a_cancel_stops_it(engine, kind):
    """An infill request ran whole in one worker turn: every other request waited for it and a disconnect could not
    stop it. Now its rows step in the worker's loop like any request's: a short request beside a long infill is
    answered first, an infill answers what it answers alone, and cancelling the long one frees its slot."""
    prefix, suffix = "def add(a, b):\n", "\n    return total\n"
    ids = engine.prompt_ids(prefix)
    long = Job(ids, {"max_middle_tokens": 1280, "seed": 0, **FAST}, infill=(prefix, suffix))  # 20 canvases
    small = Job(ids, {"max_middle_tokens": 12, "seed": 3, **FAST}, infill=(prefix, suffix))
    short = Job(engine.prompt_ids("Hi"), {"max_tokens": 8, **FAST})
    alone = engine.infill(prefix, suffix, max_middle_tokens=12, seed=3, **FAST)
    worker = kind(engine, max_concurrency=3, max_queue=0)

    async def scenario():
        tickets = [worker.submit(job) for job in (long, small, short)]
        _, infilled = await _drain(tickets[2]), await _drain(tickets[1])
        assert await tickets[0].next(timeout=0) is None  # the long infill is still running (it was already done)
        tickets[0].cancel()
        with pytest.raises(Cancelled):
            await tickets[0].next()
        for _ in range(2000):
            if not worker.load()["running"]:
                break
            await asyncio.sleep(0.005)
        return infilled

    infilled = _run(worker, scenario)
    assert "".join(e.text for e in infilled if isinstance(e, Text)) == alone.middle
    assert infilled[-1].completion_ids == alone.middle_ids
    assert worker.load()["running"] == 0
    assert not getattr(worker, "scheduler", None) or not worker.scheduler.rows
