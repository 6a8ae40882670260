"""Quantized stand-ins for nn.Linear and the stacked Experts, and the swap that puts them into a model.

What is quantized (one table, `QUANTIZED`, used by the converter and the swap alike): every projection
of attention, the dense MLP and the self-conditioning MLP, and both stacked expert tensors (about 95% of
26B-A4B's bytes). What is kept in the model dtype, on purpose:
* the tied embedding / LM head (262,144 x 2816 = 0.74B parameters, 2.9%): it is read three ways (token
  lookup, the head whose logits drive the adaptive sampler's entropy and confidence rules, and the
  self-conditioning soft embedding). Keeping it exact keeps the sampler's inputs as close to full precision
  as the body allows, for 0.74 GB more than int8 (the plan shows 26B-A4B still fits 18 GB);
* the routers (0.01B): an int error there flips expert choices, a discrete change;
* norms, per-expert scales and layer scalars (vectors).

Buffers keep the checkpoint's names: `q_proj.weight` holds the int8 / fp8 (or packed int4) data and
`q_proj.weight_scale` / `q_proj.weight_zero` sit beside it, so loading.py's KEY_MAP maps them unchanged.
`kernel` ("fast" by default, or "reference") picks the matmul; see kernels.py. QuantExperts run their experts as one
grouped GEMM per projection where kernels.experts_kernel says so (fp8 on Hopper: torch._scaled_grouped_mm on the
stored fp8 weights; other schemes on CUDA: the weights dequantized, then torch._grouped_mm), else per expert.

`quantize_module` quantizes a model already in memory (e.g. built on the GPU with random weights, bench/gpu.py)
module by module and expert by expert: each float module is dropped as soon as its quantized stand-in is filled, so
peak memory is the float model plus one module's quantized copy and one expert's fp32 temporaries, never two models.
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from ..model.layers import gelu_tanh
from ..model.loading import QUANTIZATION_KEY
from ..model.moe import Experts, grouped_experts
from .kernels import INT8_ALIGN, KernelWeight, QuantWeight, experts_kernel, fast_kernel, grouped_matmul_fp8, \
    kernel_fits, matmul_fast, matmul_reference, to_kernel_layout
from .schemes import QuantError, check_scheme, quantize_weight, scale_dtype_for, stored_layout

QUANTIZED = [r"layers\.\d+\.self_attn\.[qkvo]_proj\.weight", r"layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
             r"self_conditioning\.(gate|up|down)_proj\.weight", r"layers\.\d+\.experts\.(gate_up|down)_proj"]
METADATA_KEY = QUANTIZATION_KEY  # safetensors __metadata__ key; value: JSON {"scheme", "group_size", ...}
KERNELS = ("fast", "reference")


def is_quantized(name: str) -> bool:
    """Is the module tensor `name` (our names, as KEY_MAP produces them) stored quantized?"""
    return any(re.fullmatch(p, name) for p in QUANTIZED)


def metadata_entry(scheme: str, group_size: int | None, scale_dtype: torch.dtype) -> dict[str, str]:
    check_scheme(scheme, group_size)
    value = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None,
             "scale_dtype": str(scale_dtype).removeprefix("torch."), "format": 1}
    return {METADATA_KEY: json.dumps(value)}


def read_metadata(metadata: dict) -> dict | None:
    """The quantization record of a checkpoint's metadata, checked; None for a full-precision checkpoint."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        scale_dtype = getattr(torch, value["scale_dtype"])
        check_scheme(value["scheme"], value.get("group_size"))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, QuantError) as e:
        raise QuantError(f"checkpoint metadata {METADATA_KEY}={raw!r} is not a valid quantization record ({e}); "
                         "re-run `dgemma quantize` on the full-precision checkpoint") from None
    if value.get("format") != 1:
        raise QuantError(f"quantization format {value.get('format')!r} is newer than this dgemma; upgrade dgemma")
    return {"scheme": value["scheme"], "group_size": value.get("group_size"), "scale_dtype": scale_dtype}


