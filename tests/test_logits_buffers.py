"""Step logits in reused buffers on the CPU (engine/scheduler.py `Rows.logits_buffer`) and the int8 head in column
blocks (quant/dynamic.py `_Head`): the same tokens, step counts and random stream as new memory every step, and two
buffers alternating, never the one the sampler state still reads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dgemma.engine.scheduler as scheduler_module
from dgemma.engine.generate import step_config
from dgemma.engine.scheduler import Commit, Rows, Scheduler, Step
from dgemma.quant import dynamic
from dgemma.sudoku import commands
from dgemma.sudoku.format import ANSWER_TOKENS, prompt_ids
from dgemma.sudoku.puzzles import generate_puzzles


@pytest.fixture(scope="module")
def sudoku():
    import dgemma
    engine = dgemma.load(commands.BUNDLED)
    # easy and hard puzzles side by side: rows finish their canvas at different steps (done rows are skipped)
    puzzles = [p for band in ((44, 45), (26, 28)) for p, _ in generate_puzzles(2, band, seed=7)]
    ids = torch.tensor([prompt_ids(engine.require_tokenizer(), p) for p in puzzles])
    return engine, ids


def run(engine, ids, sampling: str, seed: int = 3):
    """One Rows alone in a Scheduler -> (tokens [B,L], steps [B], generator state, storages of each step's ℓ̃,
    storages of the logits each step was given)."""
    gen = engine.generation_settings(max_new_tokens=ANSWER_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    scheduler = Scheduler(engine.module)
    rows = scheduler.add(Rows(engine.module, ids, gen, step_config(gen, sampling=sampling), generator=generator))
    given, kept, commits = [], [], []
    real_step = rows.step

    def step(logits):  # the logits a step gets must not share memory with the ℓ̃ the state still holds
        before = rows.state.sc_logits
        assert before is None or logits.untyped_storage().data_ptr() != before.untyped_storage().data_ptr()
        given.append(logits.untyped_storage().data_ptr())
        return real_step(logits)

    rows.step = step
    while scheduler.rows:
        for _, event in scheduler.tick():
            if isinstance(event, Step):
                kept.append(event.state.sc_logits.untyped_storage().data_ptr())
            elif isinstance(event, Commit):
                commits.append(event)
    assert len(commits) == 1
    return commits[0].tokens, commits[0].num_steps, generator.get_state(), kept, given


@pytest.mark.parametrize("sampling, int8", [("fast", False), ("reference", False), ("fast", True)])
def test_reused_buffers_change_nothing_and_alternate(sudoku, sampling, int8, monkeypatch):
    engine, ids = sudoku
    engine.use_int8_dynamic(int8)
    try:
        tokens, steps, rng, kept, given = run(engine, ids, sampling)
        assert int(steps.max()) >= 3 and len(set(steps.tolist())) > 1, steps.tolist()
        assert len(set(given)) == 2 and len(set(kept)) == 2, "two buffers alternate over the canvas"
        assert all(a != b for a, b in zip(given, given[1:]))
        monkeypatch.setattr(scheduler_module, "REUSE_LOGITS", False)  # a new tensor every step, as before
        new_tokens, new_steps, new_rng, _, _ = run(engine, ids, sampling)
    finally:
        engine.use_int8_dynamic(False)
    assert torch.equal(tokens, new_tokens) and torch.equal(steps, new_steps) and torch.equal(rng, new_rng)


def test_buffers_are_kept_per_shape_and_the_busy_one_is_never_handed_out(random_engine):
    module = random_engine.module
    gen = random_engine.generation_settings(max_new_tokens=8)
    rows = Rows(module, torch.tensor([[2, 5, 7]]), gen, step_config(gen, sampling="fast"))
    shape = (1, random_engine.config.canvas_length, random_engine.config.vocab_size)
    first = rows.logits_buffer(shape)
    assert first.shape == shape and first.dtype == torch.float32 and first.is_contiguous()
    assert rows.logits_buffer(shape) is first  # nothing reads it yet
    rows.begin(module)  # a canvas's fresh state (no ℓ̃ yet)
    assert rows.logits_buffer(shape) is first
    rows.state = dataclasses.replace(rows.state, sc_logits=first[:, 1:])  # the state reads (part of) `first`
    second = rows.logits_buffer(shape)
    assert second.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
    rows.state = dataclasses.replace(rows.state, sc_logits=second)
    assert rows.logits_buffer(shape) is first and len(rows._logits_buffers) == 2
    other = rows.logits_buffer((2, *shape[1:]))  # another shape: a new buffer; only the busy one stays beside it
    assert other.shape == (2, *shape[1:]) and len(rows._logits_buffers) == 2
    assert any(b is second for b in rows._logits_buffers)


def test_int8_head_blocks_give_the_product_of_one_call_and_cap_as_tanh_does(monkeypatch):
    torch.manual_seed(0)
    vocab, hidden, cap = 2 * dynamic.HEAD_COLUMNS + 123, 48, 30.0  # two whole blocks and a partial one
    weight = torch.randn(vocab, hidden) * 0.5
    normed = torch.randn(2, 5, hidden)
    product = dynamic.matmul(normed, dynamic.pack(weight))  # one call over the whole vocabulary
    assert 5 < product.abs().max() < 60  # the soft-cap bends these
    uncapped = dynamic._Head(weight, None)
    assert len(uncapped.blocks) == 3 and torch.equal(uncapped(normed), product)
    head = dynamic._Head(weight, cap)
    out = torch.full((2, 5, vocab), float("nan"))
    assert head(normed, out=out) is out
    torch.testing.assert_close(out, torch.tanh(product / cap) * cap, rtol=0, atol=2e-5)
    monkeypatch.setattr(dynamic, "HEAD_COLUMNS", vocab)
    single = dynamic._Head(weight, None)
    assert len(single.blocks) == 1 and torch.equal(single(normed), product)


def test_a_bf16_head_writes_its_fp32_logits_into_out_without_a_second_buffer():
    """With bf16 weights the head's product is bf16; its fp32 copy goes straight into the caller's `out` (the
    engine's reused logits buffer), so a call allocates only the bf16 product: one fp32 [L, V] buffer less per
    canvas (256 MiB at V = 262,144), with the bits of the plain call."""
    from torch.profiler import ProfilerActivity, profile

    from conftest import make_config
    from dgemma.config import ModelConfig
    from dgemma.model import DiffusionGemma

    module = DiffusionGemma(ModelConfig.from_dict(make_config({"text_config": {"vocab_size": 4096}})))
    module = module.to(torch.bfloat16).eval()
    torch.nn.init.normal_(module.embed_tokens.weight, std=4.0)
    normed = torch.randn(1, 16, module.config.hidden_size, generator=torch.Generator().manual_seed(0))
    normed = normed.to(torch.bfloat16)
    out = torch.empty(1, 16, module.config.vocab_size)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = module.head(normed, out=out)
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and e.cpu_parent is None)
    assert got is out and allocated < 0.75 * out.numel() * 4, allocated  # the bf16 product: half of `out`
    with torch.no_grad():
        assert torch.equal(out, module.head(normed))
