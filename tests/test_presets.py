"""Speed presets (dgemma/engine/presets.py) and dynamic int8 matmuls (dgemma/quant/dynamic.py)."""

from __future__ import annotations

import json

import pytest
import torch

import dgemma
from dgemma.cli import main
from dgemma.engine.presets import PRESETS, preset_knobs
from dgemma.model.moe import Experts
from dgemma.quant import dynamic
from dgemma.engine.generate import step_config


def _int8_or_skip():
    try:
        dynamic.check_available()
    except dynamic.DynamicInt8Error as e:
        pytest.skip(str(e))


# --- presets ---------------------------------------------------------------------------------------------------
def test_preset_knobs_explicit_wins_and_unknown_names_fail():
    assert preset_knobs("exact") == {} and preset_knobs(None) == {}
    assert preset_knobs("fastest") == PRESETS["fastest"].knobs
    assert preset_knobs("fastest", max_denoising_steps=3, entropy_bound=None) == \
        {**PRESETS["fastest"].knobs, "max_denoising_steps": 3}
    with pytest.raises(ValueError, match="unknown preset 'turbo'.*exact"):
        preset_knobs("turbo")


def test_engine_preset_sets_defaults_and_exact_restores(random_model_dir):
    engine = dgemma.load(random_model_dir, quiet=True)
    checkpoint = engine.generation_config
    engine.use_preset("fastest")
    assert engine.preset == "fastest"
    for key, value in PRESETS["fastest"].knobs.items():
        assert getattr(engine.generation_config, key) == value
    ids = torch.tensor([[2, 5, 6, 7]])
    out = engine.generate(ids, generator=torch.Generator().manual_seed(0), return_dict=True)
    assert max(int(s.max()) for s in out.steps_per_canvas) <= PRESETS["fastest"].knobs["max_denoising_steps"]
    out = engine.generate(ids, generator=torch.Generator().manual_seed(0), return_dict=True, max_denoising_steps=2)
    assert max(int(s.max()) for s in out.steps_per_canvas) <= 2  # an explicit knob wins over the preset
    engine.use_preset("fast").use_preset("exact")  # presets do not stack
    assert engine.generation_config == checkpoint


def test_confident_preset_stops_where_exact_goes_on(random_model_dir):
    """`confident` keeps the exact sampler and only loosens the stop rule's entropy threshold."""
    engine = dgemma.load(random_model_dir, quiet=True)
    # the sampler settings generation runs with under each preset (generate.step_config, the one mapping)
    exact, confident = (step_config(engine.use_preset(name).generation_config) for name in ("exact", "confident"))
    assert (confident.num_steps, confident.t_min, confident.t_max) == (exact.num_steps, exact.t_min, exact.t_max)
    argmax = torch.tensor([[3, 4, 5], [3, 4, 5]])
    history = argmax[None].clone()
    history[0, 1, 0] = 6  # row 1 changed its argmax since the last step: not stable
    entropy = torch.full((2, 3), 0.01)  # nats: between the checkpoint's 0.005 and the preset's 0.05
    assert exact.stop(argmax, entropy, history).tolist() == [False, False]
    assert confident.stop(argmax, entropy, history).tolist() == [True, False]
    assert confident.stop(argmax, torch.full((2, 3), 0.06), history).tolist() == [False, False]


