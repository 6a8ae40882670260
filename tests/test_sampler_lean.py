"""The memory-lean step and soft embedding compute the SAME bits as the reference forms, with a fraction of the memory.

`step_lean` (dgemma/sampling/lean.py) against `step` in fast mode, field by field with torch.equal; the chunked
`soft_embedding` against the whole-canvas one; peak allocations counted from the profiler's allocator events.
Shapes are small: every test runs in seconds on a busy 2-core CPU.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import dgemma.sampling as S
from dgemma.model.decoder import soft_embedding
from dgemma.sampling import sampler
from dgemma.sampling.lean import _chunks, default_chunk, step_lean, work_bytes

FIELDS = ("tokens", "argmax", "sc_logits", "history", "stopped", "done", "num_steps_taken", "entropy", "confidence",
          "accepted")
FAST = S.StepConfig(num_steps=6, sample=S.sample_inverse_cdf)
REFERENCE_RNG = S.StepConfig(num_steps=6, sample=S.sample_reference)
MODES = pytest.mark.parametrize("cfg", [FAST, REFERENCE_RNG], ids=["fast", "reference_rng"])


def assert_same_state(a: S.DenoiseState, b: S.DenoiseState) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name


def both(logits, state, cfg, seed, chunk):
    """-> (step's state, step_lean's state, lean's generator state equal to step's after the step)."""
    ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    a = S.step(logits.clone(), state, cfg, ga)
    b = step_lean(logits.clone(), state, cfg, gb, chunk=chunk)
    assert torch.equal(ga.get_state(), gb.get_state())  # the same number of draws of the same kinds
    return a, b


@MODES
@pytest.mark.parametrize("rows,length,vocab,chunk", [
    (1, 1, 7, 4),  # one position in all
    (2, 16, 512, 5),  # chunk does not divide B*L
    (3, 17, 1000, 7),  # V not a multiple of the vector width; a 1-position remainder merges into the last chunk
    (2, 9, 777, 100),  # chunk larger than B*L
    (2, 4, 40000, 1),  # chunk 1 is taken as 2: one-row reductions over V >= 32768 would round differently
    (2, 5, 33333, 2),
])
def test_step_lean_equals_step(rows, length, vocab, chunk, cfg):
    g = torch.Generator().manual_seed(rows * 1000 + length)
    state = S.init_state(S.init_canvas(rows, length, vocab, g), cfg)
    logits = torch.randn(rows, length, vocab, generator=g) * 4
    a, b = both(logits, state, cfg, 1, chunk)  # first step: sc_logits None
    assert_same_state(a, b)
    sc = torch.randn(rows, length, vocab, generator=g)
    a, b = both(logits, dataclasses.replace(state, sc_logits=sc), cfg, 2, chunk)  # later step, nothing frozen
    assert_same_state(a, b)


def test_entropy_in_column_blocks(monkeypatch):
    """The entropy's log-probs go through a [chunk, block] scratch; blocks narrower than V, last one ragged."""
    from dgemma.sampling import lean

    rows, length, vocab, chunk = 2, 10, 1003, 4
    monkeypatch.setitem(lean.BLOCK_BYTES, "cpu", 4 * chunk * 300)  # block = 300 columns: 300, 300, 300, 103
    g = torch.Generator().manual_seed(5)
    state = S.init_state(S.init_canvas(rows, length, vocab, g), FAST)
    state = dataclasses.replace(state, sc_logits=torch.randn(rows, length, vocab, generator=g))
    a, b = both(torch.randn(rows, length, vocab, generator=g) * 2, state, FAST, 6, chunk)
    assert_same_state(a, b)


