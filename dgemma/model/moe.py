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

from .layers import gelu_tanh, norm


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k, self.eps = top_k, eps
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, h: torch.Tensor):
        """h [N,D] raw residual -> (weights [N,K] fp32, expert ids [N,K] int64)."""
        r = norm(h, None, self.eps) * self.scale * (h.shape[-1] ** -0.5)
        probs = torch.softmax(self.proj(r), dim=-1, dtype=torch.float32)  # routing softmax in fp32
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts


GROUPED_MODES = ("auto", "on", "off")  # auto (the default) and on both mean: wherever the op takes the tensors
_grouped_mode = "auto"  # set by `set_grouped_dispatch` (the runner's choice, never the model files')


def set_grouped_dispatch(mode: str) -> None:
    """"auto"/"on": one grouped GEMM wherever torch._grouped_mm takes the tensors (CUDA: bf16; CPU: any float
    dtype), else the per-expert loop; "off": always the loop (the slow reference; tests and benches)."""
    global _grouped_mode
    if mode not in GROUPED_MODES:
        raise ValueError(f"grouped dispatch mode must be one of {sorted(GROUPED_MODES)}, got {mode!r}")
    _grouped_mode = mode


def grouped_dispatch(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `Experts.forward` can and should use `torch._grouped_mm` for these tensors: the op exists, the
    dtypes agree, rows are 16-byte aligned (its stride rule), and the mode asks for it."""
    if _grouped_mode == "off" or not hasattr(torch, "_grouped_mm"):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # e.g. float64 (tests): the loop
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:  # the CUDA kernel takes bf16 only
        return False
    return all(w.dtype == x.dtype and (w.shape[-1] * w.element_size()) % 16 == 0 and
               (w.shape[-2] * w.element_size()) % 16 == 0 for w in weights)


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The expert matmuls' operands in the autocast dtype, as autocast itself would cast them for the loop's `@`
    (torch._grouped_mm is not on autocast's list). Used where the grouped GEMM would not take the fp32 master
    weights (CUDA takes bf16 only), so bf16 training keeps the one-call, no-host-sync dispatch; on CPU, which takes
    fp32, nothing changes. The casts are differentiable: the gradients flow back to the fp32 master weights."""
    low = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t if t.dtype == low or not t.is_floating_point() else t.to(low) for t in tensors)


