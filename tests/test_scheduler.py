"""The scheduler (engine/scheduler.py): requests' rows share decoder forwards, each keeping its own settings, stop
rule and random stream; rows join and leave between ticks without changing what the others generate."""

from __future__ import annotations

import torch

from dgemma.engine.scheduler import Scheduler
from dgemma.engine.stream import Done, open_request

REQUESTS = [  # different prompt lengths, budgets, step counts, stop rules and acceptance bounds
    dict(prompt="Hello there", seed=1, max_tokens=70, max_denoising_steps=4),
    dict(prompt="A much longer prompt about the weather in the mountains today", seed=2, max_tokens=130,
         max_denoising_steps=7, confidence_threshold=None),
    dict(prompt="Hi", seed=3, max_tokens=40, max_denoising_steps=5, entropy_bound=0.5),
    dict(prompt="Tell me a story", seed=4, max_tokens=64, max_denoising_steps=3),
]


def _options(request: dict) -> dict:
    return {k: v for k, v in request.items() if k != "prompt"}


def run_together(engine, requests, *, join_after: dict[int, int] | None = None, cancel_after=None):
    """Requests in ONE scheduler. join_after {i: tick}: request i joins at that tick (others at 0);
    cancel_after (i, tick): request i is removed then. -> ({i: Done}, scheduler)."""
    join_after = join_after or {}
    scheduler = Scheduler(engine.module)
    live, results, tick = {}, {}, 0
    while True:
        for i, request in enumerate(requests):
            if join_after.get(i, 0) == tick:
                rows, text = open_request(engine, engine.prompt_ids(request["prompt"]), drafts=False,
                                          **_options(request))
                live[i] = (scheduler.add(rows), text)
        if cancel_after is not None and cancel_after[1] == tick and cancel_after[0] in live:
            scheduler.remove(live.pop(cancel_after[0])[0])
        if not live and tick > max(join_after.values(), default=0):
            return results, scheduler
        by_rows = {id(rows): i for i, (rows, _) in live.items()}
        for rows, event in scheduler.tick():
            i = by_rows[id(rows)]
            live[i][1].on_event(event)
        for i, (rows, text) in list(live.items()):
            if text.done or rows.left:
                results[i] = text.finish()
                scheduler.remove(rows)
                del live[i]
        tick += 1


def _alone(engine, request) -> Done:
    return engine.complete(request["prompt"], **_options(request))


def test_one_request_in_a_scheduler_equals_stream_ids(random_engine):
    request = REQUESTS[1]
    results, scheduler = run_together(random_engine, [request])
    alone = _alone(random_engine, request)
    assert results[0].completion_ids == alone.completion_ids and results[0].output == alone.output
    assert results[0].steps_per_canvas == alone.steps_per_canvas
    assert scheduler.forwards == sum(alone.steps_per_canvas)


def test_batched_requests_generate_what_each_generates_alone_with_far_fewer_forwards(random_engine):
    alone = [_alone(random_engine, r) for r in REQUESTS]
    results, scheduler = run_together(random_engine, REQUESTS)
    for i, done in enumerate(alone):
        assert results[i].completion_ids == done.completion_ids, i
        assert results[i].steps_per_canvas == done.steps_per_canvas, i
        assert results[i].finish_reason == done.finish_reason and results[i].completion_tokens <= REQUESTS[i][
            "max_tokens"]
    solo_forwards = [sum(d.steps_per_canvas) for d in alone]
    assert max(solo_forwards) <= scheduler.forwards < 0.6 * sum(solo_forwards), (scheduler.forwards, solo_forwards)


def test_a_row_joining_mid_canvas_and_a_row_cancelled_mid_canvas_leave_the_others_unchanged(random_engine):
    alone = [_alone(random_engine, r) for r in REQUESTS]
    results, scheduler = run_together(random_engine, REQUESTS, join_after={2: 3, 3: 5}, cancel_after=(1, 4))
    assert 1 not in results  # cancelled: it left at tick 4, before finishing
    for i in (0, 2, 3):
        assert results[i].completion_ids == alone[i].completion_ids, i
    assert not scheduler.rows


@torch.inference_mode()
def test_rows_of_one_forward_get_their_own_context_and_positions(random_engine):
    """Two requests with different prompts in one forward: each row's logits match its own forward alone."""
    module = random_engine.module
    rows = [open_request(random_engine, random_engine.prompt_ids(r["prompt"]), **_options(r))[0]
            for r in REQUESTS[:2]]
    scheduler = Scheduler(module)
    for r in rows:
        scheduler.add(r)
    scheduler._encode(rows)
    together = scheduler._forward(rows)
    assert [r for r, _ in together] == rows and scheduler.forwards == 1
    for r, logits in together:
        torch.testing.assert_close(logits, module.denoise(r.state.tokens, r.cache), rtol=1e-4, atol=1e-4)


def test_reference_rng_rows_take_the_whole_canvas_self_conditioning_product(random_engine):
    """Reference-RNG mode promises the reference's tokens; its self-conditioning product is the whole canvas's,
    as the reference computes it (the chunked one can differ in the last bits with one CPU thread)."""
    from types import SimpleNamespace

    from dgemma.engine.generate import step_config
    from dgemma.engine.scheduler import SC_CHUNK, Rows

    module, gen = random_engine.module, random_engine.generation_config
    ids = torch.tensor([[2, 5, 6, 7]])
    chunks = []
    original = module.soft_embedding

    def recording(sc, chunk=None):
        chunks.append(chunk)
        return original(sc, chunk=chunk)

    module.soft_embedding = recording
    try:
        for sampling in ("reference", "fast"):
            rows = Rows(module, ids, gen, step_config(gen, None, sampling), cache=random_engine.new_cache(1))
            sc = torch.randn(1, random_engine.config.canvas_length, random_engine.config.vocab_size)
            rows.state = SimpleNamespace(sc_logits=sc)  # all that soft() reads of the sampler state
            soft = rows.soft(module)
            assert torch.equal(soft, original(sc, chunk=chunks[-1]))
    finally:
        del module.soft_embedding
    assert chunks == [None, SC_CHUNK]