def test_argmax_shortcuts_keep_argmaxs_first_index():
    """The lean step's two cheaper argmaxes against torch.argmax: torch.max(dim) on ℓ̃ (ties, -0.0 == +0.0, -inf
    rows, NaN), and the int32 view on p / q >= +0 (ties, zeros, inf); with a zero in q the float argmax runs."""
    from dgemma.sampling.lean import _argmax_nonnegative

    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [-0.0, 0.0, -1.0, -0.0], [-inf, -inf, -inf, -inf], [1.0, nan, 5.0, nan],
                      [-2.0, -1.0, -1.0, -3.0], [0.0, -0.0, 0.0, -5.0]])
    values, index = torch.max(x, dim=-1)
    assert torch.equal(index, torch.argmax(x, dim=-1))
    finite = ~values.isnan()
    assert torch.equal(values[finite], torch.amax(x, dim=-1)[finite])
    ratio = torch.tensor([[0.0, 2.5, 1.0, 2.5], [0.0, 0.0, 0.0, 0.0], [1.0, inf, inf, 3.0], [1e-40, 3e-40, 3e-40, 0.0]])
    out = torch.empty(4, dtype=torch.long)
    _argmax_nonnegative(ratio, True, out)
    assert torch.equal(out, torch.argmax(ratio, dim=-1))
    ratio[1, 2] = nan  # 0 / 0: only possible with a zero in q, when the float argmax runs
    _argmax_nonnegative(ratio, False, out)
    assert out[1] == 2


@pytest.mark.parametrize("sample", [S.sample_inverse_cdf, S.sample_reference], ids=["fast", "reference_rng"])
def test_frozen_rows_and_rows_at_different_steps(sample):
    rows, length, vocab = 4, 8, 3001
    cfg = S.StepConfig(num_steps=6, t_min=0.0, t_max=1.2, sample=sample)
    g = torch.Generator().manual_seed(0)
    state = S.init_state(S.init_canvas(rows, length, vocab, g), cfg)
    state = dataclasses.replace(state, done=torch.tensor([True, False, True, False]),
                                num_steps_taken=torch.tensor([1, 2, 6, 0]))  # row 2 exhausted: n clamps to 1
    logits = torch.randn(rows, length, vocab, generator=g) * 3
    a, b = both(logits, state, cfg, 3, 5)  # sc_logits None: even frozen rows take ℓ̃
    assert_same_state(a, b)
    state = dataclasses.replace(state, sc_logits=torch.randn(rows, length, vocab, generator=g))
    a, b = both(logits, state, cfg, 4, 5)
    assert_same_state(a, b)
    assert torch.equal(b.sc_logits[[0, 2]], state.sc_logits[[0, 2]])  # frozen rows keep their previous ℓ̃


@pytest.mark.parametrize("sample", [S.sample_inverse_cdf, S.sample_reference], ids=["fast", "reference_rng"])
def test_multi_step_loops_are_identical(sample):
    """Whole canvases with the default stop rule, logits depending on the canvas: the same trajectory, step by step."""
    rows, length, vocab = 3, 12, 2053
    cfg = S.StepConfig(num_steps=10, t_min=0.05, t_max=0.3, sample=sample)  # cold: rows stop early
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(9)) * 6

    def run(fn):
        g = torch.Generator().manual_seed(11)
        state, states = S.init_state(S.init_canvas(rows, length, vocab, g), cfg), []
        while not bool(state.done.all()):
            state = fn(table[state.tokens] + torch.arange(length)[:, None] % 7, state, cfg, g)
            states.append(state)
        return states

    ref, lean = run(S.step), run(lambda lo, st, c, g: step_lean(lo, st, c, g, chunk=5))
    assert len(ref) == len(lean) and len(ref) >= 2
    for a, b in zip(ref, lean):
        assert_same_state(a, b)


