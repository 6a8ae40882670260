"""Dynamic int8 matmuls on CPU: a speed option (`--int8-dynamic`), approximate, never the default.

Weights are quantized once, per output channel, to int8 and packed for the CPU's int8 GEMM (FBGEMM/oneDNN
through torch's quantized-linear ops); each call quantizes its activations on the fly (one scale per call, from
the activations' range; 8 bits on CPUs with VNNI, else 7) and accumulates in int32. Measured on the bundled
default model's held-out canvases: decoder top-1 agreement 98.1%, mean KL 0.0012 nats (7-bit: 97.4%, 0.004).
On this project's 2-core Xeon (AVX512-VNNI) a 256 x 1024 by 1024 x 4096 product ran at 255 GOP/s against
78 GFLOP/s in fp32 (same machine, same moment).

What runs in int8: the same projections `dgemma quantize` stores quantized (`modules.QUANTIZED`: attention,
dense MLP, self-conditioning MLP, the stacked experts, one packed matrix per expert) plus the tied LM head's
product (packed int8 copies of the embedding in column blocks, `_Head`, which also soft-caps in a cheaper form) and
the self-conditioning product softmax(ℓ̃) @ E (a packed copy of E^T, `_SoftProduct`); the token lookup reads the
float table. The routers, norms, softmaxes and the sampler stay in fp32. The int8 self-conditioning product made
the int8 fast preset's canvas on `small` 1.24x faster (it had been 26% of an int8 step; `bench/int8_parts.py`) for
about 1% soft-embedding error in real steps; docs/performance-history.md has the measurements, and those of per-row
activation scales, tried and not adopted. The float modules are kept inside the swapped ones (`.reference`), so
`restore_float` undoes the swap exactly and tests compare against them.

The packed weights are plain attributes, not parameters or buffers: the state dict, `dgemma quantize` and
checkpoints never see them. The torch ops behind this are marked deprecated in torch 2.13 (they still ship and
run); `check_available` says so clearly if a later torch drops them.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..model.layers import gelu_tanh
from ..model.moe import Experts
from .modules import is_quantized


class DynamicInt8Error(ValueError):
    """The model or the machine cannot run dynamic int8 matmuls; the message says why and what to do."""


def check_available() -> None:
    ops = getattr(torch.ops, "quantized", None)
    if ops is None or not all(hasattr(ops, op) for op in ("linear_prepack", "linear_dynamic")):
        raise DynamicInt8Error("this torch build has no quantized linear ops (torch.ops.quantized.linear_dynamic); "
                               "run without --int8-dynamic")
    if not {"fbgemm", "x86", "onednn"} & set(torch.backends.quantized.supported_engines):
        raise DynamicInt8Error("no x86 int8 GEMM engine in this torch build (needs fbgemm, x86 or onednn); "
                               "run without --int8-dynamic")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float weight -> packed int8 (symmetric, one scale per output row)."""
    w = weight.detach().float().contiguous()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # the deprecation notice of quantized tensors (see the module docstring)
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated", category=UserWarning)
        q = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.int64), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


