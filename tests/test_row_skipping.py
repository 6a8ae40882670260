"""Rows whose canvas is done leave the decoder's forward and the sampler's vocabulary work (engine/scheduler.py
`Rows.computed_rows`, sampling/lean.py `_keep_frozen`) without changing a token, a step count or the random stream.

The bundled Sudoku model is a trained model whose rows finish a canvas at very different steps (an easy puzzle in
a few, a hard one in dozens), which is where a batch used to keep computing its finished rows.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dgemma.engine.scheduler as scheduler_module
import dgemma.sampling.lean as lean
from dgemma.engine.cache import RowSubset
from dgemma.engine.generate import step_config
from dgemma.engine.scheduler import Commit, Rows, Scheduler
from dgemma.sudoku import commands
from dgemma.sudoku.format import ANSWER_TOKENS, prompt_ids
from dgemma.sudoku.puzzles import generate_puzzles


@pytest.fixture(scope="module")
def sudoku():
    import dgemma
    engine = dgemma.load(commands.BUNDLED)
    # easy, medium and hard puzzles side by side: their canvases finish at different steps
    puzzles = [p for band in ((44, 45), (34, 36), (26, 28)) for p, _ in generate_puzzles(2, band, seed=31)]
    ids = torch.tensor([prompt_ids(engine.require_tokenizer(), p) for p in puzzles])
    return engine, ids


def run(engine, ids, sampling: str, seed: int = 5):
    """One Rows alone in a Scheduler -> (committed tokens [B,L], steps [B], scheduler, generator state after)."""
    gen = engine.generation_settings(max_new_tokens=ANSWER_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    scheduler = Scheduler(engine.module)
    scheduler.add(Rows(engine.module, ids, gen, step_config(gen, sampling=sampling), generator=generator))
    commits = []
    while scheduler.rows:
        commits += [event for _, event in scheduler.tick() if isinstance(event, Commit)]
    assert len(commits) == 1
    return commits[0].tokens, commits[0].num_steps, scheduler, generator.get_state()


@pytest.mark.parametrize("sampling", ["fast", "reference"])
def test_done_rows_leave_the_forward_and_change_nothing(sudoku, sampling, monkeypatch):
    engine, ids = sudoku
    tokens, steps, skipping, rng = run(engine, ids, sampling)
    assert len(set(steps.tolist())) > 2, f"the rows should finish at different steps: {steps.tolist()}"
    # each row went through the decoder on its own steps only: the number of decoder rows a step computes follows
    # the rows still denoising
    assert skipping.rows_computed == int(steps.sum())
    assert skipping.forwards == int(steps.max())

    monkeypatch.setattr(scheduler_module, "SKIP_DONE_ROWS", False)  # every row, every step, as before
    whole_tokens, whole_steps, whole, whole_rng = run(engine, ids, sampling)
    assert whole.rows_computed == len(ids) * int(whole_steps.max()) > skipping.rows_computed
    assert torch.equal(tokens, whole_tokens) and torch.equal(steps, whole_steps)
    assert torch.equal(rng, whole_rng), "the sampler draws for every row either way"


def test_the_sampler_skips_chunks_of_frozen_rows_only(sudoku, monkeypatch):
    """The sampler's skip is what it claims: chunks of frozen rows only, and whole canvases of done rows."""
    engine, ids = sudoku
    seen = []
    real = lean._keep_frozen

    def counting(state, start, end, *args):
        length = state.tokens.shape[1]
        assert all(state.done[start // length:(end - 1) // length + 1].tolist()), (start, end)
        seen.append(end - start)
        return real(state, start, end, *args)

    length, vocab = engine.config.canvas_length, engine.config.vocab_size
    # the model's vocabulary is tiny: one chunk would hold the whole batch; make it one canvas row per chunk
    monkeypatch.setitem(lean.CHUNK_BYTES, "cpu", 4 * vocab * length)
    monkeypatch.setattr(lean, "_keep_frozen", counting)
    tokens, steps, _, _ = run(engine, ids, "fast")
    frozen_row_steps = int((steps.max() - steps).sum())  # a done row, each later step of its canvas
    assert sum(seen) == frozen_row_steps * length > 0
    monkeypatch.undo()
    assert torch.equal(tokens, run(engine, ids, "fast")[0])


def test_compiled_or_first_step_rows_are_all_computed(sudoku):
    """No skipping before a canvas's first step (no ℓ̃ to keep), nor on a module whose step was compiled (a compiled
    step would compile anew for each batch size): computed_rows says None there."""
    engine, ids = sudoku
    gen = engine.generation_settings(max_new_tokens=ANSWER_TOKENS)
    rows = Rows(engine.module, ids, gen, step_config(gen, sampling="fast"), generator=torch.Generator())
    scheduler = Scheduler(engine.module)
    scheduler.add(rows)
    scheduler.tick()  # encode + first step
    assert rows.state.sc_logits is not None
    rows.state = dataclasses.replace(rows.state, done=torch.tensor([True] + [False] * (len(ids) - 1)))
    assert rows.computed_rows(engine.module).tolist() == list(range(1, len(ids)))
    engine.module.denoise = engine.module.denoise  # what engine/compiled.py does: an instance attribute
    try:
        assert rows.computed_rows(engine.module) is None
    finally:
        del engine.module.denoise


def test_row_subset_reads_the_chosen_rows_of_every_layer(sudoku):
    engine, ids = sudoku
    gen = engine.generation_settings(max_new_tokens=ANSWER_TOKENS)
    rows = Rows(engine.module, ids, gen, step_config(gen, sampling="fast"), generator=torch.Generator())
    Scheduler(engine.module).add(rows)
    engine.module.encode(ids, rows.cache)
    pick = torch.tensor([4, 0, 2])
    view = RowSubset(rows.cache, pick)
    assert view.batch_size == 3 and view.length == rows.cache.length == ids.shape[1]
    for layer in range(engine.config.num_hidden_layers):
        k, v, valid = rows.cache.context(layer)
        got = view.context(layer)
        assert torch.equal(got[0], k[pick]) and torch.equal(got[1], v[pick]) and got[2] is None and valid is None


def test_two_batches_sharing_forwards_skip_their_done_rows(sudoku, monkeypatch):
    """Two Rows of three puzzles each in one Scheduler (one forward over both, each leaving its done rows out) commit
    what each commits alone with every row computed."""
    engine, ids = sudoku
    gen = engine.generation_settings(max_new_tokens=ANSWER_TOKENS)
    cfg = step_config(gen, sampling="fast")
    scheduler = Scheduler(engine.module)
    groups = [scheduler.add(Rows(engine.module, part, gen, cfg, generator=torch.Generator().manual_seed(k)))
              for k, part in enumerate((ids[::2], ids[1::2]))]
    commits = {}
    while scheduler.rows:
        for rows, event in scheduler.tick():
            if isinstance(event, Commit):
                commits[groups.index(rows)] = event
    steps = torch.cat([commits[0].num_steps, commits[1].num_steps])
    assert scheduler.rows_computed == int(steps.sum()) and scheduler.forwards == int(steps.max())
    monkeypatch.setattr(scheduler_module, "SKIP_DONE_ROWS", False)
    for k, part in enumerate((ids[::2], ids[1::2])):
        tokens, num_steps, _, _ = run(engine, part, "fast", seed=k)
        assert torch.equal(commits[k].tokens, tokens) and torch.equal(commits[k].num_steps, num_steps), k


def test_rows_that_ended_start_later_canvases_done_in_fast_mode_only():
    """A row that hit a stop id is committed as all pad in every later canvas, so in fast mode it is not denoised
    there (0 steps: it neither costs forwards nor keeps the batch's canvas going); reference-RNG mode keeps
    denoising it, as the reference does (its steps decide when the canvas ends, hence the random stream)."""
    from conftest import TINY_CONFIG

    from dgemma.config import GenerationConfig, ModelConfig
    from dgemma.engine.generate import generate
    from dgemma.model.blocks import DiffusionGemma
    from dgemma.model.saving import init_weights

    module = DiffusionGemma(ModelConfig.from_dict(TINY_CONFIG)).eval()
    init_weights(module, torch.Generator().manual_seed(0), std=0.5)  # some rows hit the stop id early
    ids = torch.randint(3, 500, (4, 5), generator=torch.Generator().manual_seed(1))
    L = module.config.canvas_length
    for sampling in ("fast", "reference"):
        gen = GenerationConfig(max_new_tokens=4 * L, max_denoising_steps=5, eos_token_id=(1,), pad_token_id=0)
        cfg = step_config(gen, sampling=sampling)
        out = generate(module, ids, gen, cfg, generator=torch.Generator().manual_seed(2))
        steps = torch.stack(out.steps_per_canvas)  # [canvases, B]
        canvases = out.sequences[:, ids.shape[1]:].unflatten(1, (-1, L))  # [B, canvases, L]
        ended = torch.stack([(canvases[:, :k] == 1).flatten(1).any(1) for k in range(steps.shape[0])])  # [canvases, B]
        assert ended.any() and not ended.all(), f"{sampling}: want rows that end before others: {ended.tolist()}"
        assert (canvases.transpose(0, 1)[ended] == 0).all(), "a row that ended commits pad"
        if sampling == "fast":
            assert (steps[ended] == 0).all() and (steps[~ended] > 0).all(), steps.tolist()
        else:
            assert (steps > 0).all(), steps.tolist()
    # without a pad id an ended row's later canvases are returned as denoised, so it is still denoised
    gen = GenerationConfig(max_new_tokens=4 * L, max_denoising_steps=5, eos_token_id=(1,), pad_token_id=None)
    out = generate(module, ids, gen, step_config(gen, sampling="fast"), generator=torch.Generator().manual_seed(2))
    assert (torch.stack(out.steps_per_canvas) > 0).all()
