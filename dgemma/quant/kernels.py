"""Matmuls against a quantized weight: the slow reference, and the fast path each device/dtype gets.

    reference  x @ dequantize(W)ᵀ: the whole weight dequantized in fp32, rounded to x's dtype, one matmul.
    fast       the best this device has for (scheme, x dtype), decided per call by `fast_kernel`:
               * "int8-cpu": torch._weight_int8pack_mm on the stored int8 rows (bf16 activations on CPU; on
                 CUDA (H200, torch 2.11) it ran 16-25x slower than the chunked dequantize at M=256, so CUDA
                 int8 dequantizes);
               * "int4-cpu" / "int4-cuda": torch's int4 weight-only kernels (bf16 activations; CUDA needs
                 compute capability >= 8.0) on the weight converted ONCE to the kernel's own packing
                 (`to_kernel_layout`; the converted copy replaces the stored one, so memory does not grow);
               * "fp8-cuda": Hopper (compute capability 9.x) fp8 tensor cores, bf16 activations: the activations
                 are quantized per row to e4m3 on the fly (`quantize_fp8`, the weights' own rule) and multiplied by
                 the stored e4m3 weight with both fp32 row scales applied in the GEMM's epilogue
                 (torch._scaled_mm for a Linear, torch._scaled_grouped_mm for the stacked experts); the weight is
                 read as stored, 1 byte per element;
               * otherwise "dequant": the weight dequantized CHUNK_ELEMS elements (whole output rows) at a
                 time, each chunk multiplied and dropped: peak extra memory one chunk, not the whole weight.
Stacked experts (QuantExperts) pick one of three paths by `experts_kernel`: "fp8-grouped" (one
torch._scaled_grouped_mm per projection over all experts), "dequant-grouped" (CUDA: the stacked weight dequantized
to the activation dtype, then the same torch._grouped_mm as bf16 experts; transient: one layer's tensor in fp32
and in bf16, 3 GB for 26B-A4B's gate_up_proj, and eager it moves ~6x the bytes bf16 weights would), or "loop" (per
expert, each matmul by `fast_kernel`: the CPU kernels, int4 on CUDA, and every case the grouped GEMMs do not take).
The grouped paths have no host sync.

torch._scaled_grouped_mm conventions (torch 2.13: torch/_meta_registrations.py `_meta_grouped_mm_common`, the
shape checks it mirrors from ATen's GroupedBlas.cpp, and pytorch's test_scaled_matmul_cuda.py 2d_3d test), for the
2D activations x 3D weights case used here:
    mat_a    [M, K] float8_e4m3fn, row-major (stride (K, 1)); M = all routed rows, sorted by expert
    mat_b    [E, K, N] float8_e4m3fn, COLUMN-major in its last two dims: the stored [E, N, K] weight .transpose(1, 2)
             (no copy); K and N multiples of 16 (16-byte rows in 1-byte elements)
    scale_a  [M] fp32, contiguous (one per row of mat_a);  scale_b [E, N] fp32 (one per output column per expert:
             the stored weight scale as is)
    offs     [E] int32, each expert's END row in mat_a (cumulative; an empty expert repeats the previous end)
    out      [M, N] bf16 (out_dtype=torch.bfloat16, the only one allowed); bias / scale_result unsupported
    devices  CUDA compute capability 9.0 or 10.0 (ROCm MI300); dgemma uses it on 9.x only (what was measured).
torch._scaled_mm rowwise (same file, `_check_scaled_mm_sizes`): a [M, K] row-major, b [K, N] column-major (W.t()),
scale_a [M, 1], scale_b [1, N], both fp32 contiguous, K and N multiples of 16, out bf16.
Measured on the 2-core CPU here (torch 2.13, [16..512] x 2816 x 1408..2816): the int8/int4 kernels run at
about the speed of a bf16 matmul with bf16 activations but 20-50x SLOWER than dequantize-then-matmul with
fp32 activations, hence "bf16 only". Kernel and reference agree to rounding (tests/test_quant.py). On an H200
(bench/quant_gpu_check.py, bf16, M=256): int4 kernel 0.05-0.22 ms for 2816x704 .. 4096x2816, within 0.3% of the
reference (relative max error). The fp8 paths are not yet measured on a GPU (bench/quant_gpu_check.py checks them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import moe
from .schemes import dequantize_fp8, dequantize_int4, dequantize_int8, quantize_fp8, unpack_int4

CHUNK_ELEMS = 1 << 22  # weight elements dequantized at once by the "dequant" path (16 MiB in fp32)
INT8_ALIGN = 32  # bytes: see int8_kernel_fits


def int8_kernel_fits(in_features: int, data: torch.Tensor) -> bool:
    """Can torch._weight_int8pack_mm (CPU) take this weight? Measured on torch 2.13, it kills the process (SIGSEGV)
    when K is not a multiple of 16, the int8 weight is not 16-byte aligned (a checkpoint's tensor may start at any
    byte of the memory-mapped file), or the activations are not 32-byte aligned (matmul_fast copies those)."""
    return in_features % 16 == 0 and data.data_ptr() % INT8_ALIGN == 0


@dataclass(frozen=True)
class QuantWeight:
    """One quantized matrix [N,K] as stored: data (int8 / fp8 [N,K] or packed uint8 [N,K/2]), scale, zero (int4)."""

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
        if self.scheme == "fp8":
            return dequantize_fp8(self.data, self.scale, dtype)
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
    """Which fast path (scheme, device, activation dtype) gets: "int8-cpu", "int4-cpu", "int4-cuda", "fp8-cuda" or
    "dequant". The one place that decides (`experts_kernel` builds on it)."""
    if dtype != torch.bfloat16:
        return "dequant"
    if device.type == "cpu":
        return "dequant" if scheme == "fp8" else f"{scheme}-cpu"
    if device.type != "cuda":
        return "dequant"
    major = torch.cuda.get_device_capability(device)[0]
    if scheme == "int4" and major >= 8:
        return "int4-cuda"
    # torch allows 9.0 and 10.0; only Hopper has been run (sm100 may route to other kernels: measure before enabling)
    if scheme == "fp8" and major == 9 and hasattr(torch, "_scaled_grouped_mm"):
        return "fp8-cuda"
    return "dequant"


def fp8_fits(*shapes: tuple[int, ...]) -> bool:
    """The fp8 GEMMs' shape rule: every weight's N and K (its last two dims) a multiple of 16."""
    return all(s[-1] % 16 == 0 and s[-2] % 16 == 0 for s in shapes)


def experts_kernel(scheme: str, x: torch.Tensor, *shapes: tuple[int, ...]) -> str:
    """How QuantExperts multiplies rows x [M, K] sorted by expert by its stacked weights of logical `shapes`
    ([E, 2I, D], [E, D, I]): "fp8-grouped", "dequant-grouped" or "loop" (module docstring). The grouped paths
    follow moe.grouped_dispatch (its mode, "off" included, and its dtype/alignment rules for the dequantized
    weights); "dequant-grouped" is used on CUDA only: there the loop costs a host sync and ~8 launches per expert,
    while on CPU it keeps the per-expert kernels and a bounded dequantize chunk."""
    stand_ins = [x.new_empty(()).expand(s) for s in shapes]  # x's dtype and device, no memory: for the checks only
    if not moe.grouped_dispatch(x, *stand_ins):
        return "loop"
    kind = fast_kernel(scheme, x.device, x.dtype)
    if kind == "fp8-cuda" and fp8_fits(*shapes):
        return "fp8-grouped"
    if x.device.type == "cuda" and kind in ("dequant", "fp8-cuda"):
        return "dequant-grouped"
    return "loop"


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


# --- fp8 (Hopper) --------------------------------------------------------------------------------------------------
def fp8_linear_args(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> tuple:
    """torch._scaled_mm's arguments for x [M, K] @ W[N, K]ᵀ, W stored fp8 with row scales [N] (module docstring)."""
    xq, xs = quantize_fp8(x)
    return xq, data.t(), xs[:, None], scale.float()[None, :]


