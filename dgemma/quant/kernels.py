"""Matmuls against a quantized weight: the slow reference, and the fast path each device/dtype gets.

    reference  x @ dequantize(W)ᵀ: the whole weight dequantized in fp32, rounded to x's dtype, one matmul.
    fast       the best this device has for (scheme, x dtype), decided per call by `fast_kernel`:
               * "int8-cpu": torch._weight_int8pack_mm on the stored int8 rows (bf16 activations on CPU; on
                 CUDA (H200, torch 2.11) it ran 16-25x slower than the chunked dequantize at M=256, so CUDA
                 int8 dequantizes);
               * "int4-cpu" / "int4-cuda": torch's int4 weight-only kernels (bf16 activations; CUDA needs
                 compute capability >= 8.0) on the weight converted ONCE to the kernel's own packing
                 (`to_kernel_layout`; the converted copy replaces the stored one, so memory does not grow);
               * otherwise "dequant": the weight dequantized CHUNK_ELEMS elements (whole output rows) at a
                 time, each chunk multiplied and dropped: peak extra memory one chunk, not the whole weight.
Measured on the 2-core CPU here (torch 2.13, [16..512] x 2816 x 1408..2816): the int8/int4 kernels run at
about the speed of a bf16 matmul with bf16 activations but 20-50x SLOWER than dequantize-then-matmul with
fp32 activations, hence "bf16 only". Kernel and reference agree to rounding (tests/test_quant.py). On an H200
(bench/quant_gpu_check.py, bf16, M=256): int4 kernel 0.05-0.22 ms for 2816x704 .. 4096x2816, within 0.3% of the
reference (relative max error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schemes import dequantize_int4, dequantize_int8, unpack_int4

CHUNK_ELEMS = 1 << 22  # weight elements dequantized at once by the "dequant" path (16 MiB in fp32)


@dataclass(frozen=True)
class QuantWeight:
    """One quantized matrix [N,K] as stored: data (int8 [N,K] or packed uint8 [N,K/2]), scale, zero (int4)."""

    scheme: str
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    def rows(self, start: int, end: int) -> "QuantWeight":
        return QuantWeight(self.scheme, self.data[start:end], self.scale[start:end],
                           None if self.zero is None else self.zero[start:end])

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scheme == "int8":
            return dequantize_int8(self.data, self.scale, dtype)
        return dequantize_int4(self.data, self.scale, self.zero, dtype)


@dataclass(frozen=True)
class KernelWeight:
    """An int4 matrix in a torch kernel's packing: `packed` plus scale-and-zero [K/G, N, 2] in `dtype`."""

    kind: str  # "int4-cpu" | "int4-cuda"
    packed: torch.Tensor
    scale_zero: torch.Tensor
    group_size: int


def matmul_reference(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., K] -> [..., N]: dequantize the whole weight, then one ordinary matmul (the oracle)."""
    return x @ w.dequantize(x.dtype).t()


def matmul_dequant_chunked(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., K] -> [..., N], dequantizing at most CHUNK_ELEMS weight elements at a time."""
    K = x.shape[-1]
    step = max(1, CHUNK_ELEMS // K)
    if step >= w.out_features:
        return matmul_reference(x, w)
    parts = [x @ w.rows(n, n + step).dequantize(x.dtype).t() for n in range(0, w.out_features, step)]
    return torch.cat(parts, dim=-1)


def fast_kernel(scheme: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which fast path (scheme, device, activation dtype) gets: "int8-cpu", "int4-cpu", "int4-cuda" or "dequant"."""
    if dtype != torch.bfloat16:
        return "dequant"
    if device.type == "cpu":
        return f"{scheme}-cpu"
    if device.type == "cuda" and scheme == "int4" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "int4-cuda"
    return "dequant"


def kernel_fits(kind: str, out_features: int, in_features: int, group_size: int) -> bool:
    """Shape limits of torch's int4 kernels (N multiple of 16 on CPU, 8 on CUDA; K multiple of 32 on CUDA)."""
    if kind == "int4-cpu":
        return out_features % 16 == 0
    if kind == "int4-cuda":
        return out_features % 8 == 0 and in_features % 32 == 0 and group_size in (32, 64, 128, 256)
    return True


def _inner_k_tiles(in_features: int) -> int:
    return next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)


def to_kernel_layout(w: QuantWeight, kind: str, dtype: torch.dtype) -> KernelWeight:
    """Repack one int4 matrix for torch's kernel `kind`; scale and zero become [K/G, N, 2] in `dtype`."""
    q = unpack_int4(w.data)  # [N, K] in [0, 15]
    K = q.shape[-1]
    group_size = K // w.scale.shape[-1]
    if kind == "int4-cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    else:  # the CUDA kernel takes uint8 pairs with the EVEN input in the high nibble
        pairs = (q[:, 0::2] << 4) | q[:, 1::2]
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), _inner_k_tiles(K))
    scale_zero = torch.stack([w.scale, w.zero], dim=-1).transpose(0, 1).to(dtype).contiguous()
    return KernelWeight(kind, packed, scale_zero, group_size)


def matmul_kernel(x: torch.Tensor, w: KernelWeight) -> torch.Tensor:
    """x [..., K] (in scale_zero's dtype) -> [..., N] through the int4 kernel."""
    flat = x.reshape(-1, x.shape[-1])
    if w.kind == "int4-cpu":
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, w.packed, w.group_size, w.scale_zero)
    else:
        out = torch.ops.aten._weight_int4pack_mm(flat, w.packed, w.group_size, w.scale_zero)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def matmul_fast(x: torch.Tensor, w: QuantWeight | KernelWeight) -> torch.Tensor:
    """The fast path for a stored weight (int8 kernel or chunked dequantize) or an already converted one."""
    if isinstance(w, KernelWeight):
        return matmul_kernel(x.to(w.scale_zero.dtype), w).to(x.dtype)
    if w.scheme == "int8" and fast_kernel("int8", x.device, x.dtype) == "int8-cpu":
        flat = x.reshape(-1, x.shape[-1])
        out = torch._weight_int8pack_mm(flat, w.data, w.scale.to(x.dtype))
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return matmul_dequant_chunked(x, w)
