"""`Engine.generate` takes the reference's generate() arguments with the reference's semantics (spec §9.4, DESIGN §4):
max_length, generation_config (the reference's DiffusionGemmaGenerationConfig, a dict, our GenerationConfig) with
the precedence kwargs > passed config > generation_config.json > global defaults, sampler_config, streamer.

transformers 5.23.0 is the oracle: every expected token and every expected streamer call comes from the reference's
own generate() on the same weights and seed (models and helpers of test_generate_parity.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import dgemma
from dgemma.config import ConfigError

from test_generate_parity import (  # noqa: E402  (tests/ is on sys.path under pytest)
    TEXT_PROMPT, Model, assert_same, batch3, both, models, prompts, run_ours, run_reference)

transformers = pytest.importorskip("transformers")
from transformers import DiffusionGemmaForBlockDiffusion  # noqa: E402
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (  # noqa: E402
    DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig)

__all__ = ["models"]  # the fixture, imported for pytest


# --------------------------------------------------------------------------------------------------------------
# max_length (spec §6.4: it decides when max_new_tokens is at 256; otherwise it still ends generation once reached)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,max_new,canvases", [(5, None, 1), (20, None, 2), (20, 256, 2), (5, 100, 1),
                                                    (40, 20, 2)],
                         ids=["one_canvas", "two_canvases", "explicit_256", "max_length_cuts", "max_new_cuts"])
def test_max_length_matches_reference(models, extra, max_new, canvases):
    m = models("tiny")  # L = 16
    ids = batch3(m)
    knobs = {"max_length": ids.shape[1] + extra, "max_denoising_steps": 3}
    if max_new is not None:
        knobs["max_new_tokens"] = max_new
    a, b = both(m, ids, seed=3, **knobs)
    assert b.sequences.shape[1] == ids.shape[1] + canvases * m.L


def test_max_length_without_room_is_a_clear_error(models):
    m = models("tiny")
    ids = batch3(m)
    with pytest.raises(ValueError, match=rf"max_length={ids.shape[1]} leaves no room after the prompt"):
        m.eng.generate(ids, max_length=ids.shape[1])
    with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
        m.eng.generate(ids, max_length=0)


def test_text_api_refuses_max_length(models):
    """The text API caps with max_tokens; a max_length there would be silently unused."""
    m = models("tiny")
    with pytest.raises(TypeError, match="max_length is the reference generate"):
        m.eng.complete(TEXT_PROMPT, max_length=40)


# --------------------------------------------------------------------------------------------------------------
# generation_config and sampler_config: precedence as in the reference
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def with_file(models, tmp_path_factory) -> Model:
    """The wide model with a generation_config.json that sets some knobs (the checkpoint's defaults)."""
    m = models("wide")
    d = tmp_path_factory.mktemp("compat_gen_cfg")
    shutil.copytree(m.path, d, dirs_exist_ok=True)
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(max_new_tokens=m.L + 3, max_denoising_steps=5, t_min=0.2, t_max=0.9,
               eos_token_id=list(range(1, m.V, 9)), pad_token_id=0,
               sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.3})
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return Model("wide+file", d, DiffusionGemmaForBlockDiffusion.from_pretrained(d).eval(),
                 dgemma.load(d, quiet=True), m.tok)


def test_reference_generation_config_object_and_precedence(with_file):
    """A passed DiffusionGemmaGenerationConfig overrides the file where set, the file fills what it leaves unset,
    and keyword knobs override both."""
    m = with_file
    ids = batch3(m)
    cfg = DiffusionGemmaGenerationConfig(max_new_tokens=2 * m.L + 1, max_denoising_steps=4, t_max=1.2,
                                         sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.05))
    a, b = both(m, ids, seed=4, generation_config=cfg)
    assert all((s == 4).all() for s in b.steps_per_canvas)  # the config's 4, not the file's 5
    a2, b2 = both(m, ids, seed=4, generation_config=cfg, max_denoising_steps=2, t_min=None)
    assert all((s == 2).all() for s in b2.steps_per_canvas)
    assert not torch.equal(a.sequences, a2.sequences)
    # a max_length in the passed config (max_new_tokens unset: the file's L+3 decides, max_length still cuts)
    both(m, ids, seed=4, generation_config=DiffusionGemmaGenerationConfig(max_length=ids.shape[1] + 1))


