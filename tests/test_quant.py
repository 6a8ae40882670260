"""Quantization schemes and modules: error bounds, packing, fast paths against the dequantize-then-matmul
reference (STYLE habit 9), and quantized checkpoints through `dgemma.load` (they load and generate)."""

from __future__ import annotations

import copy

import pytest
import torch

import dgemma
from dgemma.engine.cache import KVCache
from dgemma.model import CheckpointError, load_module
from dgemma.quant import kernels
from dgemma.quant.convert import quantize_checkpoint
from dgemma.quant.modules import QuantExperts, QuantLinear, is_quantized, quantize_module, set_kernel
from dgemma.quant.schemes import (QuantError, dequantize_int4, dequantize_int8, pack_int4, quantize_int4,
                                  quantize_int8, unpack_int4)


def weights(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 0.1  # rows of varied scale
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_error_within_half_a_step_per_row(dtype):
    w = weights((3, 24, 40), 0, dtype)
    w[1, 5] = 0  # an all-zero row stays exactly zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (3, 24)
    err = (dequantize_int8(q, scale) - w.float()).abs()
    assert (err <= scale[..., None] * 0.5 * (1 + 1e-5) + 1e-12).all()
    assert q.abs().max() == 127 and (err[1, 5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_error_within_half_a_step_per_group(dtype):
    G = 16
    w = weights((2, 12, 64), 1, dtype)
    w[0, 3, :G] = 0.25  # a constant group is reproduced exactly
    packed, scale, zero = quantize_int4(w, G)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 12, 32) and scale.shape == (2, 12, 4)
    assert scale.dtype == (torch.float32 if dtype == torch.float32 else dtype)  # 16-bit scales for 16-bit weights
    err = (dequantize_int4(packed, scale, zero) - w.float()).abs().view(2, 12, 4, G)
    step = scale.float()[..., None]
    # q is fitted to the rounded scale/zero, so the bound holds up to their rounding at the group's ends
    slack = 0 if dtype == torch.float32 else 9 * 2 ** -8 * w.float().abs().view(2, 12, 4, G).amax(-1, keepdim=True)
    assert (err <= 0.5 * step * (1 + 1e-5) + slack + 1e-12).all()
    assert (err[0, 3, 0] == 0).all()
    assert float(err.max()) > 0.3 * float(step.max())  # the bound is not vacuous


def test_int4_packing_two_per_byte():
    q = torch.randint(0, 16, (5, 8), generator=torch.Generator().manual_seed(2))
    packed = pack_int4(q)
    assert packed.shape == (5, 4) and torch.equal(unpack_int4(packed), q.to(torch.uint8))
    assert int(packed[0, 0]) == int(q[0, 0]) | int(q[0, 1]) << 4  # even input in the low nibble


def test_bad_group_size_is_a_clear_error():
    with pytest.raises(QuantError, match="not a multiple of the int4 group size 64"):
        quantize_int4(weights((4, 96), 0), 64)


def test_quantized_names_cover_linears_and_experts_only():
    assert is_quantized("layers.3.self_attn.q_proj.weight") and is_quantized("layers.0.experts.down_proj")
    assert is_quantized("self_conditioning.up_proj.weight") and is_quantized("layers.1.mlp.gate_proj.weight")
    for kept in ("embed_tokens.weight", "layers.0.router.proj.weight", "layers.0.input_layernorm.weight",
                 "layers.0.experts.per_expert_scale", "self_conditioning.pre_norm.weight"):
        assert not is_quantized(kept)


def quant_linear(scheme, N, K, seed, dtype=torch.float32):
    w = weights((N, K), seed)
    layer = QuantLinear(K, N, scheme, 32 if scheme == "int4" else None,
                        dtype if scheme == "int4" and dtype != torch.float32 else torch.float32)
    from dgemma.quant.schemes import quantize_weight
    for suffix, t in quantize_weight(w.to(dtype), scheme, layer.group_size).items():
        getattr(layer, "weight" + suffix).copy_(t)
    return layer


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fast_path_equals_reference_fp32_chunked(scheme, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_ELEMS", 64 * 5)  # force several output-row chunks
    layer = quant_linear(scheme, 48, 64, 3)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    fast = layer(x)
    set_kernel(layer, "reference")
    ref = layer(x)
    independent = x @ layer.stored("weight").dequantize(torch.float32).t()
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(ref, independent)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cpu_kernels_agree_with_reference_in_bf16(scheme):
    layer = quant_linear(scheme, 64, 128, 5, torch.bfloat16)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(6)).bfloat16()
    set_kernel(layer, "reference")
    ref = layer(x).float()
    set_kernel(layer, "fast")
    fast = layer(x).float()
    assert kernels.fast_kernel(scheme, x.device, x.dtype) == f"{scheme}-cpu"
    if scheme == "int4":
        assert layer.converted == {"weight": "int4-cpu"} and not hasattr(layer, "weight_zero")  # one copy kept
        with pytest.raises(QuantError, match="repacked"):
            set_kernel(layer, "reference") or layer(x)
    torch.testing.assert_close(fast, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.float32), ("int4", torch.float32), ("int4", torch.bfloat16)])
