"""The optional compiled decoder step (dgemma/engine/compiled.py) against eager, the reference.

The fast tests compile with dynamo's "eager" backend (graph capture without code generation: seconds), which checks
what matters for a GPU: the whole step is captured (no graph breaks, so no host synchronisation inside it), every
tensor made inside it names a device (a CPU-made tensor makes inductor skip CUDA graphs), later canvases reuse the
graph, and logits and tokens equal eager's. The inductor build itself (minutes on this CPU) is a slow test."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, randomise
from torch._dynamo.utils import counters

from dgemma.cli import build_parser
from dgemma.config import GenerationConfig, ModelConfig
from dgemma.engine.cache import KVCache
from dgemma.engine.compiled import uncompile_step
from dgemma.engine.engine import Engine
from dgemma.engine.generate import step_config
from dgemma.engine.scheduler import Commit, Rows, Scheduler
from dgemma.model import DiffusionGemma
from dgemma.model.layers import rope_frequencies, rope_tables
from dgemma.model.moe import Experts

TWO_LAYERS = {"text_config": {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}}
FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.scalar_tensor,
             torch.rand, torch.randn, torch.randint, torch.linspace}


def tiny_engine(seed: int = 0) -> Engine:
    module = DiffusionGemma(ModelConfig.from_dict(make_config(TWO_LAYERS))).eval()
    randomise(module, seed)
    return Engine(module.requires_grad_(False))


class Capture:
    """A dynamo backend that keeps every captured FX graph and runs it as captured (no code generation)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _generate(engine, sampling, seed=3, canvases=3):
    ids = torch.randint(3, 500, (2, 5), generator=torch.Generator().manual_seed(seed))
    return engine.generate(ids, max_new_tokens=canvases * engine.config.canvas_length, max_denoising_steps=3,
                           stability_threshold=None, confidence_threshold=None, eos_token_id=None, sampling=sampling,
                           generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def captured():
    """(eager outputs, compiled outputs, the capture backend, graph breaks) of one tiny engine, both sampling modes."""
    engine = tiny_engine()
    eager = {s: _generate(engine, s) for s in ("fast", "reference")}
    backend = Capture()
    counters.clear()
    engine.compile("default", backend=backend)
    compiled = {s: _generate(engine, s) for s in ("fast", "reference")}
    graphs = len(backend.graphs)
    _generate(engine, "fast", seed=4, canvases=4)  # longer contexts than any before: no new graph
    reused = len(backend.graphs) == graphs
    breaks = dict(counters["graph_break"])
    return engine, eager, compiled, backend, breaks, reused


def test_compiled_generation_gives_eager_tokens_in_both_sampling_modes(captured):
    engine, eager, compiled, *_ = captured
    for mode in ("fast", "reference"):
        assert torch.equal(compiled[mode], eager[mode]), mode
    assert engine.compiled["moe"] == ["grouped"]


def test_whole_step_is_one_graph_with_device_tensors_only(captured):
    _, _, _, backend, breaks, reused = captured
    assert breaks == {}, f"graph breaks in the compiled step: {breaks}"
    # one denoise graph for every step of every canvas, the soft embedding chunked (fast) and whole (reference).
    # Later canvases, even longer ones, reuse them
    assert len(backend.graphs) <= 3 and reused, len(backend.graphs)
    for gm in backend.graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in FACTORIES:
                assert node.kwargs.get("device") is not None, f"{node.format_node()}: made on the CPU in the graph"
            assert not (node.op == "call_method" and node.target in ("item", "tolist")), node.format_node()


def test_compiled_logits_equal_eager_and_uncompile_restores():
    engine = tiny_engine(seed=1)
    module = engine.module
    g = torch.Generator().manual_seed(0)
    cache = KVCache(module.config, 2)
    tokens = torch.randint(3, 500, (2, module.config.canvas_length), generator=g)
    sc = torch.randn(2, module.config.canvas_length, module.config.vocab_size, generator=g)

    def step():
        with torch.inference_mode():
            return module.denoise(tokens, cache, soft=module.soft_embedding(sc, chunk=8))

    with torch.inference_mode():
        module.encode(torch.randint(3, 500, (2, 6), generator=g), cache)
    eager = step()
    engine.compile("max-autotune-no-cudagraphs", backend="eager")
    assert "denoise" in vars(module) and "soft_embedding" in vars(module)
    assert engine.compiled["moe"] == ["grouped"]  # plain experts compile as they are: nothing patched on them
    torch.testing.assert_close(step(), eager, rtol=1e-5, atol=1e-5)
    engine.compile(None)
    assert not {"denoise", "soft_embedding", "rope"} & set(vars(module))
    assert all("dense" not in vars(layer.experts) and not layer.experts.dense for layer in module.layers)
    assert engine.compiled is None and torch.equal(step(), eager)


def _shared_forwards(engine):
    """Two requests with different prompt lengths sharing decoder forwards (stacked caches: per-row lengths and
    masked slots), as the server runs them -> each one's committed tokens."""
    gen = GenerationConfig(max_new_tokens=2 * engine.config.canvas_length, max_denoising_steps=2,
                           stability_threshold=None, confidence_threshold=None)
    scheduler, out = Scheduler(engine.module), {}
    for i, length in enumerate((3, 9)):
        ids = torch.randint(3, 500, (1, length), generator=torch.Generator().manual_seed(i))
        rows = scheduler.add(Rows(engine.module, ids, gen, step_config(gen, sampling="fast"),
                                  generator=torch.Generator().manual_seed(i)))
        out[id(rows)] = []
    while scheduler.rows:
        for rows, event in scheduler.tick():
            if isinstance(event, Commit):
                out[id(rows)].append(event.tokens)
    return [torch.cat(v, dim=1) for v in out.values()]


def test_compiled_shared_forwards_give_eager_tokens():
    engine = tiny_engine(seed=3)
    eager = _shared_forwards(engine)
    engine.compile("default", backend="eager")
    assert all(torch.equal(a, b) for a, b in zip(_shared_forwards(engine), eager))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,E,K", [(1, 4, 2), (33, 16, 3), (12, 6, 2), (0, 4, 2)])
def test_grouped_dispatch_compiles_whole_and_keeps_the_bits(N, E, K, dtype):
    """Experts.forward's grouped dispatch (what the compiled step runs for plain experts): one graph, no breaks (the
    fp32 grouped GEMM through moe.grouped_mm's opaque operator), the same bits as eager, close to the per-token
    reference."""
    from dgemma.model import moe

    D, I = 32, 16
    g = torch.Generator().manual_seed(N + E)
    experts = Experts(E, D, I).requires_grad_(False)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, D, generator=g) * D ** -0.5)
        experts.down_proj.copy_(torch.randn(E, D, I, generator=g) * I ** -0.5)
    experts = experts.to(dtype)
    x = torch.randn(N, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(min(E, 5), generator=g)[:K] for _ in range(N)]) if N else \
        torch.zeros(0, K, dtype=torch.int64)  # experts >= 5 get no tokens
    weights = torch.rand(N, K, generator=g) + 0.1
    try:
        moe.set_grouped_dispatch("on")
        torch._dynamo.reset()
        with torch.inference_mode():
            out = torch.compile(experts, backend=Capture(), fullgraph=True)(x, weights, ids)
            eager = experts(x, weights, ids)
    finally:
        moe.set_grouped_dispatch("auto")
        torch._dynamo.reset()
    assert torch.equal(out, eager)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, experts.forward_reference(x, weights, ids), rtol=tol, atol=tol)