def test_generation_config_dict_and_our_own(with_file):
    """A plain dict (our knob names or the reference's) and a GenerationConfig give the reference's tokens."""
    m = with_file
    ids = batch3(m)
    ref_cfg = DiffusionGemmaGenerationConfig(max_new_tokens=m.L, max_denoising_steps=3, t_min=0.1,
                                             sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.5))
    a = run_reference(m.ref, ids, seed=9, generation_config=ref_cfg)
    ours = {"max_new_tokens": m.L, "max_denoising_steps": 3, "t_min": 0.1}
    for cfg in ({**ours, "entropy_bound": 0.5},
                {**ours, "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.5}},
                dataclasses.replace(m.eng.generation_config, **ours, entropy_bound=0.5)):
        assert_same(a, run_ours(m.eng, ids, seed=9, generation_config=cfg), m.L, f"generation_config={cfg}")
    with pytest.raises(ConfigError, match="unknown generation setting 'max_new_token'"):
        m.eng.generate(ids, generation_config={"max_new_token": 5})
    with pytest.raises(ConfigError, match="generation_config must be"):
        m.eng.generate(ids, generation_config=5)


def test_sampler_config_keyword(models):
    m = models("wide")
    ids = batch3(m)
    both(m, ids, seed=2, max_new_tokens=m.L, max_denoising_steps=6, entropy_bound=0.7)  # hf_kwargs: sampler_config
    a = run_reference(m.ref, ids, seed=2, max_new_tokens=m.L, max_denoising_steps=6, entropy_bound=0.7)
    b = run_ours(m.eng, ids, seed=2, max_new_tokens=m.L, max_denoising_steps=6,
                 sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.7))
    assert_same(a, b, m.L, "sampler_config=")
    with pytest.raises(ValueError, match="sampler_config or entropy_bound, not both"):
        m.eng.generate(ids, entropy_bound=0.2, sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.7))
    with pytest.raises(ValueError, match="unsupported sampler_config"):
        m.eng.generate(ids, sampler_config={"_cls_name": "TopKSamplerConfig", "k": 3})


# --------------------------------------------------------------------------------------------------------------
# other reference arguments
# --------------------------------------------------------------------------------------------------------------
def test_inert_reference_options_are_accepted_and_change_nothing(models):
    m = models("tiny")
    ids = batch3(m)
    inert = dict(cache_implementation="dynamic", disable_compile=True, bos_token_id=2)
    a = run_reference(m.ref, ids, seed=5, max_new_tokens=m.L, max_denoising_steps=3, **inert)
    b = run_ours(m.eng, ids, seed=5, max_new_tokens=m.L, max_denoising_steps=3, **inert)
    assert_same(a, b, m.L, "inert options")
    out = m.eng.generate(ids, max_new_tokens=m.L, max_denoising_steps=1, return_dict_in_generate=True)
    assert out.sequences.shape == (3, ids.shape[1] + m.L)


@pytest.mark.parametrize("knob", [{"temperature": 0.7}, {"top_k": 5}, {"do_sample": True}, {"past_key_values": None}])
def test_ar_knobs_are_a_clear_error(models, knob):
    """The reference forwards these to its model, where they do nothing; a silently lost setting misleads."""
    m = models("tiny")
    with pytest.raises(TypeError, match=rf"does not take {next(iter(knob))}\b.*silently ignores"):
        m.eng.generate(batch3(m), **knob)


def test_an_unknown_option_lists_generates_own_options_too(models):
    """A typo of one of dgemma's own options (settle_after, accept, sampling, ...) was answered with a list of the
    reference's knobs alone, which lacked the option meant."""
    m = models("tiny")
    with pytest.raises(TypeError, match=r"does not take settle_afer\b.*Its options: .*\bsettle_after\b") as e:
        m.eng.generate(batch3(m), settle_afer=2)
    for name in ("max_new_tokens", "sampler_config", "accept", "sampling", "generator", "attention_mask", "streamer"):
        assert f" {name}," in str(e.value) or str(e.value).endswith(f" {name}"), name


