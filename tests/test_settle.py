"""Settled positions (dgemma/engine/settle.py): the decoder over a canvas subset equals the whole forward where the
buffered keys/values are current; with nothing settling the tokens are exact's; settled positions are final and
leave the forward; the scheduler keeps other requests' tokens unchanged."""

from __future__ import annotations

import pytest
import torch

from dgemma.config import ConfigError
from dgemma.engine.cache import KVCache
from dgemma.engine.scheduler import Rows, Scheduler, run_alone
from dgemma.engine.generate import Commit, Step, step_config
from dgemma.model.decoder import canvas_kv_buffers


def _context(engine, seed=0, batch=2, prompt=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, engine.config.vocab_size, (batch, prompt), generator=g)
    cache = KVCache(engine.config, batch)
    engine.module.encode(ids, cache)
    return ids, cache, g


@torch.inference_mode()
def test_subset_forward_equals_the_whole_forward_where_buffers_are_current(random_engine):
    module, L = random_engine.module, random_engine.config.canvas_length
    _, cache, g = _context(random_engine)
    tokens = torch.randint(0, random_engine.config.vocab_size, (2, L), generator=g)
    soft = torch.randn(2, L, random_engine.config.hidden_size, generator=g)
    whole = module.denoise(tokens, cache, soft=soft)
    kv = canvas_kv_buffers(module, 2, L)
    every = torch.arange(L).expand(2, L).clone()
    assert torch.allclose(module.denoise(tokens, cache, soft=soft, positions=every, canvas_kv=kv), whole,
                          atol=1e-5, rtol=1e-5)
    # now every buffer holds the current k/v: any subset (each row its own, with fillers at index L) gives the
    # whole forward's rows, and the fillers write only the spare slot
    rows = [torch.randperm(L, generator=g)[:9] for _ in range(2)]
    index = torch.stack([torch.cat([rows[0], torch.tensor([L, L])]), torch.cat([rows[1][:7], torch.tensor([L] * 4)])])
    index = index.sort(dim=1).values
    sub_tokens = tokens.gather(1, index.clamp(max=L - 1))
    sub_soft = soft.gather(1, index.clamp(max=L - 1)[:, :, None].expand(-1, -1, soft.shape[-1]))
    kept = [(k[:, :, :L].clone(), v[:, :, :L].clone()) for k, v in kv]
    part = module.denoise(sub_tokens, cache, soft=sub_soft, positions=index, canvas_kv=kv)
    for b in range(2):
        real = index[b] < L
        assert torch.allclose(part[b, real], whole[b, index[b, real]], atol=1e-4, rtol=1e-4)
    for (k, v), (k0, v0) in zip(kv, kept):
        assert torch.allclose(k[:, :, :L], k0, atol=1e-5) and torch.allclose(v[:, :, :L], v0, atol=1e-5)
    with pytest.raises(ValueError, match="positions and canvas_kv together"):
        module.denoise(tokens, cache, soft=soft, positions=every)


@pytest.mark.parametrize("sampling", ["reference", "fast"])
def test_nothing_settling_gives_exacts_tokens(random_engine, sampling):
    ids, _, _ = _context(random_engine, seed=3)
    runs = []
    for settle in (None, 1000):
        out = random_engine.generate(ids, max_new_tokens=2 * random_engine.config.canvas_length, max_denoising_steps=5,
                                     settle_after=settle, generator=torch.Generator().manual_seed(5),
                                     sampling=sampling, return_dict=True)
        runs.append(out)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].steps_per_canvas, runs[1].steps_per_canvas))


def _settling_knobs(engine, steps=40):
    """Settle on a repeated argmax alone; accept every proposal at a low temperature so argmaxes do repeat."""
    return engine.generation_settings(max_new_tokens=engine.config.canvas_length, max_denoising_steps=steps,
                                      settle_after=1, settle_entropy=1e9, confidence_threshold=None,
                                      entropy_bound=1e9, t_min=0.05, t_max=0.1)


def _settling_run(engine, ids, steps=40):
    gen = _settling_knobs(engine, steps)
    rows = Rows(engine.module, ids, gen, step_config(gen, sampling="fast"), generator=torch.Generator().manual_seed(2))
    return rows, list(run_alone(engine.module, rows))


def test_settled_positions_are_final_and_leave_the_forward(random_engine):
    ids, _, _ = _context(random_engine, seed=4)
    rows, events = _settling_run(random_engine, ids)
    steps = [e.state for e in events if isinstance(e, Step)]
    commit = next(e for e in events if isinstance(e, Commit))
    # with no entropy condition a position settles once its argmax repeats: later steps never change it
    settled_at = {}
    for n, (before, after) in enumerate(zip(steps, steps[1:])):
        for b, p in (before.argmax == after.argmax).nonzero().tolist():
            settled_at.setdefault((b, p), n + 1)
    assert len(settled_at) == ids.shape[0] * random_engine.config.canvas_length
    for (b, p), n in settled_at.items():
        assert all(s.argmax[b, p] == steps[n].argmax[b, p] for s in steps[n:])
        assert commit.tokens[b, p] == steps[n].argmax[b, p] or commit.tokens[b, p] == 0  # 0: pad after a stop id
    # a row stops at the step where its last position settled (row 0 before its 40-step budget)
    for b in range(ids.shape[0]):
        assert int(commit.num_steps[b]) == 1 + max(n for (row, _), n in settled_at.items() if row == b)
    assert int(commit.num_steps[0]) < 40 and rows.settling.settled.all()