@torch.library.custom_op("dgemma::grouped_mm", mutates_args=())
def _grouped_mm_opaque(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


@_grouped_mm_opaque.register_fake
def _(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[-1])


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(a, b, offs=offs). Outside bf16 and without autograd it goes through an opaque operator: the
    same kernel and bits, but torch.compile (whose check of _grouped_mm takes bf16 only, while the CPU kernel takes
    fp32 too) then keeps the grouped GEMM inside one graph (engine/compiled.py). Costs a few microseconds a call."""
    if a.dtype == torch.bfloat16 or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return torch._grouped_mm(a, b, offs=offs)
    return _grouped_mm_opaque(a, b, offs)


def grouped_experts(inputs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                    offsets: torch.Tensor) -> torch.Tensor:
    """Rows inputs [M, D] sorted by expert (offsets [E]: each expert's end row) through their experts with stacked
    gate_up [E, 2I, D] and down [E, D, I] (inputs' dtype): two grouped GEMMs, no host sync -> [M, D]."""
    offsets = offsets.to(torch.int32)
    gate, up = grouped_mm(inputs, gate_up.transpose(1, 2), offsets).chunk(2, dim=-1)
    return grouped_mm(gelu_tanh(gate) * up, down.transpose(1, 2), offsets)


DENSE_MAX_RATIO = 4  # dense dispatch computes E/K times the expert FLOPs; beyond this ratio it is not worth it


def dense_worthwhile(num_experts: int, top_k: int) -> bool:
    """Whether `Experts.forward_dense` (every expert on every token) is a good trade: few experts per chosen one,
    as in the small bundled configs (E=4, K=2: twice the expert FLOPs, which are a small part of a layer)."""
    return num_experts <= DENSE_MAX_RATIO * top_k


class _GatherRows(torch.autograd.Function):
    """y = x[rows] where rows = perm // K for a permutation `perm` of N*K slots whose inverse is `inverse`: each of
    x's N rows is gathered K times (the dispatch to experts: rows = order // K), or once (K = 1: undoing a
    permutation). The gradient is a gather, grad[inverse], summed over each row's K slots, instead of autograd's
    accumulating index_put_. Same values; for K <= 2 the same gradient bits (two addends commute). Measured on CPU
    training at batch 64 x 179 tokens: that index_put_ took 11-19 ms per MoE layer and pass (~0.47 s of a 6 s
    step)."""

    @staticmethod
    def forward(ctx, x, rows, inverse, K):
        ctx.save_for_backward(inverse)
        ctx.K = K
        return x[rows]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        g = grad[inverse]
        if ctx.K > 1:
            g = g.view(-1, ctx.K, g.shape[-1]).sum(1)
        return g, None, None, None


class Experts(nn.Module):
    # The runner's choice, set per instance, never saved: `forward` runs `forward_dense` (train.py sets it with
    # --compile, and on CUDA in fp32, where torch._grouped_mm takes bf16 only and the loop syncs every layer;
    # engine/compiled.py where no grouped GEMM applies and few experts make it cheap)
    dense = False

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
        of its tokens (bytes read per step = active experts only). The weighted outputs (fp32, since the
        routing weights are fp32) are put back in (token, slot) order and summed over the K slots, then
        rounded to x's dtype once: the reference's default ("grouped_mm") order of additions, so even
        top-k >= 3 matches it to the last bit. Gathers only, no index_add_ (which is pathologically slow
        with several CPU threads: 33 ms vs 61 us for a 128x512 add, measured here).

        The per-expert matmuls run either as ONE grouped GEMM over all experts (`torch._grouped_mm`: no host
        synchronisation, one call per projection; measured on CPU: the same bits as the loop and 5-25% faster
        on the small bench config; on an H200 3.98x the loop's step) or as a Python loop over the active experts
        (one `.tolist()` of the offsets). `grouped_dispatch` picks. With `self.dense` (set by the trainer, or by
        the compiled step) it runs `forward_dense` instead.

        Tried 2026-11-27 and not kept: expert matrices stored column-major make MKL's small-M products up to 1.7x
        faster with the same bits, except for single-token groups, where only the checkpoint's layout gives the
        reference's bits; switching layouts per sampling mode cost 80-140 ms per switch on `small`, and the whole
        decoder step gained 1-5%."""
        if self.dense and type(self).expert is Experts.expert:
            return self.forward_dense(x, weights, experts)
        N, K = experts.shape
        E = self.gate_up_proj.shape[0]
        ranked, order = torch.sort(experts.reshape(-1), stable=True)
        # each expert's end offset in the sorted pairs: [E] whatever the routing (bincount's size depends on the
        # data, so on CUDA it reads a maximum back to the host: a sync in every MoE layer)
        offsets = torch.searchsorted(ranked, torch.arange(E, device=ranked.device, dtype=ranked.dtype), right=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        inputs = _GatherRows.apply(x, order // K, inverse, K)  # [N*K, D], grouped by expert
        grouped = self.forward_sorted(inputs, offsets)
        weighted = grouped * weights.reshape(-1)[order, None]
        return _GatherRows.apply(weighted, inverse, order, 1).view(N, K, x.shape[-1]).sum(1).to(x.dtype)

    def forward_sorted(self, inputs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """inputs [N*K, D] sorted by expert, offsets [E] each expert's end row -> [N*K, D], every row through its
        expert: ONE grouped GEMM per projection where `grouped_dispatch` takes the tensors, else `forward_loop`.
        Quantized experts (quant/modules.py) override this with their own grouped paths."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(inputs.device.type) and not grouped_dispatch(inputs, gate_up, down):
            inputs, gate_up, down = autocast_operands(inputs, gate_up, down)  # e.g. CUDA, fp32 master weights
        # a subclass that redefines `expert` (LoRA adapters) keeps the loop, which calls its `expert`
        if type(self).expert is Experts.expert and grouped_dispatch(inputs, gate_up, down):
            return grouped_experts(inputs, gate_up, down, offsets)
        return self.forward_loop(inputs, offsets)

    def forward_loop(self, inputs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """`forward_sorted` as a Python loop over the active experts, each by `expert` (one `.tolist()` of the
        offsets: a host sync on CUDA)."""
        outputs, start = [], 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                outputs.append(self.expert(e, inputs[start:end]))
                start = end
        return torch.cat(outputs) if outputs else inputs

    def forward_dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every expert on every token as TWO plain GEMMs, weighted by the [N,E] routing matrix (0 where not chosen):
            [N,D] x [D, E*2I] -> gelu(gate) * up [N,E,I] -> times w[n,e] -> [N, E*I] x [E*I, D] -> [N,D]
        (the down projections of the experts stacked along I, so the second GEMM also sums over experts). E/K times
        the expert FLOPs of `forward`, but plain GEMMs only (under autograd the grouped path calls torch._grouped_mm
        itself, which torch.compile takes in bf16 only), no sort, no [E,N,D] intermediate. The same sum as `forward`
        with the routing weight applied before the down projection instead of after it (fp32 routing weights; one
        rounding to x's dtype)."""
        out_dtype, gate_up, down = x.dtype, self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(x.device.type):
            x, gate_up, down = autocast_operands(x, gate_up, down)
        E, I, D = down.shape[0], down.shape[2], down.shape[1]
        gate, up = (x @ gate_up.reshape(E * 2 * I, D).t()).view(-1, E, 2 * I).chunk(2, dim=-1)  # [N,E,I] each
        dense = torch.zeros(x.shape[0], E, dtype=weights.dtype, device=x.device).scatter(1, experts, weights)
        hidden = (gelu_tanh(gate) * up * dense[..., None]).to(down.dtype)  # [N,E,I], weighted per expert
        return (hidden.reshape(-1, E * I) @ down.transpose(1, 2).reshape(E * I, D)).to(out_dtype)

    def forward_reference(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Slow per-token loop: out[n] = sum_k w[n,k] * expert_{e[n,k]}(x[n]). The oracle for `forward`."""
        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for n in range(x.shape[0]):
            for k in range(experts.shape[1]):
                e = int(experts[n, k])
                out[n] += (self.expert(e, x[n:n + 1])[0] * weights[n, k]).to(out.dtype)
        return out.to(x.dtype)