# --------------------------------------------------------------------------------------------------------------
# streamer: the same put / put_draft / end calls as the reference's
# --------------------------------------------------------------------------------------------------------------
class Recorder:
    """Records every streamer call and its tensor; `drafts=False` has no put_draft, like a TextStreamer."""

    def __init__(self, drafts: bool = True, takes_logits: bool = False):
        self.calls: list[tuple] = []
        self._takes_logits = takes_logits
        if drafts:
            self.put_draft = self._put_draft

    def put(self, value):
        self.calls.append(("put", value))  # kept as given: a streamer need not copy

    def _put_draft(self, value=None, logits=None):
        self.calls.append(("draft", value if logits is None else logits))

    def end(self):
        self.calls.append(("end", None))


def assert_same_calls(ref: Recorder, ours: Recorder, exact: bool = True):
    assert [c[0] for c in ours.calls] == [c[0] for c in ref.calls]
    for i, ((kind, x), (_, y)) in enumerate(zip(ref.calls, ours.calls)):
        if x is None:
            continue
        assert x.shape == y.shape and x.dtype == y.dtype and x.device.type == "cpu", f"call {i} ({kind})"
        assert torch.equal(x, y) if exact else torch.allclose(x, y, atol=1e-5), f"call {i} ({kind}) differs"


@pytest.mark.parametrize("kind", ["drafts", "no_put_draft", "takes_logits"])
def test_streamer_calls_match_reference(models, kind):
    """The confident model with stop ids: rows stop at different steps and canvases, pad fills finished rows."""
    m = models("confident")
    _, text2, chat = prompts(m)
    ids = batch3(m)
    knobs = dict(max_new_tokens=2 * m.L, max_denoising_steps=12, eos_token_id=[1, 106, 50], pad_token_id=0)
    make = {"drafts": Recorder, "no_put_draft": lambda: Recorder(drafts=False),
            "takes_logits": lambda: Recorder(takes_logits=True)}[kind]
    ref, ours = make(), make()
    a = run_reference(m.ref, ids, seed=3, streamer=ref, **knobs)
    b = run_ours(m.eng, ids, seed=3, streamer=ours, **knobs)
    assert_same(a, b, m.L, "with a streamer")
    assert_same_calls(ref, ours)
    steps = sum(int(s.max()) for s in b.steps_per_canvas)
    assert len(ours.calls) == 1 + (steps if kind != "no_put_draft" else 0) + len(b.steps_per_canvas) + 1
    # and batch 1, the reference TextDiffusionStreamer's case
    ref, ours = make(), make()
    one = torch.tensor([chat])
    run_reference(m.ref, one, seed=8, streamer=ref, **knobs)
    run_ours(m.eng, one, seed=8, streamer=ours, **knobs)
    assert_same_calls(ref, ours)


def test_streamer_logits_in_bfloat16_match_reference(models):
    """A bf16 model: the reference hands put_draft its self-conditioning logits in the weights' dtype."""
    m = models("confident")
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(m.path, dtype=torch.bfloat16).eval()
    eng = dgemma.load(m.path, dtype=torch.bfloat16, quiet=True)
    ids = batch3(m)
    a_calls, b_calls = Recorder(takes_logits=True), Recorder(takes_logits=True)
    a = run_reference(ref, ids, seed=3, streamer=a_calls, max_new_tokens=2 * m.L, max_denoising_steps=6)
    b = run_ours(eng, ids, seed=3, streamer=b_calls, max_new_tokens=2 * m.L, max_denoising_steps=6)
    assert_same(a, b, m.L, "bf16 with a streamer")
    assert_same_calls(a_calls, b_calls)
    assert b_calls.calls[1][1].dtype == torch.bfloat16


def test_max_length_from_generation_config_json(models, tmp_path):
    """A checkpoint whose generation_config.json sets max_length (max_new_tokens unset: the global 256)."""
    m = models("tiny")
    ids = batch3(m)
    shutil.copytree(m.path, tmp_path, dirs_exist_ok=True)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    gen.update(max_length=ids.shape[1] + m.L + 1, max_denoising_steps=2)
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    loaded = Model("tiny+max_length", tmp_path, DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path).eval(),
                   dgemma.load(tmp_path, quiet=True), m.tok)
    a, b = both(loaded, ids, seed=1)
    assert b.sequences.shape[1] == ids.shape[1] + 2 * m.L
    both(loaded, ids, seed=1, max_new_tokens=3 * m.L)  # max_new_tokens decides the count, max_length still cuts
