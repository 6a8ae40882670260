"""LoRA adapters (train/lora.py): unchanged output at init, only adapters train, exact merge back to a plain module,
experts adapters through the grouped dispatch and the reference loop, adapter-only save/load, clear errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as Fn

from dgemma.config import ModelConfig
from dgemma.engine.cache import KVCache
from dgemma.model import DiffusionGemma, load_module
from dgemma.model.saving import save_checkpoint
from dgemma.train.lora import (apply_lora, load_adapter, load_lora_state_dict, lora_config, lora_state_dict,
                               merge_lora, save_adapter)

from conftest import randomise

S, F = "sliding_attention", "full_attention"
ALL = ("attention", "mlp", "self_conditioning", "experts")


def tiny_model(seed: int = 0) -> DiffusionGemma:
    """Random 2-layer model. Norm weights, scales and layer scalars ~ U(0.5, 1.0): random enough to catch a wrong
    scale, mild enough that fp32 rounding (amplified by the unscaled q·k scores) stays well under 1e-5."""
    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                      top_k_experts=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      global_head_dim=16, num_global_key_value_heads=1, layer_types=(S, F), sliding_window=8,
                      canvas_length=8, max_position_embeddings=256)
    model = DiffusionGemma(cfg)
    randomise(model, seed, low=0.5, span=0.5)
    return model


TOKENS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
CANVAS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))


def outputs(model, with_soft=True):
    """(encoder hidden [B,T,D], AR logits, decoder logits [B,L,V]) with a self-conditioning signal on the canvas."""
    cache = KVCache(model.config, TOKENS.shape[0])
    hidden = model.encode(TOKENS, cache, return_hidden=True)
    sc = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(3)) if with_soft else None
    soft = None if sc is None else model.soft_embedding(sc)
    return hidden, model.logits(hidden), model.denoise(CANVAS, cache, soft=soft)


def loss_of(model):
    hidden, ar_logits, dec_logits = outputs(model)
    ar = Fn.cross_entropy(ar_logits[:, :-1].reshape(-1, 256), TOKENS[:, 1:].reshape(-1))
    return ar + Fn.cross_entropy(dec_logits.reshape(-1, 256), CANVAS.reshape(-1))


def randomise_adapters(model, seed=4, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_state_dict(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_init_is_bit_identical_and_keys_are_kept():
    model = tiny_model()
    before = outputs(model)
    fresh_keys = set(model.state_dict())
    names = apply_lora(model, rank=4, alpha=8, targets=ALL, generator=torch.Generator().manual_seed(0))
    for a, b in zip(before, outputs(model)):
        assert torch.equal(a, b)
    keys = set(model.state_dict())
    assert fresh_keys <= keys and all(".lora_" in k or "_lora_" in k for k in keys - fresh_keys)
    assert set(names) == keys - fresh_keys == set(lora_state_dict(model))
    # sliding layer: q,k,v,o; full layer (no v_proj): q,k,o; 2 layers x mlp 3; self-cond 3; 2 experts modules x 2
    assert len(names) == 2 * (4 + 3) + 2 * 2 * 3 + 2 * 3 + 2 * 4
    assert "layers.1.self_attn.v_proj.lora_A" not in names and "layers.0.self_attn.v_proj.lora_A" in names
    assert model.state_dict()["layers.0.experts.gate_up_proj_lora_A"].shape == (4, 4, 32)
    assert model.state_dict()["layers.0.experts.down_proj_lora_B"].shape == (4, 32, 4)
    assert lora_config(model).targets == ALL and lora_config(model).rank == 4


def test_training_changes_only_adapters_and_merge_is_exact(tmp_path):
    model = tiny_model()
    base = copy.deepcopy(model.state_dict())
    fresh_keys = list(model.state_dict())
    names = apply_lora(model, rank=4, alpha=8, targets=ALL, generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    for key, value in base.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p.grad is None for n, p in params.items() if n not in names)
    assert all(params[n].abs().sum() > 0 for n in names if "lora_B" in n), "every B got a gradient"

    adapted = outputs(model)
    merged = merge_lora(copy.deepcopy(model))
    assert list(merged.state_dict()) == fresh_keys
    assert type(merged.layers[0].self_attn.q_proj) is torch.nn.Linear
    for a, b, in zip(adapted, outputs(merged)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert (outputs(merged)[2] - outputs(tiny_model())[2]).abs().max() > 1e-2, "the adapters had no effect"

    # the merged module exports with the ordinary saver and loads back as a plain model
    save_checkpoint(merged, tmp_path / "merged")
    reloaded = load_module(tmp_path / "merged", quiet=True)
    for a, b in zip(adapted, outputs(reloaded)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_experts_adapters_grouped_dispatch_equals_reference_loop():
    model = tiny_model()
    apply_lora(model, rank=3, alpha=3, targets=("experts",), generator=torch.Generator().manual_seed(0))
    randomise_adapters(model)
    reference = copy.deepcopy(model)
    for layer in reference.layers:
        layer.use_reference_moe = True
    grouped_out, reference_out = outputs(model), outputs(reference)
    for a, b in zip(grouped_out, reference_out):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # gradients agree too
    loss_of(model).backward()
    loss_of(reference).backward()
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)
    # and merging the experts adapters is exact through both paths
    merged = merge_lora(copy.deepcopy(model))
    for a, b in zip(grouped_out, outputs(merged)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_adapter_state_roundtrip(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=2, alpha=4, targets=("attention", "self_conditioning"))
    randomise_adapters(model)
    expected = outputs(model)
    save_adapter(model, tmp_path / "adapter", base_model="tiny test model")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter.safetensors", "adapter_config.json"}

    other = tiny_model()  # same base weights, fresh adapters
    load_adapter(other, tmp_path / "adapter")
    assert lora_config(other) == lora_config(model)
    for a, b in zip(expected, outputs(other)):
        assert torch.equal(a, b)

    third = tiny_model()
    apply_lora(third, rank=2, alpha=4, targets=("attention", "self_conditioning"))
    load_lora_state_dict(third, {k: v.clone() for k, v in lora_state_dict(model).items()})
    assert torch.equal(outputs(third)[2], expected[2])
    wrong = tiny_model()
    apply_lora(wrong, rank=3, alpha=4, targets=("attention", "self_conditioning"))
    with pytest.raises(ValueError, match="rank"):
        load_lora_state_dict(wrong, lora_state_dict(model))
    wrong = tiny_model()
    apply_lora(wrong, rank=2, alpha=4, targets=("attention",))
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state_dict(wrong, lora_state_dict(model))


def test_merge_is_exact_per_module_in_fp64():
    """The fold itself, without the model's fp32 norms around it: merged module == adapted module to fp64 rounding."""
    model = tiny_model().double()
    apply_lora(model, rank=3, alpha=5, targets=ALL, dtype=torch.float64)
    randomise_adapters(model)
    x = torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w, ids = torch.rand(6, 2, dtype=torch.float64) + 0.1, torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    q, experts = model.layers[1].self_attn.q_proj, model.layers[0].experts
    before = q(x), experts(x, w, ids), experts.forward_reference(x, w, ids)
    merge_lora(model)
    q, experts = model.layers[1].self_attn.q_proj, model.layers[0].experts
    after = q(x), experts(x, w, ids), experts.forward_reference(x, w, ids)
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert (before[1] - after[2]).abs().max() < 1e-12