def test_step_lean_in_place_contract_and_reference_fallback():
    rows, length, vocab = 2, 6, 300
    g = torch.Generator().manual_seed(0)
    state = S.init_state(S.init_canvas(rows, length, vocab, g), FAST)
    logits = torch.randn(rows, length, vocab, generator=g)
    raw = logits.clone()
    new = step_lean(logits, state, FAST, torch.Generator().manual_seed(1), chunk=4)
    assert new.sc_logits is logits  # ℓ̃ lives in the input buffer: no second [B,L,V] tensor
    kept = torch.randn(rows, length, vocab, generator=g)
    copy = kept.clone()
    step_lean(kept, state, FAST, torch.Generator().manual_seed(1), chunk=4, inplace=False)
    assert torch.equal(kept, copy)
    # any other sampler is not chunked: step itself runs, logits untouched, same state as step
    other = dataclasses.replace(FAST, sample=lambda probs, generator=None: S.sample_reference(probs, generator))
    raw_copy = raw.clone()
    a = S.step(raw, state, other, torch.Generator().manual_seed(2))
    b = step_lean(raw, state, other, torch.Generator().manual_seed(2), chunk=4)
    assert_same_state(a, b)
    assert torch.equal(raw, raw_copy)
    # invalid logits fail as torch.multinomial fails in the reference step
    bad = raw.clone()
    bad[1, 2] = float("nan")
    for fn in (S.step, step_lean):
        with pytest.raises(RuntimeError, match="probability tensor contains"):
            fn(bad.clone(), state, REFERENCE_RNG, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError):
        step_lean(raw, state, FAST, chunk=0)
    with pytest.raises(ValueError):
        step_lean(raw.double(), state, FAST)


def test_chunk_ranges():
    assert _chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert _chunks(9, 4) == [(0, 4), (4, 9)]  # no single-position chunk
    assert _chunks(1, 4) == [(0, 1)] and _chunks(3, 8) == [(0, 3)]
    assert default_chunk(262_144) == 16 and default_chunk(32_768) == 128 and default_chunk(10**9) == 2
    # an accelerator takes 8x larger chunks (each chunk is ~40 kernel launches): 2 chunks a canvas row at the 26B's V
    assert default_chunk(262_144, "cuda") == 128 and default_chunk(262_144, torch.device("cuda:1")) == 128
    assert default_chunk(262_144, "cpu") == 16 and work_bytes("cuda") == 160 << 20 and work_bytes() == 18 << 20


def stub_model(vocab, dim, dtype):
    emb = torch.nn.Embedding(vocab, dim, dtype=dtype)
    torch.nn.init.normal_(emb.weight, std=0.05, generator=torch.Generator().manual_seed(vocab))
    # embed_scale as DiffusionGemma.embed_scale: sqrt(D) rounded to the weight dtype, a Python number
    return SimpleNamespace(embed_tokens=emb, config=SimpleNamespace(embed_scale=dim ** 0.5), soft_product=None,
                           embed_scale=lambda dt: float(torch.tensor(dim ** 0.5, dtype=dt)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,length,vocab,dim,chunk", [
    (2, 16, 512, 64, 5), (3, 7, 4099, 48, 4), (1, 9, 2048, 32, 100), (2, 8, 32768, 64, 1)])
def test_chunked_soft_embedding_is_bit_identical(dtype, rows, length, vocab, dim, chunk):
    model = stub_model(vocab, dim, dtype)
    sc = torch.randn(rows, length, vocab, generator=torch.Generator().manual_seed(1)) * 3
    mask = torch.arange(rows) % 2 == 0
    with torch.no_grad():
        ref = soft_embedding(model, sc, mask)
        lean = soft_embedding(model, sc, mask, chunk=chunk)
    assert lean.dtype == ref.dtype == dtype and torch.equal(lean, ref)


# ----- memory: peak bytes allocated during the call, from the profiler's allocator events (deterministic) -----------