def test_rope_frequencies_are_made_once_per_device_with_the_same_values():
    module = tiny_engine().module
    positions = torch.arange(37, 53)[None]
    first = module.rope(positions, torch.float32)
    cached = dict(module._rope_freqs)
    again = module.rope(positions, torch.float32)
    assert cached and all(module._rope_freqs[k] is v for k, v in cached.items())  # reused, not rebuilt
    cfg = module.config
    for sliding, (cos, sin) in again.items():
        fresh = (rope_frequencies(cfg.head_dim, cfg.rope_theta_sliding) if sliding else
                 rope_frequencies(cfg.global_head_dim, cfg.rope_theta_full, cfg.partial_rotary_factor))
        assert all(torch.equal(a, b) for a, b in zip((cos, sin), rope_tables(positions, fresh, torch.float32)))
        assert all(torch.equal(a, b) for a, b in zip(first[sliding], (cos, sin)))


def test_bad_mode_is_refused_and_cli_flag_parses(capsys):
    engine = tiny_engine()
    with pytest.raises(ValueError, match="unknown compile mode 'fast'.*reduce-overhead"):
        engine.compile("fast")
    assert engine.compiled is None and "denoise" not in vars(engine.module)
    parser = build_parser()
    assert parser.parse_args(["generate", "hi"]).compile is None
    assert parser.parse_args(["generate", "hi", "--compile"]).compile == "default"
    assert parser.parse_args(["chat", "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parser.parse_args(["serve", "--compile=max-autotune-no-cudagraphs"]).compile == "max-autotune-no-cudagraphs"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "hi", "--compile", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err
    uncompile_step(engine.module)  # a no-op on an eager module


@pytest.mark.slow
def test_inductor_step_matches_eager():
    """The real build (inductor, C++ on a CPU: a minute or more cold): logits to fp32 tolerance, same tokens."""
    engine = tiny_engine(seed=2)
    eager = {s: _generate(engine, s, canvases=2) for s in ("fast", "reference")}
    engine.compile("default")
    for s in ("fast", "reference"):
        assert torch.equal(_generate(engine, s, canvases=2), eager[s]), s


def test_eager_decoder_step_reads_nothing_back_from_the_device():
    """The EAGER step (what every GPU user runs by default) makes no data-dependent host read and no tensor from
    Python data: no bincount (its size depends on the data), no .item()/.tolist(), no torch.tensor(x) or
    as_tensor(int) per call. On CUDA each is a sync point (30+ per 26B-A4B step before). Recorded op by op while the
    grouped dispatch (what CUDA runs) denoises a canvas, in bf16 and fp32, after a first call made the per-device
    constants (RoPE frequencies)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dgemma.model import moe

    forbidden = {"aten::_local_scalar_dense", "aten::bincount", "aten::nonzero", "aten::lift_fresh",
                 "aten::masked_select", "aten::unique_consecutive", "aten::_unique2"}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func._schema.name)
            return func(*args, **(kwargs or {}))

    for dtype in (torch.bfloat16, torch.float32):
        engine = tiny_engine()
        module = engine.module.to(dtype)
        cache = engine.new_cache(1)
        L, D = module.config.canvas_length, module.config.hidden_size
        canvas = torch.randint(0, module.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(0))
        soft = torch.randn(1, L, D, generator=torch.Generator().manual_seed(1)).to(dtype)
        try:
            moe.set_grouped_dispatch("on")
            with torch.inference_mode():
                engine.encode(torch.tensor([[2, 5, 6, 7]]), cache)
                module.denoise(canvas, cache, soft=soft)
                with Record() as record:
                    module.denoise(canvas, cache, soft=soft)
        finally:
            moe.set_grouped_dispatch("auto")
        # the grouped dispatch was recorded (fp32 through moe.grouped_mm's opaque operator)
        assert {"aten::_grouped_mm", "dgemma::grouped_mm"} & record.ops, sorted(record.ops)
        assert not record.ops & forbidden, (dtype, sorted(record.ops & forbidden))
