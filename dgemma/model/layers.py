"""Small building blocks shared by every pass: RMSNorm, rotary tables, the gated GELU MLP, the soft-cap.

Departures from vanilla Gemma that live here (spec §4.1-§4.3, §12):
* RMSNorm multiplies by `w` directly (Gemma 1-3 used `1 + w`) and always reduces in fp32.
* Some norms have no weight at all (v-norm, router norm, self-conditioning post-norm).
* Full-attention layers use "proportional" partial RoPE: only the first 25% of frequency pairs rotate,
  with the exponent taken over the FULL head dim; the remaining frequencies are exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(x / rms(x)) * w, computed in fp32 and cast back to x's dtype (spec §4.1).

    `pow(-0.5)` rather than `rsqrt` follows the reference (numerics only)."""
    x32 = x.float()
    out = torch.mul(x32, torch.pow(x32.pow(2).mean(-1, keepdim=True).add_(eps), -0.5))
    if weight is not None:
        out.mul_(weight.float())  # in place on the fresh product: the same IEEE operations, one allocation fewer
    return out.type_as(x)


class FusedRMSNorm(torch.autograd.Function):
    """`rms_norm` for training: the same forward operations (the same bits for fp32/bf16/fp16 inputs), one graph
    node, and an analytic backward that keeps only x and the inverse rms r [..., 1] (the autograd chain of
    `rms_norm` records ~8 nodes and keeps fp32 copies and intermediates of x). With x̂ = x·r and g' = g·w
    (g the output gradient in the compute dtype):
        dx = r · (g' - x̂ · mean(g' · x̂))        dw = Σ_rows g · x̂
    The compute dtype is fp32, or float64 for float64 inputs (where `rms_norm` rounds to fp32), so the backward
    can be gradchecked. `rms_norm` stays the reference (tests compare values and gradients); inference never
    comes here."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x if x.dtype == compute else x.to(compute)
        inv = torch.pow(xc.pow(2).mean(-1, keepdim=True).add_(eps), -0.5)
        out = torch.mul(xc, inv)
        if weight is not None:
            out.mul_(weight if weight.dtype == compute else weight.to(compute))
        ctx.save_for_backward(x, inv, weight)
        return out if x.dtype == compute else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, inv, weight = ctx.saved_tensors
        compute = inv.dtype
        g = grad if grad.dtype == compute else grad.to(compute)
        xhat = (x if x.dtype == compute else x.to(compute)) * inv
        grad_w = None
        if weight is not None:
            if ctx.needs_input_grad[1]:
                grad_w = (g * xhat).sum(tuple(range(g.dim() - 1)))
                grad_w = grad_w if weight.dtype == compute else grad_w.to(weight.dtype)
            g = g * (weight if weight.dtype == compute else weight.to(compute))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(g, xhat, (g * xhat).mean(-1, keepdim=True), value=-1.0).mul_(inv)
            grad_x = grad_x if x.dtype == compute else grad_x.to(x.dtype)
        return grad_x, grad_w, None


FUSED_NORM_MODES = ("auto", "on", "off")
_fused_norm_mode = "auto"  # set by `set_fused_norm` (tests and benches; the default suits training)


def set_fused_norm(mode: str) -> None:
    """"auto": `FusedRMSNorm` while autograd records on accelerators (where a step is bound by launching operators),
    never on CPU, where training is bound by arithmetic and keeps the exact gradient bits of `rms_norm`'s autograd
    chain (so CPU-trained models, the bundled ones included, reproduce to the bit); "on": on every device;
    "off": never."""
    global _fused_norm_mode
    if mode not in FUSED_NORM_MODES:
        raise ValueError(f"fused norm mode must be one of {sorted(FUSED_NORM_MODES)}, got {mode!r}")
    _fused_norm_mode = mode


def norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`rms_norm` values; when autograd records (training), through `FusedRMSNorm`'s one node where
    `set_fused_norm`'s mode says so."""
    if (_fused_norm_mode != "off" and torch.is_grad_enabled()
            and (x.requires_grad or (weight is not None and weight.requires_grad))
            and (_fused_norm_mode == "on" or x.device.type != "cpu")):
        return FusedRMSNorm.apply(x, weight, eps)
    return rms_norm(x, weight, eps)


class RMSNorm(nn.Module):
    """Weighted RMSNorm with the checkpoint's `.weight` name; `has_weight=False` gives the scale-free variant."""

    def __init__(self, dim: int, eps: float, has_weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if has_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm(x, self.weight, self.eps)


def rope_frequencies(head_dim: int, theta: float, rotary_fraction: float = 1.0) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32.

    f_i = theta^(-2i / head_dim) for the first `rotary_fraction * head_dim / 2` pairs, 0 for the rest.
    With fraction 1 this is ordinary RoPE; with 0.25 it is the full layers' proportional RoPE (spec §4.3):
    the exponent denominator stays the full head dim, and zero frequencies mean cos=1, sin=0 (no rotation)."""
    half = head_dim // 2
    num_rotated = int(head_dim * rotary_fraction) // 2
    exponents = torch.arange(0, 2 * num_rotated, 2, dtype=torch.int64).float() / head_dim
    freqs = torch.zeros(half, dtype=torch.float32)
    freqs[:num_rotated] = 1.0 / (theta ** exponents)
    return freqs


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin tables [..., T, head_dim] for integer positions [..., T], built in fp32, cast to `dtype`.

    The frequency vector is duplicated ([f, f]) to match the rotate-half convention."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [B, T, H, D]; cos/sin [B or 1, T, D] (broadcast over heads)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate x) * up x): the dense "shared expert" and the self-conditioning MLP."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


def softcap(logits: torch.Tensor, cap: float | None, inplace: bool = False) -> torch.Tensor:
    """cap * tanh(logits / cap), in fp32 (spec §4.6). `cap=None` only casts.

    inplace=True overwrites an fp32 `logits` (the head passes its fresh product when no gradient is needed): the
    same three IEEE operations, but one [B,L,V] buffer at the peak instead of three (2 GiB each for 8 canvases at
    V = 262,144). Autograd cannot take it (tanh's backward reads its output, which the multiply would overwrite)."""
    logits = logits.float()
    if cap is None:
        return logits
    if inplace:
        return logits.div_(cap).tanh_().mul_(cap)
    return torch.tanh(logits / cap) * cap