def test_the_forward_shrinks_as_positions_settle(random_engine):
    ids, _, _ = _context(random_engine, seed=4, batch=1)
    gen = _settling_knobs(random_engine)
    rows = Rows(random_engine.module, ids, gen, step_config(gen, sampling="fast"),
                generator=torch.Generator().manual_seed(2))
    scheduler = Scheduler(random_engine.module)
    scheduler.add(rows)
    widths, unsettled = [], []
    while scheduler.rows:
        if rows.settling is not None and rows.pending is None:
            widths.append(rows.settling.index.shape[1])
            unsettled.append(int((~rows.settling.settled).sum()))
        scheduler.tick()
    L = random_engine.config.canvas_length
    assert widths[0] == L and widths[-1] < L
    assert widths == unsettled[: len(widths)]  # batch 1: exactly the unsettled positions are computed


def test_other_requests_in_the_scheduler_are_unchanged_by_a_settling_one(random_engine):
    from dgemma.engine.stream import open_request
    prompts = ["Hello there", "A longer prompt about mountains"]

    def run(settle_second: bool):
        scheduler = Scheduler(random_engine.module)
        texts = []
        for i, p in enumerate(prompts):
            knobs = dict(settle_after=1, settle_entropy=1e9, entropy_bound=1e9, t_min=0.05, t_max=0.1) \
                if settle_second and i == 1 else {}
            rows, _ = open_request(random_engine, random_engine.prompt_ids(p), seed=i, drafts=False, max_tokens=70,
                                   max_denoising_steps=5, **knobs)
            texts.append(scheduler.add(rows))
        while scheduler.rows:
            scheduler.tick()
        return [r.committed for r in texts]

    plain, mixed = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain[0], mixed[0]))


def test_settle_knobs_are_checked(random_engine):
    with pytest.raises(ConfigError, match="settle_after must be an integer >= 1"):
        random_engine.generation_settings(settle_after=0)
    with pytest.raises(ConfigError, match="settle_entropy must be a number > 0"):
        random_engine.generation_settings(settle_after=2, settle_entropy=-1)


def test_settle_entropy_without_settling_is_refused_not_ignored(random_engine):
    """settle_entropy alone (settle_after None, the default) was accepted and changed nothing."""
    ids = torch.tensor([[2, 5, 6, 7]])
    for call in (lambda: random_engine.generation_settings(settle_entropy=0.5),
                 lambda: random_engine.generation_settings({"settle_entropy": 0.5}),
                 lambda: random_engine.generate(ids, settle_entropy=0.5),
                 lambda: random_engine.generate(ids, settle_after=None, settle_entropy=0.5)):
        with pytest.raises(ConfigError, match=r"settling is off \(settle_after None\): give settle_after too"):
            call()
    random_engine.use_preset("settle")  # the preset turns settling on: its entropy may be tuned alone
    try:
        assert random_engine.generation_settings(settle_entropy=0.5).settle_entropy == 0.5
    finally:
        random_engine.use_preset("exact")


def test_the_settle_preset_turns_it_on_and_plans_run_whole_canvases(random_engine):
    from dgemma.engine.presets import PRESETS
    import jsonschema
    random_engine.use_preset("settle")
    try:
        gen = random_engine.generation_config
        assert (gen.settle_after, gen.settle_entropy) == (PRESETS["settle"].knobs["settle_after"],
                                                          PRESETS["settle"].knobs["settle_entropy"])
        # JSON output clamps positions through its plan: those canvases never settle and stay valid
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        r = random_engine.generate_json("x", schema=schema, seed=0, max_denoising_steps=3, settle_after=1,
                                        settle_entropy=1e9)
        jsonschema.validate(r.value, schema)
    finally:
        random_engine.use_preset("exact")
    assert random_engine.generation_config.settle_after is None


def test_settling_with_a_compiled_step_says_it_runs_eagerly(random_engine):
    """--preset settle --compile ran every settling canvas eagerly without a word (the compiled step is shaped for
    whole canvases), so the compile a user asked for silently did nothing; now a warning says so."""
    ids = torch.tensor([[2, 5, 6, 7]])

    def run():
        return random_engine.generate(ids, generator=torch.Generator().manual_seed(0), max_new_tokens=4,
                                      max_denoising_steps=3, settle_after=1, settle_entropy=1e9)
    eager = run()
    random_engine.compile("default")  # installs the compiled step; nothing compiles until it is called
    try:
        with pytest.warns(UserWarning, match=r"settled positions .* run the decoder eagerly: the compiled step"):
            compiled = run()
    finally:
        random_engine.compile(None)
    assert torch.equal(compiled, eager)  # the settling forward is the eager one, the same bits
