"""Mixture of experts: router, stacked expert weights, grouped dispatch and the slow reference (spec §4.5).

Where it departs from a textbook MoE:
* the router sees the RAW residual through a scale-free RMSNorm, times a learned `scale` vector and H^-1/2;
* the experts see a differently normed input (`pre_feedforward_layernorm_2`, applied by the caller);
* top-k probabilities are renormalised to sum to 1, then multiplied by a learned `per_expert_scale`;
* no capacity limit, no router noise, no auxiliary loss at inference.

Expert tensors are stored "out x in" as in the checkpoint: `gate_up_proj` [E, 2I, D] (rows 0..I-1 gate,
I..2I-1 up) and `down_proj` [E, D, I], so expert e computes y = down[e] (gelu(gate[e] x) * up[e] x).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import gelu_tanh, rms_norm


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k, self.eps = top_k, eps
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, h: torch.Tensor):
        """h [N,D] raw residual -> (weights [N,K] fp32, expert ids [N,K] int64)."""
        r = rms_norm(h, None, self.eps) * self.scale * (h.shape[-1] ** -0.5)
        probs = torch.softmax(self.proj(r), dim=-1, dtype=torch.float32)  # routing softmax in fp32
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e applied to x [n,D] -> [n,D]."""
        gate, up = (x @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
        return (gelu_tanh(gate) * up) @ self.down_proj[e].t()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Grouped dispatch. x [N,D]; weights [N,K] fp32; experts [N,K] -> [N,D] in x's dtype.

        The N*K (token, slot) pairs are sorted by expert so each active expert runs ONE matmul over all
        of its tokens (bytes read per step = active experts only). The weighted expert outputs are summed in
        (at least) fp32 and rounded to x's dtype once, as the reference's default ("grouped_mm") experts
        path does; rounding each of the K contributions to bf16 first leaves bf16 runs ulps off it."""
        N, K = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // K  # which token each sorted pair belongs to
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        sorted_weights = weights.reshape(-1)[order]
        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token_of[start:start + n]
            y = self.expert(e, x[rows]) * sorted_weights[start:start + n, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += n
        return out.to(x.dtype)

    def forward_reference(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Slow per-token loop: out[n] = sum_k w[n,k] * expert_{e[n,k]}(x[n]). The oracle for `forward`."""
        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for n in range(x.shape[0]):
            for k in range(experts.shape[1]):
                e = int(experts[n, k])
                out[n] += (self.expert(e, x[n:n + 1])[0] * weights[n, k]).to(out.dtype)
        return out.to(x.dtype)