def test_bf16_merge_is_one_rounding_of_the_fp32_sum():
    model = tiny_model().to(torch.bfloat16)
    apply_lora(model, rank=4, alpha=16, targets=("mlp", "experts"))
    randomise_adapters(model, std=0.05)
    q = model.layers[0].mlp.up_proj
    w_gu = model.layers[1].experts.gate_up_proj
    e = model.layers[1].experts
    want = (q.weight.float() + 4.0 * q.lora_B @ q.lora_A).to(torch.bfloat16)
    want_gu = (w_gu.float() + 4.0 * torch.bmm(e.gate_up_proj_lora_B, e.gate_up_proj_lora_A)).to(torch.bfloat16)
    merge_lora(model)
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.layers[0].mlp.up_proj.weight, want)
    assert torch.equal(model.layers[1].experts.gate_up_proj, want_gu)


def test_dropout_only_in_training_mode():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, targets=("attention", "mlp"), dropout=0.5)
    randomise_adapters(model)
    model.eval()
    assert torch.equal(outputs(model)[0], outputs(model)[0])
    model.train()
    assert not torch.equal(outputs(model)[0], outputs(model)[0])


def test_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(model, targets=("attention", "router"))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, rank=0)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, rank=2.5)
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(model, alpha=0)
    with pytest.raises(ValueError, match="LoRA alpha must be a finite number"):  # inf * (B = 0) would be NaN
        apply_lora(model, alpha=float("inf"))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)
    other = tiny_model()
    other.layers[1].mlp.up_proj = type("QuantLinear", (torch.nn.Linear,), {})(32, 48, bias=False)
    with pytest.raises(TypeError, match="QuantLinear"):
        apply_lora(other, targets=("attention", "mlp"))
    assert type(other.layers[0].self_attn.q_proj) is torch.nn.Linear, "a refused call must not wrap anything"
    assert all(p.requires_grad for p in model.parameters()), "a refused call must not freeze the model"
    apply_lora(model, targets="mlp")
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


def test_saved_weights_get_the_umask_permissions(tmp_path):
    """safetensors 0.8 writes 0600 files: an exported model that a server account could not read."""
    model = tiny_model()
    apply_lora(model, rank=2, targets=("attention",))
    old = os.umask(0o027)
    try:
        save_adapter(model, tmp_path / "adapter")
        save_checkpoint(merge_lora(model), tmp_path / "model")
    finally:
        os.umask(old)
    for path in (tmp_path / "adapter" / "adapter.safetensors", tmp_path / "model" / "model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o640, path