def fp8_grouped_args(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> tuple:
    """torch._scaled_grouped_mm's arguments for rows x [M, K] sorted by expert (offsets [E]: each expert's end row)
    times the stacked W [E, N, K] stored fp8 with row scales [E, N]: (mat_a, mat_b, scale_a, scale_b, offs)."""
    xq, xs = quantize_fp8(x)
    return xq, data.transpose(-2, -1), xs, scale.float(), offsets.to(torch.int32)


def matmul_fp8(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., K] bf16 -> [..., N] bf16 by torch._scaled_mm (activations quantized per row)."""
    a, b, sa, sb = fp8_linear_args(x.reshape(-1, x.shape[-1]), w.data, w.scale)
    out = torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def grouped_matmul_fp8(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows x [M, K] bf16 sorted by expert -> [M, N] bf16: row m times expert e's W[e]ᵀ for the e whose range holds
    m; one torch._scaled_grouped_mm over all experts (no host sync)."""
    a, b, sa, sb, offs = fp8_grouped_args(x, data, scale, offsets)
    return torch._scaled_grouped_mm(a, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)


def matmul_fast(x: torch.Tensor, w: QuantWeight | KernelWeight) -> torch.Tensor:
    """The fast path for a stored weight (int8 or fp8 kernel, or chunked dequantize) or an already converted one."""
    if isinstance(w, KernelWeight):
        return matmul_kernel(x.to(w.scale_zero.dtype), w).to(x.dtype)
    if w.scheme == "fp8" and fast_kernel("fp8", x.device, x.dtype) == "fp8-cuda" and fp8_fits(w.data.shape):
        return matmul_fp8(x, w)
    if w.scheme == "int8" and fast_kernel("int8", x.device, x.dtype) == "int8-cpu" and \
            int8_kernel_fits(x.shape[-1], w.data):
        flat = x.reshape(-1, x.shape[-1])
        if flat.data_ptr() % INT8_ALIGN:
            flat = flat.clone()  # new memory is 64-byte aligned
        out = torch._weight_int8pack_mm(flat, w.data, w.scale.to(x.dtype))
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return matmul_dequant_chunked(x, w)