class QuantizedWeights(nn.Module):
    """Holds quantized matrices by name (each [..., N, K] as stored) and multiplies by them."""

    def __init__(self, scheme: str, group_size: int | None, scale_dtype: torch.dtype, shapes: dict[str, tuple]):
        nn.Module.__init__(self)  # not super(): QuantExperts must not run Experts.__init__ (float parameters)
        self.scheme, self.group_size, self.kernel = scheme, group_size, "fast"
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}  # logical [..., N, K] per weight
        self.converted: dict[str, str] = {}  # name -> kernel kind, once converted (see prepare)
        for name, shape in shapes.items():
            for suffix, (s, dtype) in stored_layout(scheme, shape, group_size, scale_dtype).items():
                self.register_buffer(name + suffix, torch.empty(s, dtype=dtype))

    def stored(self, name: str, index: int | None = None) -> QuantWeight:
        def part(suffix):
            t = getattr(self, name + suffix, None)
            return t if t is None or index is None else t[index]
        return QuantWeight(self.scheme, part(""), part("_scale"), part("_zero"))

    def qmatmul(self, x: torch.Tensor, name: str, index: int | None = None) -> torch.Tensor:
        """x [..., K] @ W[index]ᵀ -> [..., N] by the module's `kernel`."""
        if self.kernel == "reference":
            if name in self.converted:
                raise QuantError(f"'{name}' was repacked for the {self.converted[name]} kernel and has no stored form "
                                 "left to dequantize; load the checkpoint again for the reference path")
            return matmul_reference(x, self.stored(name, index))
        if name not in self.converted:
            self.prepare(x.device, x.dtype, names=[name])
        if name in self.converted:
            packed, scale_zero = getattr(self, name + "_kernel"), getattr(self, name + "_kernel_scale_zero")
            if index is not None:
                packed, scale_zero = packed[index], scale_zero[index]
            return matmul_fast(x, KernelWeight(self.converted[name], packed, scale_zero, self.group_size))
        return matmul_fast(x, self.stored(name, index))

    def prepare(self, device: torch.device, dtype: torch.dtype, names=None) -> None:
        """Repack int4 matrices once for this device's kernel (bf16 activations), REPLACING the stored form, so
        the fast path holds one copy; int8 on CPU: realign them. Happens on the first fast matmul, or ahead of time
        via `prepare_kernels`."""
        kind = fast_kernel(self.scheme, torch.device(device), dtype)
        names = names or [n for n in self._buffers if n + "_scale" in self._buffers]
        if kind == "int8-cpu":  # a memory-mapped checkpoint tensor may start anywhere: copy it once to aligned memory
            for name in names:
                if getattr(self, name).data_ptr() % INT8_ALIGN:
                    self._buffers[name] = getattr(self, name).clone()
            return
        if self.scheme != "int4" or not kind.startswith("int4"):
            return
        for name in names:
            data = getattr(self, name)
            lead, (N, half) = data.shape[:-2], data.shape[-2:]
            if not kernel_fits(kind, N, 2 * half, self.group_size):
                continue
            flat = [self.stored(name)] if not lead else [self.stored(name, e) for e in range(lead[0])]
            done = [to_kernel_layout(w, kind, dtype) for w in flat]
            stack = (lambda ts: ts[0]) if not lead else torch.stack
            for suffix in ("", "_scale", "_zero"):
                del self._buffers[name + suffix]
            if lead:  # an empty stand-in keeps `.shape[0]` = E for Experts.forward's offsets
                self.register_buffer(name, torch.empty(*lead, 0, dtype=torch.uint8, device=data.device),
                                     persistent=False)
            self.register_buffer(name + "_kernel", stack([k.packed for k in done]), persistent=False)
            self.register_buffer(name + "_kernel_scale_zero", stack([k.scale_zero for k in done]), persistent=False)
            self.converted[name] = kind


