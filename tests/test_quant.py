"""Quantization schemes and modules: error bounds, packing, fast paths against the dequantize-then-matmul
reference (STYLE habit 9), and quantized checkpoints through `dgemma.load` (they load and generate)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.engine.cache import KVCache
from dgemma.model import CheckpointError, load_module
from dgemma.quant import kernels
from dgemma.quant.convert import quantize_checkpoint
from dgemma.quant import modules
from dgemma.quant.modules import (QuantExperts, QuantLinear, is_quantized, metadata_entry, quantize_module,
                                  read_metadata, set_kernel)
from dgemma.quant.schemes import (FP8_DTYPE, QuantError, dequantize_fp8, dequantize_int4, dequantize_int8, pack_int4,
                                  quantize_fp8, quantize_int4, quantize_int8, quantize_weight, stored_layout,
                                  unpack_int4)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_error_within_three_mantissa_bits_per_row(dtype):
    w = weights((3, 24, 40), 10, dtype)
    w[1, 5] = 0  # an all-zero row stays exactly zero
    w[2, 7, 3] = 1e-6  # a subnormal in e4m3 units: the absolute term of the bound
    q, scale = quantize_fp8(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and scale.shape == (3, 24) and scale.dtype == torch.float32
    err = (dequantize_fp8(q, scale) - w.float()).abs()
    bound = 2 ** -4 * w.float().abs() + 2 ** -10 * scale[..., None]  # half a step: 3 mantissa bits; subnormals
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()
    assert float((err / bound.clamp_min(1e-30)).max()) > 0.5  # the bound is not vacuous
    assert (q.float().abs().amax(-1)[scale > 0] == 448).all() and (err[1, 5] == 0).all() and scale[1, 5] == 0


def test_fp8_rows_match_a_plain_per_row_reference():
    """quantize_fp8 is also the activation quantizer of the fp8 GEMMs: row by row, absmax / 448, round to nearest."""
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(11)).bfloat16()
    x[2] = 0
    q, scale = quantize_fp8(x)
    for r in range(x.shape[0]):
        row = x[r].float()
        s = float(row.abs().max()) / 448
        expected = (row / s if s else row).to(torch.float8_e4m3fn)
        assert float(scale[r]) == pytest.approx(s, rel=1e-7) and torch.equal(q[r].float(), expected.float())


def test_fp8_is_threaded_through_layout_and_metadata():
    layout = stored_layout("fp8", (3, 32, 64), None, torch.float32)
    assert layout == {"": ((3, 32, 64), FP8_DTYPE), "_scale": ((3, 32), torch.float32)}
    stored = quantize_weight(weights((3, 32, 64), 12, torch.bfloat16), "fp8", None)
    assert {k: (tuple(t.shape), t.dtype) for k, t in stored.items()} == layout
    record = read_metadata(metadata_entry("fp8", None, torch.float32))
    assert record == {"scheme": "fp8", "group_size": None, "scale_dtype": torch.float32}
    assert kernels.fast_kernel("fp8", torch.device("cpu"), torch.bfloat16) == "dequant"  # no fp8 GEMM on CPU


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
    for suffix, t in quantize_weight(w.to(dtype), scheme, layer.group_size).items():
        getattr(layer, "weight" + suffix).copy_(t)
    return layer


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
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


def tiny_experts_model(dtype, seed=7, E=4, D=64, I=32):
    """A module with one `layers.0.experts` (the names QUANTIZED matches) and the embedding quantize_module reads."""
    from dgemma.model.moe import Experts
    g = torch.Generator().manual_seed(seed)
    model, layer = torch.nn.Module(), torch.nn.Module()
    layer.experts = Experts(E, D, I)
    model.layers = torch.nn.ModuleList([layer])
    with torch.no_grad():
        layer.experts.gate_up_proj.copy_(torch.randn(E, 2 * I, D, generator=g) * D ** -0.5)
        layer.experts.down_proj.copy_(torch.randn(E, D, I, generator=g) * I ** -0.5)
    model.embed_tokens = torch.nn.Embedding(2, D)  # quantize_module reads the model dtype from here
    return model.to(dtype).requires_grad_(False)


def tiny_routing(N, E, K, D, dtype, seed=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    return x, torch.rand(N, K, generator=g) + 0.1, ids


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.float32), ("int4", torch.float32), ("int4", torch.bfloat16),
                                          ("fp8", torch.float32), ("fp8", torch.bfloat16)])
def test_quantized_experts_grouped_fast_equals_per_token_reference(scheme, dtype):
    E, D, N, K = 4, 64, 10, 2
    model = tiny_experts_model(dtype)
    q = quantize_module(copy.deepcopy(model), scheme, 32 if scheme == "int4" else None)
    assert isinstance(q.layers[0].experts, QuantExperts)
    x, w, ids = tiny_routing(N, E, K, D, dtype)
    ref_q = copy.deepcopy(q)
    set_kernel(ref_q, "reference")
    reference = ref_q.layers[0].experts.forward_reference(x, w, ids).float()
    fast = q.layers[0].experts(x, w, ids).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, reference, rtol=tol, atol=tol * float(reference.abs().max()))
    float_out = model.layers[0].experts(x, w, ids).float()  # and the quantized experts approximate the float ones
    assert float((reference - float_out).abs().max()) < {"int8": 0.05, "fp8": 0.12, "int4": 0.3}[scheme] * float(
        float_out.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_experts_equal_float_experts_on_the_dequantized_weights(dtype):
    """The reference path of fp8 experts is exactly Experts on dequantize(quantize(W)) (same routing)."""
    from dgemma.model.moe import Experts
    E, D, I, N, K = 6, 64, 32, 12, 3
    model = tiny_experts_model(dtype, seed=9, E=E, D=D, I=I)
    q = quantize_module(copy.deepcopy(model), "fp8").layers[0].experts
    set_kernel(q, "reference")
    plain = Experts(E, D, I).to(dtype).requires_grad_(False)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(plain, name).copy_(dequantize_fp8(getattr(q, name), getattr(q, name + "_scale"), dtype))
    x, w, ids = tiny_routing(N, E, K, D, dtype, seed=10)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q(x, w, ids), plain(x, w, ids), rtol=tol, atol=tol)
    torch.testing.assert_close(q.forward_reference(x, w, ids), plain.forward_reference(x, w, ids), rtol=tol, atol=tol)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_dequantized_grouped_gemm_equals_the_loop(scheme, monkeypatch):
    """The "dequant-grouped" path (CUDA's choice for int8, and for fp8 off Hopper) run on CPU: stacked weights
    dequantized, then torch._grouped_mm, against the per-expert loop."""
    E, D, N, K = 4, 64, 16, 2
    q = quantize_module(tiny_experts_model(torch.float32), scheme, 32 if scheme == "int4" else None).layers[0].experts
    x, w, ids = tiny_routing(N, E, K, D, torch.float32)
    assert q.kernel_kind(x) == "loop"  # what CPU picks by itself
    loop = q(x, w, ids)
    monkeypatch.setattr(modules, "experts_kernel", lambda *a: "dequant-grouped")
    assert q.kernel_kind(x) == "dequant-grouped"
    monkeypatch.setattr(QuantExperts, "forward_loop", lambda *a: pytest.fail("took the loop"))
    torch.testing.assert_close(q(x, w, ids), loop, rtol=1e-5, atol=1e-6)
    set_kernel(q, "reference")
    assert q.kernel_kind(x) == "loop"  # the reference kernel always loops, whatever experts_kernel says


def emulate_scaled_grouped_mm(a, b, scale_a, scale_b, offs):
    """torch._scaled_grouped_mm's math for 2D a x 3D b, in fp32 on CPU: row m of group g (rows offs[g-1]..offs[g])
    -> (a[m] * scale_a[m]) @ (b[g] * scale_b[g])."""
    out, start = torch.zeros(a.shape[0], b.shape[-1]), 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = (a[start:end].float() * scale_a[start:end, None]) @ (b[g].float() * scale_b[g][None, :])
        start = end
    return out


def test_fp8_grouped_arguments_meet_torch_conventions_and_compute_the_product():
    """The arguments handed to torch._scaled_grouped_mm / torch._scaled_mm: torch's own shape/stride/dtype checks
    (its meta kernels run on CPU), then the product they describe (emulated) against x @ dequantize(W)ᵀ per expert
    with x rounded the same way."""
    E, N, K, M = 5, 48, 64, 37
    g = torch.Generator().manual_seed(13)
    data, scale = quantize_fp8(torch.randn(E, N, K, generator=g) * 0.05)
    x = torch.randn(M, K, generator=g).bfloat16()
    offsets = torch.tensor([7, 7, 20, 30, M])  # expert 1 gets no rows
    args = kernels.fp8_grouped_args(x, data, scale, offsets)
    meta = [t.to("meta") for t in args]  # .to keeps strides
    out = torch._scaled_grouped_mm(*meta[:4], offs=meta[4], out_dtype=torch.bfloat16)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="contraction dimension"):  # the stored [E, N, K] layout as is: refused
        torch._scaled_grouped_mm(meta[0], data.to("meta"), *meta[2:4], offs=meta[4], out_dtype=torch.bfloat16)
    xq, xs = quantize_fp8(x)
    x_used = dequantize_fp8(xq, xs)
    expected, start = torch.zeros(M, N), 0
    for e, end in enumerate(offsets.tolist()):
        expected[start:end] = x_used[start:end] @ dequantize_fp8(data[e], scale[e]).t()
        start = end
    torch.testing.assert_close(emulate_scaled_grouped_mm(*args), expected, rtol=1e-5, atol=1e-5)
    a, b, sa, sb = kernels.fp8_linear_args(x, data[2], scale[2])
    assert torch._scaled_mm(*(t.to("meta") for t in (a, b, sa, sb)), out_dtype=torch.bfloat16).shape == (M, N)
    torch.testing.assert_close((a.float() * sa) @ (b.float() * sb), x_used @ dequantize_fp8(data[2], scale[2]).t(),
                               rtol=1e-5, atol=1e-5)
    assert kernels.fp8_fits((E, N, K)) and not kernels.fp8_fits((E, 40, K))


def test_quantize_module_releases_each_float_module_before_the_next(monkeypatch):
    """Module by module: when a stand-in is filled, every float module already swapped is gone (no second copy of
    the model is ever held), and the float weights end up unreferenced."""
    import gc
    import weakref
    from dgemma.config import ModelConfig
    from dgemma.model import DiffusionGemma
    from tests.conftest import make_config
    module = DiffusionGemma(ModelConfig.from_dict(make_config())).requires_grad_(False)
    targets = [weakref.ref(p) for n, p in module.named_parameters() if is_quantized(n)]
    gc.collect()
    alive, fill = [], modules._fill

    def counting_fill(new, old, scheme, group_size):
        alive.append(sum(r() is not None for r in targets))
        fill(new, old, scheme, group_size)

    monkeypatch.setattr(modules, "_fill", counting_fill)
    quantize_module(module, "fp8")
    assert alive[0] == len(targets) and all(b < a for a, b in zip(alive, alive[1:]))  # strictly shrinking
    assert all(r() is None for r in targets)


@pytest.mark.parametrize("scheme", ["fp8"])
def test_quantized_trained_model_logits_stay_close_and_it_generates(scheme):
    """fp8 on the bundled trained model (real weight statistics, unlike random ones): the decoder's argmax agrees
    with full precision on >= 97% of canvas positions and the mean KL per position stays small."""
    from dgemma.bundled import PACKAGED
    full = load_module(PACKAGED)
    quant = quantize_module(copy.deepcopy(full), scheme)
    assert isinstance(quant.layers[0].experts, QuantExperts) and quant.layers[0].experts.gate_up_proj.dtype == FP8_DTYPE
    L = full.config.canvas_length
    tokens = torch.randint(3, full.config.vocab_size, (2, L), generator=torch.Generator().manual_seed(8))
    logits = []
    for module in (full, quant):
        cache = KVCache(module.config, 2)
        with torch.inference_mode():
            module.encode(tokens, cache)
            logits.append(module.denoise(tokens, cache).float())
    agree = float((logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean())
    kl = torch.nn.functional.kl_div(logits[1].log_softmax(-1), logits[0].log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    assert agree >= 0.97 and float(kl) < 2e-3, (agree, float(kl))
    assert not torch.equal(logits[0], logits[1])  # the weights really changed
    eng = dgemma.Engine(quant)
    out = eng.generate(tokens[:, :5], max_new_tokens=L, max_denoising_steps=4,
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 5 + L) and int(out.max()) < full.config.vocab_size


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU (compute capability 9.x)")
def test_fp8_hopper_kernels_agree_with_the_dequantize_reference():
    """On sm90: the fp8 Linear (torch._scaled_mm) and grouped experts (torch._scaled_grouped_mm) against the
    dequantize-then-bf16 reference; activations are rounded to e4m3 too, hence the few-percent tolerance."""
    dev = torch.device("cuda")
    on_cpu = quantize_module(tiny_experts_model(torch.bfloat16, E=8, D=128, I=64), "fp8").layers[0].experts
    model = quantize_module(tiny_experts_model(torch.bfloat16, E=8, D=128, I=64).to(dev), "fp8")  # on the GPU
    q = model.layers[0].experts
    for name in ("gate_up_proj", "down_proj"):  # the same bits as a CPU conversion (`dgemma quantize`)
        assert torch.equal(getattr(q, name).cpu().view(torch.uint8), getattr(on_cpu, name).view(torch.uint8))
        assert torch.equal(getattr(q, name + "_scale").cpu(), getattr(on_cpu, name + "_scale"))
    x, w, ids = (t.to(dev) for t in tiny_routing(64, 8, 2, 128, torch.bfloat16))
    assert q.kernel_kind(x) == "fp8-grouped"
    fast = q(x, w, ids).float()
    set_kernel(q, "reference")
    ref = q(x, w, ids).float()
    assert float((fast - ref).abs().max() / ref.abs().max()) < 0.05
    layer = quant_linear("fp8", 64, 128, 14).to(dev)
    xl = torch.randn(33, 128, device=dev).bfloat16()
    assert kernels.fast_kernel("fp8", dev, xl.dtype) == "fp8-cuda"
    fast, ref = layer(xl).float(), kernels.matmul_reference(xl, layer.stored("weight")).float()
    assert float((fast - ref).abs().max() / ref.abs().max()) < 0.05


@pytest.fixture(scope="module")
def quantized_dirs(reference_checkpoint, tmp_path_factory):
    _, src = reference_checkpoint({"text_config": {"intermediate_size": 128}})
    out = {}
    for scheme in ("int8", "int4", "fp8"):
        out[scheme] = tmp_path_factory.mktemp("q") / scheme
        quantize_checkpoint(src, out[scheme], scheme, 32 if scheme == "int4" else None, log=None)
    return src, out


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
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


# torch's CPU int8 kernel crashed the whole process (SIGSEGV) on unaligned operands or K % 16 != 0, so this runs in a
# child process: a crash is a failed assertion, not a dead test run.
MISALIGNED = """
import sys, torch, dgemma
from dgemma.quant import kernels
from dgemma.quant.schemes import quantize_int8
g = torch.Generator().manual_seed(0)
for K, w_off, x_off in [(128, 0, 0), (128, 4, 0), (128, 0, 8), (72, 0, 0)]:
    data, scale = quantize_int8(torch.randn(48, K, generator=g))
    buf = torch.empty(data.numel() + 64, dtype=torch.int8)
    data = buf[w_off: w_off + data.numel()].view(48, K).copy_(data)  # w_off bytes past an aligned start
    xbuf = torch.empty(5 * K + 64, dtype=torch.bfloat16)
    x = xbuf[x_off: x_off + 5 * K].view(5, K).copy_(torch.randn(5, K, generator=g))
    w = kernels.QuantWeight("int8", data, scale)
    ref = kernels.matmul_reference(x, w).float()
    torch.testing.assert_close(kernels.matmul_fast(x, w).float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
eng = dgemma.load(sys.argv[1], dtype=torch.bfloat16, quiet=True)  # its int8 tensors sit at any offset of the file
assert any(m.weight.data_ptr() % 32 for m in eng.module.modules() if isinstance(getattr(m, "weight", None),
           torch.Tensor) and m.weight.dtype == torch.int8), "expected an unaligned int8 tensor in the file"
out = eng.generate(torch.tensor([[2, 10, 11, 12]]), max_new_tokens=8, max_denoising_steps=2)
print(out.shape[1] - 4)
"""


def test_int8_cpu_kernel_survives_unaligned_operands_and_a_loaded_checkpoint(quantized_dirs):
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", MISALIGNED, str(quantized_dirs[1]["int8"])], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert int(out.stdout.split()[-1]) >= 8  # rounded up to whole canvases, as generate() does