def test_cli_preset_runs_with_its_step_budget(random_model_dir, capsys):
    assert main(["generate", "hello", "--model", str(random_model_dir), "--preset", "fastest", "--seed", "0",
                 "--max-tokens", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    budget = PRESETS["fastest"].knobs["max_denoising_steps"]
    assert out["stats"]["steps_per_canvas"] and max(out["stats"]["steps_per_canvas"]) <= budget
    with pytest.raises(SystemExit):
        main(["generate", "hello", "--model", str(random_model_dir), "--preset", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err


# --- dynamic int8 ----------------------------------------------------------------------------------------------
def test_int8_linear_close_to_float():
    _int8_or_skip()
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 160, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.1, generator=g)
    x = torch.randn(3, 7, 96, generator=g)
    ref, got = linear(x), dynamic.DynamicInt8Linear(linear)(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    rel = float((got - ref).detach().norm() / ref.detach().norm())
    assert 1e-5 < rel < 0.03  # really quantized, and close


def test_int8_experts_close_to_float_experts():
    _int8_or_skip()
    g = torch.Generator().manual_seed(1)
    experts = Experts(4, 64, 32)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.1, generator=g)
        experts.down_proj.normal_(std=0.1, generator=g)
    x = torch.randn(40, 64, generator=g)
    ids = torch.randint(0, 4, (40, 2), generator=g)
    w = torch.rand(40, 2, generator=g)
    with torch.no_grad():
        ref = experts.forward_reference(x, w, ids)
        got = dynamic.DynamicInt8Experts(experts)(x, w, ids)
    assert float((got - ref).norm() / ref.norm()) < 0.06


def test_int8_model_close_then_restored_exactly():
    """On the bundled trained model: untrained weights (random or at the trainer's initial scale) give 20-40%
    relative logit error with per-tensor 8-bit activations, trained ones about 2% (measured)."""
    _int8_or_skip()
    from dgemma.bundled import default_model_path
    engine = dgemma.load(default_model_path(), quiet=True)
    keys = sorted(engine.module.state_dict())
    ids = torch.tensor([[2, 11, 12, 13, 14, 15]])
    canvas = torch.randint(3, engine.config.vocab_size, (1, engine.config.canvas_length),
                           generator=torch.Generator().manual_seed(0))

    def logits():
        cache = engine.new_cache(1)
        engine.encode(ids, cache)
        return engine.denoise(canvas, cache)

    ref = logits()
    engine.use_int8_dynamic()
    assert sum(isinstance(m, dynamic.DynamicInt8Linear) for m in engine.module.modules()) > 0
    assert sum(isinstance(m, dynamic.DynamicInt8Experts) for m in engine.module.modules()) == \
        engine.config.num_hidden_layers
    got = logits()
    assert not torch.equal(got, ref)
    assert float((got - ref).norm() / ref.norm()) < 0.06
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.9
    out = engine.generate(ids, generator=torch.Generator().manual_seed(3), return_dict=True, sampling="fast")
    again = engine.generate(ids, generator=torch.Generator().manual_seed(3), return_dict=True, sampling="fast")
    assert torch.equal(out.sequences, again.sequences)
    with pytest.raises(dynamic.DynamicInt8Error, match="already"):  # the low-level swap refuses a second one
        dynamic.apply(engine.module)
    assert engine.use_int8_dynamic() is engine and torch.equal(logits(), got)  # the engine's switch: no change
    engine.use_int8_dynamic(False)
    assert torch.equal(logits(), ref) and sorted(engine.module.state_dict()) == keys
    engine.use_int8_dynamic(False)  # already float: no change
    assert torch.equal(logits(), ref) and not dynamic.active(engine.module)


def test_int8_self_conditioning_product_close_chunk_invariant_and_restored():
    """The int8 soft embedding (dynamic._SoftProduct) on the bundled model's own logits: close to the float one
    (it drops probabilities under 1/510 of their row's largest: about 1% error in a real generation's steps, up to
    6% on the first, measured), the same bits whatever the chunking (every row enters in [0, 1] with a 1 in it, so
    every call gets the same activation scale), and gone after restore_float."""
    _int8_or_skip()
    from dgemma.bundled import default_model_path
    engine = dgemma.load(default_model_path(), quiet=True)
    module, L = engine.module, engine.config.canvas_length
    canvas = torch.randint(3, engine.config.vocab_size, (2, L), generator=torch.Generator().manual_seed(0))
    cache = engine.new_cache(2)
    engine.encode(torch.tensor([[2, 11, 12, 13, 14, 15]] * 2), cache)
    sc = engine.denoise(canvas, cache) / 0.6  # sharpened, as the sampler's processed logits are
    with torch.inference_mode():
        ref = module.soft_embedding(sc)
        engine.use_int8_dynamic()
        got = module.soft_embedding(sc)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(got, module.soft_embedding(sc, chunk=7))
        assert torch.equal(got, module.soft_embedding(sc, chunk=64))
        assert 1e-4 < float((got - ref).norm() / ref.norm()) < 0.03
        engine.use_int8_dynamic(False)
        assert module.soft_product is None and torch.equal(module.soft_embedding(sc), ref)


def test_int8_refuses_non_float32_models(random_model_dir):
    _int8_or_skip()
    with pytest.raises(dynamic.DynamicInt8Error, match="float32"):
        dgemma.load(random_model_dir, dtype="bfloat16", quiet=True, int8_dynamic=True)