def test_quantized_experts_grouped_fast_equals_per_token_reference(scheme, dtype):
    from dgemma.model.moe import Experts
    E, D, I, N, K = 4, 64, 32, 10, 2
    g = torch.Generator().manual_seed(7)
    model, layer = torch.nn.Module(), torch.nn.Module()
    layer.experts = Experts(E, D, I)
    model.layers = torch.nn.ModuleList([layer])  # the names QUANTIZED matches: layers.N.experts.*
    with torch.no_grad():
        layer.experts.gate_up_proj.copy_(torch.randn(E, 2 * I, D, generator=g) * D ** -0.5)
        layer.experts.down_proj.copy_(torch.randn(E, D, I, generator=g) * I ** -0.5)
    model.embed_tokens = torch.nn.Embedding(2, D)  # quantize_module reads the model dtype from here
    model = model.to(dtype).requires_grad_(False)
    q = quantize_module(copy.deepcopy(model), scheme, 32)
    assert isinstance(q.layers[0].experts, QuantExperts)
    x = torch.randn(N, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g) + 0.1
    ref_q = copy.deepcopy(q)
    set_kernel(ref_q, "reference")
    reference = ref_q.layers[0].experts.forward_reference(x, w, ids).float()
    fast = q.layers[0].experts(x, w, ids).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, reference, rtol=tol, atol=tol * float(reference.abs().max()))
    float_out = model.layers[0].experts(x, w, ids).float()  # and the quantized experts approximate the float ones
    assert float((reference - float_out).abs().max()) < (0.05 if scheme == "int8" else 0.3) * float(
        float_out.abs().max())


@pytest.fixture(scope="module")
def quantized_dirs(reference_checkpoint, tmp_path_factory):
    _, src = reference_checkpoint({"text_config": {"intermediate_size": 128}})
    out = {}
    for scheme in ("int8", "int4"):
        out[scheme] = tmp_path_factory.mktemp("q") / scheme
        quantize_checkpoint(src, out[scheme], scheme, 32 if scheme == "int4" else None, log=None)
    return src, out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_checkpoint_loads_equal_to_in_memory_quantization_and_generates(quantized_dirs, scheme):
    src, dirs = quantized_dirs
    eng = dgemma.load(dirs[scheme])
    expected = quantize_module(load_module(src), scheme, 32 if scheme == "int4" else None)
    assert any(isinstance(m, QuantLinear) for m in eng.module.modules())
    tokens = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(8))
    logits = []
    for module in (eng.module, expected):
        cache = KVCache(module.config, 2)
        with torch.inference_mode():
            module.encode(tokens, cache)
            logits.append(module.denoise(tokens, cache))
    assert torch.equal(logits[0], logits[1])
    out = eng.generate(tokens[:, :5], max_new_tokens=16, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 5 + 16) and int(out.max()) < eng.config.vocab_size


def test_quantized_checkpoint_needs_the_quant_hook_and_matching_dtypes(quantized_dirs, tmp_path):
    _, dirs = quantized_dirs
    with pytest.raises(CheckpointError, match="a quantized checkpoint"):
        load_module(dirs["int4"])  # e.g. the trainer: it must not silently build float modules
    eng = dgemma.load(dirs["int8"], dtype="bfloat16")  # unquantized tensors follow dtype; int data and scales do not
    layer = eng.module.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert eng.module.embed_tokens.weight.dtype == torch.bfloat16
