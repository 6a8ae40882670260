"""Weight-only quantization schemes: int8 and fp8 per output channel, int4 group-wise packed two per byte.

All work on weights stored "out x in" with any leading dims ([N,K] for a Linear, [E,N,K] for stacked
experts), so one expert's slice of the stacked tensors is itself a quantized matrix.

int8 (symmetric, one scale per output row):
    scale[..., n] = max_k |w[..., n, k]| / 127          (fp32)
    q = round(w / scale) in [-127, 127]                  (int8, same shape as w)
    w ~ q * scale                                        |error| <= scale / 2

fp8 (float8_e4m3fn, one fp32 scale per output row; the layout Hopper's fp8 GEMMs take as is, kernels.py):
    scale[..., n] = max_k |w[..., n, k]| / 448          (448: the largest finite e4m3fn value)
    q = fp8(w / scale)  (round to nearest even)          (float8_e4m3fn, same shape as w)
    w ~ q * scale                                        |error| <= 2^-4 |w| + 2^-10 scale  (3 mantissa bits;
                                                         subnormals below 2^-6 scale have steps of 2^-9 scale)
    An all-zero row has scale 0 and q 0, as in int8. The same function quantizes activations row by row for the
    fp8 GEMMs (kernels.py), so weights and activations share one rounding rule.

int4 (asymmetric, one scale and one zero per group of G consecutive inputs of a row):
    lo, hi = min, max of the group; scale = (hi - lo) / 15; zero = lo + 8 * scale
    q = round((w - zero) / scale) + 8 in [0, 15]
    w ~ (q - 8) * scale + zero                           |error| <= scale / 2 (+ the scale/zero rounding below)
    packed[..., n, j] = q[..., n, 2j] | q[..., n, 2j+1] << 4      (uint8 [..., N, K/2]: even input in the low nibble)
The "(q - 8) * scale + zero" form is the one torch's int4 weight-only matmul kernels take, so the stored
scale and zero feed them unconverted. scale and zero are kept in bf16/fp16 when the weight is 16-bit (the
released checkpoint: 4.5 bits per weight at G=64) and in fp32 otherwise; q is chosen AFTER rounding them,
so the grid used at dequantization is the one q was fitted to.
"""

from __future__ import annotations

import torch

SCHEMES = ("int8", "int4", "fp8")  # the one table: CLI choices, metadata check, plan
DEFAULT_GROUP_SIZE = 64  # divides every input width of 26B-A4B (2816, 704, 2112, 4096, 8192)


class QuantError(ValueError):
    """A quantization request that cannot be done; the message says what to change."""


def check_scheme(scheme: str, group_size: int | None) -> None:
    if scheme not in SCHEMES:
        raise QuantError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int4":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise QuantError(f"int4 group size must be an even integer >= 2 (e.g. 32, 64, 128), got {group_size!r}")


def scale_dtype_for(dtype: torch.dtype, scheme: str) -> torch.dtype:
    """dtype of stored scales (and zeros): fp32 for int8 and fp8; int4 keeps a 16-bit weight's own dtype."""
    if scheme == "int4" and dtype in (torch.bfloat16, torch.float16):
        return dtype
    return torch.float32


# --- int8 --------------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q int8 [..., N, K], scale fp32 [..., N])."""
    w32 = w.float()
    scale = w32.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: q = 0, scale = 0
    q = torch.round(w32 / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [..., N, K], scale [..., N]) -> w [..., N, K] in `dtype` (computed in fp32, rounded once)."""
    return (q.float() * scale.float()[..., None]).to(dtype)


# --- fp8 ---------------------------------------------------------------------------------------------
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q float8_e4m3fn [..., N, K], scale fp32 [..., N]): one scale per row (absmax / 448).
    Used for weights (once) and for activations (every call of the fp8 GEMMs, rows = tokens)."""
    w32 = w.float()
    scale = w32.abs().amax(dim=-1) / FP8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: q = 0, scale = 0
    # the clamp guards w / scale rounding a hair above 448 (e4m3fn has no infinity; saturation is not guaranteed)
    q = (w32 / safe[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [..., N, K], scale [..., N]) -> w [..., N, K] in `dtype` (computed in fp32, rounded once)."""
    return (q.float() * scale.float()[..., None]).to(dtype)


# --- int4 --------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] integers in [0, 15] -> uint8 [..., K/2], input 2j in the low nibble, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 [..., K] in [0, 15] (the inverse of pack_int4)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    K = w.shape[-1]
    if K % group_size:
        raise QuantError(f"input width {K} is not a multiple of the int4 group size {group_size}; pick a group size "
                         f"that divides every input width (32 or 64 for DiffusionGemma)")
    return w.reshape(*w.shape[:-1], K // group_size, group_size)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (packed uint8 [..., N, K/2], scale [..., N, K/G], zero [..., N, K/G])."""
    g = _groups(w.float(), group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    sdtype = scale_dtype_for(w.dtype, "int4")
    scale = ((hi - lo) / 15.0).to(sdtype)
    zero = (lo + 8.0 * scale.float()).to(sdtype)
    s32 = scale.float()
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))  # a constant group: q = 8 reproduces zero = lo exactly
    q = torch.round((g - zero.float()[..., None]) / safe[..., None]).add_(8).clamp_(0, 15)
    q = torch.where(s32[..., None] > 0, q, torch.full_like(q, 8))
    return pack_int4(q.reshape(w.shape)), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed [..., N, K/2], scale, zero [..., N, K/G]) -> w [..., N, K] in `dtype` (fp32 math, rounded once)."""
    q = unpack_int4(packed).float()
    g = q.reshape(*scale.shape, -1)
    w = (g - 8.0) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(q.shape).to(dtype)


# --- one weight, by scheme ----------------------------------------------------------------------------
def stored_layout(scheme: str, shape: tuple[int, ...], group_size: int | None,
                  scale_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a quantized weight of `shape` [..., N, K] is stored as: {key suffix: (shape, dtype)}; the suffix ""
    keeps the original key (int8/fp8 data or packed int4), "_scale" and (int4) "_zero" are added beside it."""
    *lead, N, K = shape
    if scheme in ("int8", "fp8"):
        data_dtype = torch.int8 if scheme == "int8" else FP8_DTYPE
        return {"": (tuple(shape), data_dtype), "_scale": ((*lead, N), torch.float32)}
    if K % 2 or K % group_size:
        raise QuantError(f"input width {K} is not a multiple of the int4 group size {group_size}; pick a group size "
                         "that divides every input width (32 or 64 for DiffusionGemma)")
    groups = (*lead, N, K // group_size)
    return {"": ((*lead, N, K // 2), torch.uint8), "_scale": (groups, scale_dtype), "_zero": (groups, scale_dtype)}


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int | None) -> dict[str, torch.Tensor]:
    """A float weight [..., N, K] -> {key suffix: tensor} as `stored_layout` describes."""
    if scheme in ("int8", "fp8"):
        q, scale = quantize_int8(w) if scheme == "int8" else quantize_fp8(w)
        return {"": q, "_scale": scale}
    packed, scale, zero = quantize_int4(w, group_size)
    return {"": packed, "_scale": scale, "_zero": zero}
