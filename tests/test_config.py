"""ModelConfig: both config.json spellings, the layer-type rules of spec §2.2, and clear errors for bad files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, F, S, make_config
from dgemma import ConfigError, ModelConfig


def text(**changes):
    """The tiny config with text_config changes (None deletes a key)."""
    return make_config({"text_config": changes})


def error_for(raw) -> str:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(raw, source="cfg.json")
    return str(info.value)


def test_tiny_config_geometry():
    cfg = ModelConfig.from_dict(copy.deepcopy(TINY_CONFIG))
    assert cfg.layer_types == (S, F, S, F)
    assert [cfg.head_dim_of(i) for i in range(4)] == [16, 32, 16, 32]
    assert [cfg.num_kv_heads_of(i) for i in range(4)] == [2, 1, 2, 1]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size) == (512, 64, 96, 32)
    assert (cfg.num_experts, cfg.top_k_experts, cfg.sliding_window, cfg.canvas_length) == (4, 2, 8, 16)
    assert cfg.eos_token_id == (1, 106)  # the top-level list wins over text_config's single id
    assert cfg.final_logit_softcapping == 30.0 and cfg.partial_rotary_factor == 0.25
    assert (cfg.rope_theta_sliding, cfg.rope_theta_full) == (10000.0, 1000000.0)


def test_null_softcap_turns_soft_capping_off_and_survives_a_save(tmp_path):
    """`final_logit_softcapping: null` is no soft-cap (it was read as the default 30, silently capping logits the
    checkpoint's authors left raw); a missing field is still 30. The head then returns the raw product, which the
    capped model's logits are 30 tanh(. / 30) of, and a saved model keeps the null."""
    import torch

    from dgemma.model import DiffusionGemma
    from dgemma.model.saving import save_checkpoint

    raw = make_config()
    raw["text_config"]["final_logit_softcapping"] = None
    cfg = ModelConfig.from_dict(raw)
    assert cfg.final_logit_softcapping is None
    assert ModelConfig.from_dict(text(final_logit_softcapping=None)).final_logit_softcapping == 30.0  # deleted
    raw_model, capped = DiffusionGemma(cfg), DiffusionGemma(ModelConfig.from_dict(make_config()))
    torch.manual_seed(0)
    torch.nn.init.normal_(raw_model.embed_tokens.weight, std=8.0)
    capped.load_state_dict(raw_model.state_dict())
    normed = torch.randn(1, 4, cfg.hidden_size)
    with torch.no_grad():
        plain, cap = raw_model.head(normed), capped.head(normed)
    assert plain.abs().max() > 60  # past the cap: the two must differ
    torch.testing.assert_close(plain, normed @ raw_model.embed_tokens.weight.t())
    torch.testing.assert_close(cap, 30.0 * torch.tanh(plain / 30.0))
    save_checkpoint(raw_model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert ModelConfig.from_dict(saved).final_logit_softcapping is None


@pytest.mark.parametrize("overrides", [
    {},
    {"text_config": {"num_global_key_value_heads": None}},  # omitted: full layers use num_key_value_heads
    {"text_config": {"num_hidden_layers": 7, "layer_types": None, "global_head_dim": 8}},
], ids=["tiny", "no-global-kv", "default-pattern"])
def test_both_spellings_give_the_same_config(tmp_path, overrides):
    """The released checkpoint's global_head_dim / num_global_key_value_heads keys and the per_layer_config
    dict that transformers' save_pretrained writes for the same model parse to equal ModelConfigs."""
    from transformers import DiffusionGemmaConfig

    raw = make_config(overrides)
    DiffusionGemmaConfig.from_dict(copy.deepcopy(raw)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "per_layer_config" in saved["text_config"] and "global_head_dim" not in saved["text_config"]
    a, b = ModelConfig.from_dict(raw), ModelConfig.from_file(tmp_path)
    assert a == b
    ref_text = DiffusionGemmaConfig.from_dict(copy.deepcopy(raw)).get_text_config()
    assert list(b.layer_types) == list(ref_text.layer_types)
    for i in range(b.num_hidden_layers):
        layer = ref_text.per_layer_config[i]
        assert (b.head_dim_of(i), b.num_kv_heads_of(i)) == (layer.head_dim, layer.num_key_value_heads), f"layer {i}"


def test_global_kv_heads_default_to_sliding_count():
    cfg = ModelConfig.from_dict(text(num_global_key_value_heads=None))
    assert cfg.num_global_key_value_heads == cfg.num_key_value_heads == 2
    assert cfg.num_kv_heads_of(1) == 2 and cfg.head_dim_of(1) == 32


def test_default_layer_types_every_sixth_full_and_last_forced():
    cfg = ModelConfig.from_dict(text(num_hidden_layers=14, layer_types=None))
    full = [i for i, t in enumerate(cfg.layer_types) if t == F]
    assert full == [5, 11, 13]  # every 6th layer, plus the last one forced to full
    cfg = ModelConfig.from_dict(text(num_hidden_layers=12, layer_types=None))
    assert [i for i, t in enumerate(cfg.layer_types) if t == F] == [5, 11]


def test_explicit_last_sliding_layer_is_forced_full():
    cfg = ModelConfig.from_dict(text(layer_types=[S, F, S, S]))
    assert cfg.layer_types == (S, F, S, F)
    assert cfg.head_dim_of(3) == 32 and cfg.num_kv_heads_of(3) == 1


def test_bare_text_config_parses():
    raw = copy.deepcopy(TINY_CONFIG["text_config"])
    raw["canvas_length"] = 32
    cfg = ModelConfig.from_dict(raw)
    assert cfg.canvas_length == 32 and cfg.layer_types == (S, F, S, F) and cfg.eos_token_id == (1,)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", -64), ("vocab_size", 0), ("num_experts", -1), ("sliding_window", 0), ("head_dim", -16),
    ("intermediate_size", 0), ("num_hidden_layers", 0),
])
def test_non_positive_sizes_are_rejected(field, value):
    msg = error_for(text(**{field: value}))
    assert field in msg and str(value) in msg


@pytest.mark.parametrize("field,value", [
    ("rms_norm_eps", "1e-6"), ("rms_norm_eps", 0), ("rope_parameters", [10000.0]),
    ("rope_parameters", {F: {"rope_type": "proportional", "partial_rotary_factor": "0.25"}}),
    ("rope_parameters", {S: {"rope_type": "default", "rope_theta": -1.0}}), ("per_layer_config", {"01": 512}),
    ("per_layer_config", [512]), ("layer_types", F), ("final_logit_softcapping", "30"),
    ("max_position_embeddings", -1), ("pad_token_id", -1), ("bos_token_id", "<bos>"),
], ids=lambda v: str(v)[:20])
def test_values_of_the_wrong_kind_are_config_errors_naming_the_file_and_field(field, value):
    """Each was a bare ValueError / AttributeError without the file's name, or was accepted and failed later."""
    msg = error_for(text(**{field: value}))
    assert msg.startswith("cfg.json: ") and (field in msg or "rope_theta" in msg or "partial_rotary" in msg), msg


@pytest.mark.parametrize("eos,expected", [(None, (1,)), ("1", None), ([1, 1.5], None)])
def test_top_level_eos_token_id(eos, expected):
    """null falls back to text_config's ids (it was a TypeError); ids that are not integers are refused."""
    raw = copy.deepcopy(TINY_CONFIG)
    raw["eos_token_id"] = eos
    if expected is None:
        assert "eos_token_id" in error_for(raw)
    else:
        assert ModelConfig.from_dict(raw).eos_token_id == expected


def test_top_k_above_num_experts():
    msg = error_for(text(top_k_experts=5))
    assert "top_k_experts" in msg and "num_experts" in msg


@pytest.mark.parametrize("field,heads", [("num_key_value_heads", 3), ("num_global_key_value_heads", 3)])
def test_heads_not_divisible(field, heads):
    msg = error_for(text(**{field: heads}))
    assert field in msg and "num_attention_heads" in msg


def test_unknown_layer_type():
    msg = error_for(text(layer_types=[S, "chunked_attention", S, F]))
    assert "layer_types" in msg and "chunked_attention" in msg


def test_wrong_length_layer_types():
    msg = error_for(text(layer_types=[S, F, F]))
    assert "layer_types" in msg and "num_hidden_layers" in msg


@pytest.mark.parametrize("field", ["moe_intermediate_size", "num_experts", "top_k_experts"])
def test_missing_moe_fields(field):
    msg = error_for(text(**{field: None}))
    assert field in msg and "cfg.json" in msg


@pytest.mark.parametrize("model_type", ["gemma3", None])
def test_unknown_model_type(model_type):
    raw = make_config({"model_type": model_type})
    msg = error_for(raw)
    assert "model_type" in msg and repr(model_type) in msg and "cfg.json" in msg


def test_non_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "diffusion_gemma", "text_config": {')
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_file(tmp_path)
    assert str(path) in str(info.value) and "JSON" in str(info.value)


def test_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_file(tmp_path / "config.json")
    assert "config.json" in str(info.value) and "object" in str(info.value)


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_file(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_config_is_frozen():
    cfg = ModelConfig.from_dict(copy.deepcopy(TINY_CONFIG))
    with pytest.raises(AttributeError):
        cfg.hidden_size = 32


# The released 26B-A4B text configuration (shared/bench-configs/26b-a4b.json, values from spec §2.2),
# inlined so the test runs from a bare checkout. Parsing only: never instantiate it.
CONFIG_26B = {
    "model_type": "diffusion_gemma", "canvas_length": 256, "image_token_id": 258880, "boi_token_id": 255999,
    "eoi_token_id": 258882, "tie_word_embeddings": True,
    "text_config": {
        "model_type": "diffusion_gemma_text", "vocab_size": 262144, "hidden_size": 2816, "intermediate_size": 2112,
        "moe_intermediate_size": 704, "num_experts": 128, "top_k_experts": 8, "num_hidden_layers": 30,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
        "num_global_key_value_heads": 2, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-06, "pad_token_id": 0, "eos_token_id": [1, 106],
        "bos_token_id": 2, "tie_word_embeddings": True, "sliding_window": 1024,
        "layer_types": [F if (i + 1) % 6 == 0 else S for i in range(30)],
        "final_logit_softcapping": 30.0, "use_bidirectional_attention": "vision", "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_parameters": {S: {"rope_type": "default", "rope_theta": 10000.0},
                            F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}},
    },
}
SHARED_26B = Path("/work/shared/bench-configs/26b-a4b.json")


def check_26b(cfg: ModelConfig):
    assert cfg.num_hidden_layers == 30
    assert [i for i, t in enumerate(cfg.layer_types) if t == F] == [5, 11, 17, 23, 29]
    assert (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.moe_intermediate_size) == \
        (2816, 262144, 2112, 704)
    assert (cfg.num_experts, cfg.top_k_experts, cfg.num_attention_heads) == (128, 8, 16)
    assert (cfg.head_dim_of(0), cfg.num_kv_heads_of(0)) == (256, 8)
    assert (cfg.head_dim_of(5), cfg.num_kv_heads_of(5)) == (512, 2)
    assert (cfg.sliding_window, cfg.canvas_length) == (1024, 256)
    assert cfg.eos_token_id == (1, 106)
    assert cfg.embed_scale == pytest.approx(53.0660, abs=1e-4)
    # spec §2.5: q 2816->4096 / 8192, k 2816->2048 / 1024 on sliding / full layers
    assert cfg.num_attention_heads * cfg.head_dim_of(0) == 4096 and cfg.num_attention_heads * cfg.head_dim_of(5) == 8192
    assert cfg.num_kv_heads_of(0) * cfg.head_dim_of(0) == 2048 and cfg.num_kv_heads_of(5) * cfg.head_dim_of(5) == 1024


def test_26b_config_parses_with_expected_geometry(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_26B))
    cfg = ModelConfig.from_file(tmp_path)
    check_26b(cfg)
    if SHARED_26B.exists():  # the project's copy of the same file, when the shared folder is mounted
        assert ModelConfig.from_file(SHARED_26B) == cfg