class QuantLinear(QuantizedWeights):
    """nn.Linear without bias, weight [out, in] stored quantized."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int | None,
                 scale_dtype: torch.dtype):
        super().__init__(scheme, group_size, scale_dtype, {"weight": (out_features, in_features)})
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qmatmul(x, "weight")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme}, group={self.group_size}, {self.kernel}"


class QuantExperts(QuantizedWeights, Experts):
    """Experts with gate_up_proj [E, 2I, D] and down_proj [E, D, I] stored quantized, per expert slice.
    The grouped dispatch and the per-token reference loop are Experts' own; only `expert` differs."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, scheme: str, group_size: int | None,
                 scale_dtype: torch.dtype):
        super().__init__(scheme, group_size, scale_dtype, {"gate_up_proj": (num_experts, 2 * intermediate, hidden),
                                                           "down_proj": (num_experts, hidden, intermediate)})
        self.num_experts = num_experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.qmatmul(x, "gate_up_proj", e).chunk(2, dim=-1)
        return self.qmatmul(gelu_tanh(gate) * up, "down_proj", e)

    def kernel_kind(self, x: torch.Tensor) -> str:
        """The path `forward_sorted` takes for rows like x: "loop" for the reference kernel or int4 weights already
        repacked per expert, else kernels.experts_kernel's choice."""
        if self.kernel == "reference" or self.converted:
            return "loop"
        return experts_kernel(self.scheme, x, self.shapes["gate_up_proj"], self.shapes["down_proj"])

    def forward_sorted(self, inputs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Experts.forward_sorted for stored weights: inputs [N*K, D] sorted by expert, offsets [E] -> [N*K, D]."""
        return self.forward_path(self.kernel_kind(inputs), inputs, offsets)

    def forward_path(self, kind: str, inputs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """`forward_sorted` by the path `kind` ("fp8-grouped", "dequant-grouped" or "loop"), whatever kernel_kind
        would pick (bench/quant_gpu_check.py times each path)."""
        if kind == "fp8-grouped":
            gate, up = grouped_matmul_fp8(inputs, self.gate_up_proj, self.gate_up_proj_scale, offsets).chunk(2, dim=-1)
            return grouped_matmul_fp8(gelu_tanh(gate) * up, self.down_proj, self.down_proj_scale, offsets)
        if kind == "dequant-grouped":
            return grouped_experts(inputs, self.stored("gate_up_proj").dequantize(inputs.dtype),
                                   self.stored("down_proj").dequantize(inputs.dtype), offsets)
        return self.forward_loop(inputs, offsets)


def _replacement(name: str, child: nn.Module, scheme, group_size, scale_dtype):
    if isinstance(child, nn.Linear) and is_quantized(f"{name}.weight"):
        return QuantLinear(child.in_features, child.out_features, scheme, group_size, scale_dtype)
    if isinstance(child, Experts) and not isinstance(child, QuantizedWeights) and is_quantized(f"{name}.gate_up_proj"):
        E, two_i, D = child.gate_up_proj.shape
        return QuantExperts(E, D, two_i // 2, scheme, group_size, scale_dtype)
    return None


def _swaps(module: nn.Module, scheme: str, group_size: int | None, scale_dtype: torch.dtype):
    """Yield (name, float module, empty quantized stand-in made on its device) for every quantized Linear/Experts of
    `module`, one at a time; the caller puts the stand-in in place. Only names are listed up front, so a float
    module the caller has replaced is not kept alive here."""
    for name in [name for name, _ in module.named_modules()]:
        child = module.get_submodule(name)
        if not isinstance(child, (nn.Linear, Experts)):
            continue
        with torch.device(next(child.parameters()).device):  # built in place: no host copy, nothing to move
            new = _replacement(name, child, scheme, group_size, scale_dtype)
        if new is not None:
            yield name, child, new


def swap_modules(module: nn.Module, scheme: str, group_size: int | None,
                 scale_dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Replace every quantized Linear/Experts of `module` (in place, on the old weights' device; run it on a
    meta-built model before loading) and return {module name: the float module it replaced}."""
    check_scheme(scheme, group_size)
    replaced = {}
    for name, old, new in _swaps(module, scheme, group_size, scale_dtype):
        module.set_submodule(name, new)
        replaced[name] = old
    return replaced


def _fill(new: QuantizedWeights, old: nn.Module, scheme: str, group_size: int | None) -> None:
    """Quantize old's float weights into new's buffers, one expert's [N, K] slice at a time for stacked ones."""
    for wname, w in old.named_parameters():
        for index in [()] if w.ndim == 2 else [(e,) for e in range(w.shape[0])]:
            for suffix, t in quantize_weight(w[index], scheme, group_size).items():
                getattr(new, wname + suffix)[index].copy_(t)


@torch.no_grad()
def quantize_module(module: nn.Module, scheme: str, group_size: int | None = None) -> nn.Module:
    """Quantize a loaded float model in place (the same numbers `dgemma quantize` writes); returns it. Module by
    module, and one expert's slice at a time: each float module is released once its stand-in is filled (if nothing
    else holds its weights), so a model that fills most of a GPU can be quantized where it is."""
    check_scheme(scheme, group_size)
    dtype = module.embed_tokens.weight.dtype
    for name, old, new in _swaps(module, scheme, group_size, scale_dtype_for(dtype, scheme)):
        _fill(new, old, scheme, group_size)
        module.set_submodule(name, new)
        del old  # the generator drops its own reference when it moves on, before the next stand-in is made
    return module


def set_kernel(module: nn.Module, kernel: str) -> None:
    """Switch every quantized submodule to the "fast" path or the dequantize-then-matmul "reference"."""
    if kernel not in KERNELS:
        raise QuantError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    for m in module.modules():
        if isinstance(m, QuantizedWeights):
            m.kernel = kernel


def prepare_kernels(module: nn.Module) -> None:
    """Repack int4 weights for the device's kernel now (otherwise on first use), for the model's dtype."""
    dtype = module.embed_tokens.weight.dtype
    for m in module.modules():
        if isinstance(m, QuantizedWeights):
            m.prepare(next(m.buffers()).device, dtype)


def swap_for_checkpoint(module: nn.Module, metadata: dict) -> set[str]:
    """The loader's hook (`load_module(prepare=...)`): for a checkpoint whose metadata records a quantization,
    swap the quantized modules in (on meta) and return the names of their stored tensors, which keep the
    checkpoint's dtypes; a full-precision checkpoint is left alone."""
    record = read_metadata(metadata)
    if record is None:
        return set()
    replaced = swap_modules(module, record["scheme"], record["group_size"], record["scale_dtype"])
    return {f"{name}.{b}" for name in replaced for b, _ in module.get_submodule(name).named_buffers()}