def _has_vnni() -> bool:
    """x86 with VNNI (int8 dot products accumulated in int32): the GEMM cannot saturate, so activations can use
    all 8 bits. Without it the int16 intermediate sums can overflow, and activations get 7 bits (reduce_range)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


REDUCE_RANGE = not _has_vnni()


def matmul(x: torch.Tensor, packed) -> torch.Tensor:
    """x [..., in] -> x @ W.t() [..., out] in fp32 through the int8 GEMM (activations quantized per call)."""
    return torch.ops.quantized.linear_dynamic(x.float().contiguous(), packed, REDUCE_RANGE)


class DynamicInt8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise DynamicInt8Error("dynamic int8 linear layers here take no bias (DiffusionGemma has none)")
        self.reference = linear
        self.packed = pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.packed).to(x.dtype)


class DynamicInt8Experts(Experts):
    """The stacked experts with one packed int8 matrix per expert and projection (Experts' loop dispatch)."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.reference = experts
        self.packed_gate_up = [pack(w) for w in experts.gate_up_proj]
        self.packed_down = [pack(w) for w in experts.down_proj]

    @property
    def gate_up_proj(self):  # Experts.forward reads the expert count from it
        return self.reference.gate_up_proj

    @property
    def down_proj(self):
        return self.reference.down_proj

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = matmul(x, self.packed_gate_up[e]).chunk(2, dim=-1)
        return matmul(gelu_tanh(gate) * up, self.packed_down[e]).to(x.dtype)


HEAD_COLUMNS = 4096  # vocabulary columns per int8 head call (see _Head)


class _Head:
    """The tied head's logits through packed int8 copies of the embedding: `normed @ embed.t()` HEAD_COLUMNS
    vocabulary entries per call, each block soft-capped into `out` (or a new tensor) while it is in cache.

    Blocks: one call over the whole vocabulary returns a [rows, V] fp32 tensor and, inside FBGEMM, an int32 one as
    large: 32 MiB each for one 256-position canvas row at V = 32,768, which glibc serves with fresh mmaps whose
    pages the kernel zeroes fault by fault, every step (bench/logits_buffers.py). Blocks of 4,096 columns stay under
    that (up to 7 canvas rows) and reuse the heap's memory. Every call quantizes the same activations the same way
    and each output column is its own dot product, so the blocks give the product's bits of one call.

    Soft-cap: cap * tanh(z / cap) as 2 cap * sigmoid(2 z / cap) - cap, the same function; torch's CPU tanh is
    about 3x slower than its sigmoid (10 of a 190 ms int8 step on `small`, [256, 32768]). It differs from the
    float path's tanh by up to ~1e-5 (8e-6 measured at |z| <= 20): below the int8 product's own error, so only
    this approximate path takes it; the float head keeps the reference's tanh (model/layers.py softcap)."""

    def __init__(self, weight: torch.Tensor, cap: float | None):
        self.vocab, self.cap = weight.shape[0], cap
        self.blocks = [(c0, min(c0 + HEAD_COLUMNS, self.vocab), pack(weight[c0:c0 + HEAD_COLUMNS]))
                       for c0 in range(0, self.vocab, HEAD_COLUMNS)]

    def __call__(self, normed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(*normed.shape[:-1], self.vocab, dtype=torch.float32)
        flat, x, cap = out.view(-1, self.vocab), normed.reshape(-1, normed.shape[-1]), self.cap
        for c0, c1, packed in self.blocks:
            block, dst = matmul(x, packed), flat[:, c0:c1]
            if cap is None:
                dst.copy_(block)
            else:
                torch.sigmoid(block.mul_(2 / cap), out=dst).mul_(2 * cap).sub_(cap)
        return out


class _SoftProduct:
    """The self-conditioning product softmax(ℓ̃) @ E through a packed int8 copy of E^T (one scale per hidden
    channel). Each row's probabilities go in divided by the row's largest one, as exp(ℓ̃ - max ℓ̃): values in
    [0, 1] with a 1 in every row, so the call's one activation scale suits every row; the product is then divided
    by the row's sum of them. A probability under half a quantization step of its row's largest counts as 0 (1/510
    of it with 8-bit activations, 1/254 with 7, see REDUCE_RANGE)."""

    def __init__(self, weight: torch.Tensor):
        self.packed = pack(weight.t())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        ratios = (logits - logits.amax(-1, keepdim=True)).exp_()
        return matmul(ratios, self.packed) / ratios.sum(-1, keepdim=True)


def apply(model: nn.Module) -> nn.Module:
    """Swap the int8 stand-ins into a float32 CPU model, in place; returns the model. Inference only."""
    check_available()
    w = model.embed_tokens.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        raise DynamicInt8Error(f"dynamic int8 runs on CPU float32 models; this one is {w.dtype} on {w.device.type} "
                               "(load with --dtype float32 --device cpu, or drop --int8-dynamic)")
    if active(model):
        raise DynamicInt8Error("the model already runs dynamic int8 matmuls")
    swapped = 0
    for name, child in list(model.named_modules()):
        if type(child) is nn.Linear and is_quantized(f"{name}.weight"):
            new = DynamicInt8Linear(child)
        elif type(child) is Experts and is_quantized(f"{name}.gate_up_proj"):
            new = DynamicInt8Experts(child)
        else:
            continue
        model.set_submodule(name, new)
        swapped += 1
    if not swapped:
        raise DynamicInt8Error("found no float projections to swap (a weight-only quantized checkpoint already "
                               "runs its own int kernels); load a full-precision model for --int8-dynamic")
    model.head_logits = _Head(w, model.config.final_logit_softcapping)
    model.soft_product = _SoftProduct(w)
    return model


def active(model: nn.Module) -> bool:
    """Whether `apply` has swapped the int8 stand-ins into the model (and `restore_float` has not undone it)."""
    return any(isinstance(m, (DynamicInt8Linear, DynamicInt8Experts)) for m in model.modules())


def restore_float(model: nn.Module) -> nn.Module:
    """Undo `apply`: the float modules back in place, the float head and self-conditioning products."""
    for name, child in list(model.named_modules()):
        if isinstance(child, (DynamicInt8Linear, DynamicInt8Experts)):
            model.set_submodule(name, child.reference)
    model.head_logits = model.soft_product = None
    return model