def peak_bytes(fn) -> int:
    """Highest running total of bytes allocated minus freed while fn runs (inputs allocated before do not count)."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover
        pytest.skip("torch profiler internals unavailable")

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = [n for n in walk(prof.profiler.kineto_results.experimental_event_tree()) if n.tag == _EventType.Allocation]
    total = peak = 0
    for node in sorted(events, key=lambda n: n.start_time_ns):
        total += node.extra_fields.alloc_size
        peak = max(peak, total)
    return peak


def test_step_lean_peak_memory(monkeypatch):
    from dgemma.sampling import noise

    rows, length, vocab, chunk = 2, 64, 8192, 16
    buffer = rows * length * vocab * 4  # one fp32 [B,L,V]
    g = torch.Generator().manual_seed(0)
    state = S.init_state(S.init_canvas(rows, length, vocab, g), FAST)
    state = dataclasses.replace(state, sc_logits=torch.randn(rows, length, vocab, generator=g),
                                done=torch.tensor([True, False]))
    logits = torch.randn(rows, length, vocab, generator=g)
    a, b = logits.clone(), logits.clone()
    ref = peak_bytes(lambda: S.step(a, state, FAST, torch.Generator().manual_seed(1)))
    lean = peak_bytes(lambda: step_lean(b, state, FAST, torch.Generator().manual_seed(1), chunk=chunk))
    assert ref >= 3 * buffer, (ref, buffer)  # measured 5.0x
    assert lean <= buffer * chunk / (rows * length) + (2 << 20) + (1 << 16), (lean, buffer)  # work + scratch
    # reference-RNG mode: the exponential noise is drawn chunk by chunk into ONE more [chunk, V] buffer, through
    # noise.py's int64/float64/int64 scratch of SUB_ENTRIES entries: no [B,L,V] noise tensor
    monkeypatch.setattr(noise, "SUB_ENTRIES", 4096)
    assert noise._check()  # its one-time allocations happen here, not in the measured call
    a, b = logits.clone(), logits.clone()
    ref = peak_bytes(lambda: S.step(a, state, REFERENCE_RNG, torch.Generator().manual_seed(1)))
    lean_rng = peak_bytes(lambda: step_lean(b, state, REFERENCE_RNG, torch.Generator().manual_seed(1), chunk=chunk))
    assert ref >= 3 * buffer, (ref, buffer)
    # work + noise + the entropy's block scratch (fast mode's, `entropy_from_probs`, is smaller: [chunk, 4096])
    assert lean_rng <= 2 * buffer * chunk / (rows * length) + (2 << 20) + 24 * 4096 + (1 << 16), (lean_rng, buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_soft_embedding_peak_memory(dtype):
    rows, length, vocab, dim, chunk = 2, 64, 8192, 32, 16
    buffer = rows * length * vocab * 4  # fp32 probabilities of the whole canvas
    per_chunk = buffer * chunk // (rows * length)
    model = stub_model(vocab, dim, dtype)
    sc = torch.randn(rows, length, vocab)
    with torch.no_grad():
        ref = peak_bytes(lambda: soft_embedding(model, sc))
        lean = peak_bytes(lambda: soft_embedding(model, sc, chunk=chunk))
    outputs = 4 * rows * length * dim * 4 + (1 << 16)
    if dtype == torch.float32:  # measured: 1.03x vs 0.05x (fp32, B=2, L=256, V=32768, D=512, chunk 16)
        assert ref >= buffer and lean <= per_chunk + outputs, (ref, lean, buffer)
    else:  # one bf16 [B*L,V] buffer (0.5x) + fp32 chunk temporaries; measured 2.5x vs 0.58x at the size above
        assert ref >= 2 * buffer and lean <= buffer // 2 + 3 * per_chunk + outputs, (ref, lean, buffer)


def test_canvas_loop_lean_path_equals_the_plain_step(monkeypatch):
    """canvas_loop runs step_lean + chunked soft_embedding; swapping in the plain `step` and the whole-canvas
    soft embedding changes no token: fast mode and reference-RNG mode."""
    from conftest import TINY_CONFIG

    import dgemma.engine.generate as G
    from dgemma.config import GenerationConfig, ModelConfig
    from dgemma.model.blocks import DiffusionGemma
    from dgemma.model.saving import init_weights
    from dgemma.sampling import step

    module = DiffusionGemma(ModelConfig.from_dict(TINY_CONFIG)).eval()
    init_weights(module, torch.Generator().manual_seed(0), std=0.5)  # some rows hit EOS and get padded
    ids = torch.randint(3, 500, (3, 5), generator=torch.Generator().manual_seed(1))
    gen = GenerationConfig(max_new_tokens=32, max_denoising_steps=5, eos_token_id=(1,), pad_token_id=0)

    def run(sampling):
        cfg = G.step_config(gen, sampling=sampling)
        out = G.generate(module, ids, gen, cfg, generator=torch.Generator().manual_seed(2))
        return out.sequences, torch.stack(out.steps_per_canvas)

    lean = {s: run(s) for s in ("fast", "reference")}
    import dgemma.engine.scheduler as S
    monkeypatch.setattr(S, "step_lean", step)  # the canvas loop's sampler step (engine/scheduler.py Rows.step)
    monkeypatch.setattr(module, "soft_embedding", lambda sc, sc_mask=None, chunk=None: soft_embedding(module, sc))
    for sampling, (seqs, steps) in lean.items():
        got_seqs, got_steps = run(sampling)
        assert torch.equal(got_seqs, seqs) and torch.equal(got_steps, steps), sampling


def test_sampler_ops_bench_counts_fewer_calls_with_the_accelerator_budget(capsys):
    """bench/sampler_ops.py runs end to end; the larger chunks make fewer operator calls; budgets are restored."""
    import json
    import sys
    from pathlib import Path

    from dgemma.sampling import lean

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import sampler_ops

    before = dict(lean.CHUNK_BYTES), dict(lean.BLOCK_BYTES)
    assert sampler_ops.main(["--vocab", "65536", "--canvas", "64", "--reps", "1", "--threads", "1"]) == 0
    rows = {r["budget"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    assert rows["cpu"]["chunk_positions"] == 64 and rows["accelerator"]["chunk_positions"] == 512
    assert rows["accelerator"]["aten_calls"] < rows["cpu"]["aten_calls"] and rows["cpu"]["ms_per_step"] > 0
    assert (dict(lean.CHUNK_BYTES), dict(lean.BLOCK_BYTES)) == before


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_fast_mode_entropy_is_exact_and_split_invariant(scale):
    """`entropy_from_probs` (fast mode's entropy from the step's probabilities) against float64, with -inf (masked)
    entries, one-hot rows and nearly uniform ones; and the same bits for any split of the rows into chunks of 2+."""
    g = torch.Generator().manual_seed(4)
    rows, vocab = 12, 2 * sampler.ENTROPY_COLUMNS["cpu"] + 77  # two column blocks and a partial one
    x = torch.randn(rows, vocab, generator=g) * scale
    x[0, 100:] = float("-inf")  # a masked row: only 100 allowed ids
    x[1, 7] = 1e4  # one-hot in fp32
    probs = torch.softmax(x, dim=-1)
    maxes, conf = x.amax(dim=-1, keepdim=True), probs.amax(dim=-1)
    got = S.entropy_from_probs(x, probs, maxes, conf)
    log_p = x.double().log_softmax(dim=-1)
    truth = -(log_p.exp() * log_p.clamp(min=-1e300)).nan_to_num().sum(dim=-1)
    assert (got >= 0).all() and got[1] == 0
    torch.testing.assert_close(got.double(), truth, rtol=0, atol=2e-5)
    torch.testing.assert_close(got, S.token_entropy(x), rtol=0, atol=3e-5)  # the reference's sequence, same value
    for split in ([2, 10], [5, 3, 4], [6, 6]):
        parts = [S.entropy_from_probs(a, b, c, d) for a, b, c, d in
                 zip(x.split(split), probs.split(split), maxes.split(split), conf.split(split))]
        assert torch.equal(torch.cat(parts), got), split
