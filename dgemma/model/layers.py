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


class RMSNorm(nn.Module):
    """Weighted RMSNorm with the checkpoint's `.weight` name; `has_weight=False` gives the scale-free variant."""

    def __init__(self, dim: int, eps: float, has_weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if has_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


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
