"""Low-rank adapters (LoRA): train a few million parameters on top of a frozen DiffusionGemma, then fold them in.

    y = W x + (alpha / r) · B (A dropout(x))       A [r, in] small random, B [out, r] = 0  =>  unchanged at init

Where adapters go (`targets`):
* "attention"         q/k/v/o projections of every layer (full layers have no v_proj: their value IS the k_proj
                      output, so the k_proj adapter moves both keys and values there, and the merge stays exact);
* "mlp"               the dense MLP (the "shared expert") gate/up/down of every layer;
* "self_conditioning" the self-conditioning MLP gate/up/down (only runs on denoising steps that have a signal);
* "experts"           per-expert adapters on the stacked tensors: gate_up_proj [E,2I,D] gets A [E,r,D], B [E,2I,r];
                      down_proj [E,D,I] gets A [E,r,I], B [E,D,r]. The MoE's grouped dispatch and its reference loop
                      both call `Experts.expert(e, x)`, so an `Experts` subclass that overrides `expert` is picked up
                      by both with no change to moe.py. Training the experts is optional (most of the model's bytes).
The router is never adapted (NeMo's recipe keeps it frozen, spec §7).

Key names. Wrapping replaces a module by a subclass that holds the SAME Parameter objects under the same attribute
names, so the base keys (`layers.0.self_attn.q_proj.weight`, `layers.0.experts.gate_up_proj`, ...) are unchanged and
the loader/saver keep working; adapters are extra keys ending in `lora_A` / `lora_B`
(`...q_proj.lora_A`, `...experts.gate_up_proj_lora_A`). `merge_lora` folds them in and puts the plain classes back,
so the state_dict keys equal a fresh module's and `dgemma.model.saving.save_checkpoint` exports it.

Adapter tensors are fp32 by default (fp32 "masters" even when the base is bf16); the update is computed in the
adapter dtype and added to the base output in the activation dtype.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..config import (ADAPTER_CONFIG_FILE, ADAPTER_FORMAT, ADAPTER_SHAPE_KEYS, ModelConfig, adapter_base,
                      model_chain, read_adapter_config)
from .layers import gelu_tanh
from .moe import Experts
from .saving import save_safetensors

TARGETS = ("attention", "mlp", "self_conditioning", "experts")
ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", ADAPTER_CONFIG_FILE


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention", "mlp")
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise ValueError(f"unknown LoRA target(s) {unknown or targets!r}; choose from {list(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))  # canonical order, no repeats

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _init_a(shape, fan_in: int, generator, like: torch.Tensor, dtype) -> nn.Parameter:
    """U(-1/sqrt(in), 1/sqrt(in)): what kaiming_uniform(a=sqrt(5)) gives a Linear; drawn on CPU so a CPU
    generator seeds it on any device."""
    a = (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) / math.sqrt(fan_in)
    return nn.Parameter(a.to(device=like.device, dtype=dtype))


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """(alpha/r) · B (A x) for x [..., in], A [r, in], B [out, r], computed in the adapter dtype -> [..., out]."""
    return F.linear(F.linear(x.to(a.dtype), a), b) * scaling


class LoRALinear(nn.Linear):
    """nn.Linear with a trainable low-rank update; `weight` (and `bias`) are the wrapped layer's own Parameters."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig, target: str, generator=None, dtype=torch.float32):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # same objects: same keys, no copy
        self.cfg, self.target = cfg, target
        self.lora_dropout = _dropout(cfg.dropout)
        self.lora_A = _init_a((cfg.rank, base.in_features), base.in_features, generator, base.weight, dtype)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.rank, device=base.weight.device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + _low_rank(self.lora_dropout(x), self.lora_A, self.lora_B, self.cfg.scaling).to(out.dtype)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + (alpha/r) B A (the same Parameter object, updated in place)."""
        _fold(self.weight, self.lora_B[None], self.lora_A[None], self.cfg.scaling)
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain


class LoRAExperts(Experts):
    """Stacked experts with one low-rank update per expert and per tensor; reached through `expert(e, x)`, which
    both the grouped dispatch and the per-token reference loop call."""

    def __init__(self, base: Experts, cfg: LoRAConfig, target: str, generator=None, dtype=torch.float32):
        E, two_i, D = base.gate_up_proj.shape
        I = base.down_proj.shape[-1]
        with torch.device("meta"):  # placeholders only; the base's Parameters replace them just below
            super().__init__(E, D, I)
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.cfg, self.target = cfg, target
        self.lora_dropout = _dropout(cfg.dropout)
        r, w = cfg.rank, base.gate_up_proj
        self.gate_up_proj_lora_A = _init_a((E, r, D), D, generator, w, dtype)
        self.gate_up_proj_lora_B = nn.Parameter(torch.zeros(E, two_i, r, device=w.device, dtype=dtype))
        self.down_proj_lora_A = _init_a((E, r, I), I, generator, w, dtype)
        self.down_proj_lora_B = nn.Parameter(torch.zeros(E, D, r, device=w.device, dtype=dtype))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x [n,D] -> [n,D]: Experts.expert's formula with each projection's update added."""
        s = self.cfg.scaling
        gate_up = x @ self.gate_up_proj[e].t()
        gate_up = gate_up + _low_rank(self.lora_dropout(x), self.gate_up_proj_lora_A[e], self.gate_up_proj_lora_B[e],
                                      s).to(gate_up.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        h = gelu_tanh(gate) * up
        out = h @ self.down_proj[e].t()
        return out + _low_rank(self.lora_dropout(h), self.down_proj_lora_A[e], self.down_proj_lora_B[e],
                               s).to(out.dtype)

    def merged(self) -> Experts:
        _fold(self.gate_up_proj, self.gate_up_proj_lora_B, self.gate_up_proj_lora_A, self.cfg.scaling)
        _fold(self.down_proj, self.down_proj_lora_B, self.down_proj_lora_A, self.cfg.scaling)
        E, two_i, D = self.gate_up_proj.shape
        with torch.device("meta"):
            plain = Experts(E, D, two_i // 2)
        plain.gate_up_proj, plain.down_proj = self.gate_up_proj, self.down_proj
        return plain


@torch.no_grad()
def _fold(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float) -> None:
    """weight[e] <- weight[e] + scaling · b[e] @ a[e], in fp32 (fp64 for an fp64 weight), rounded once to the weight's
    dtype. weight [E,out,in] or [out,in] (then b, a carry a leading 1). One expert at a time keeps the fp32
    temporary to one matrix."""
    w = weight if weight.dim() == 3 else weight[None]
    acc = torch.promote_types(w.dtype, torch.float32)
    for e in range(w.shape[0]):
        update = b[e].to(acc) @ a[e].to(acc)
        w[e].copy_((w[e].to(acc) + scaling * update).to(w.dtype))


def _sites(model, targets):
    """(parent module, attribute name, target) for every module an adapter goes on, in a fixed order."""
    for target in targets:
        if target == "self_conditioning":
            yield from ((model.self_conditioning, n, target) for n in ("gate_proj", "up_proj", "down_proj"))
            continue
        for layer in model.layers:
            if target == "attention":
                names = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if getattr(layer.self_attn, n) is not None]
                yield from ((layer.self_attn, n, target) for n in names)
            elif target == "mlp":
                yield from ((layer.mlp, n, target) for n in ("gate_proj", "up_proj", "down_proj"))
            else:  # experts
                yield layer, "experts", target


def _adapters(model):
    """(qualified name, adapter module) for every adapter in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]


def apply_lora(model, rank: int = 8, alpha: float = 16, targets=("attention", "mlp"), dropout: float = 0.0, *,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze every base parameter and wrap the `targets` with adapters; returns the trainable parameter names.

    The model's output is unchanged until the adapters train (B = 0). `generator` (CPU) seeds A; None = global RNG."""
    cfg = LoRAConfig(rank, alpha, targets, dropout)
    if _adapters(model):
        raise ValueError("this model already has LoRA adapters; merge_lora() or start from a fresh model first")
    sites = list(_sites(model, cfg.targets))
    for parent, name, target in sites:  # check everything before changing anything
        base = getattr(parent, name)
        if type(base) is not (Experts if target == "experts" else nn.Linear):
            raise TypeError(f"cannot put a LoRA adapter on {type(base).__name__} ({target}); LoRA wraps plain "
                            "nn.Linear / Experts modules (apply it before swapping in quantized modules)")
    model.requires_grad_(False)
    for parent, name, target in sites:
        wrap = LoRAExperts if target == "experts" else LoRALinear
        setattr(parent, name, wrap(getattr(parent, name), cfg, target, generator, dtype))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lora_config(model) -> LoRAConfig:
    """The LoRAConfig the model's adapters were built with (read back from the adapters themselves)."""
    adapters = _adapters(model)
    if not adapters:
        raise ValueError("this model has no LoRA adapters (call apply_lora first)")
    cfg = adapters[0][1].cfg
    return LoRAConfig(cfg.rank, cfg.alpha, tuple({m.target for _, m in adapters}), cfg.dropout)


def merge_lora(model):
    """Fold every adapter into its base weight (exact fp32 sum, one rounding to the weight dtype) and put the plain
    modules back: afterwards the state_dict keys equal a fresh module's. Base parameters stay frozen
    (requires_grad False) as apply_lora left them. Returns the model."""
    adapters = _adapters(model)
    if not adapters:
        raise ValueError("this model has no LoRA adapters to merge")
    for qualified, module in adapters:
        model.set_submodule(qualified, module.merged())
    return model


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """Adapter tensors only, keyed as in model.state_dict() (e.g. `layers.0.self_attn.q_proj.lora_A`)."""
    out = {}
    for qualified, module in _adapters(model):
        for name, p in module.named_parameters(recurse=False):
            if "lora_" in name:
                out[f"{qualified}.{name}"] = p.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model that has the same adapters (apply_lora with the same config first)."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter state does not match this model's adapters: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); "
                         "apply_lora with the same rank/targets as the saved adapter")
    for key, tensor in own.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ValueError(f"adapter {key}: shape {tuple(state_dict[key].shape)} in the state, "
                             f"{tuple(tensor.shape)} in the model (different rank?)")
        tensor.copy_(state_dict[key])


def save_adapter(model, directory: str | Path, *, base_model: str | None = None,
                 generation_config: dict | None = None) -> Path:
    """Write adapter.safetensors (adapter tensors only) and adapter_config.json (rank, alpha, targets, base model;
    an existing base directory is recorded as an absolute path), and generation_config.json when given. `dgemma.load`
    and every --model flag load the directory as its base model with the adapter merged in (`load_merged`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = lora_config(model)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_safetensors(tensors, directory / ADAPTER_FILE, metadata={"format": "pt"})
    if base_model is not None and Path(base_model).is_dir():
        base_model = os.path.abspath(base_model)
    meta = {"format": ADAPTER_FORMAT, **asdict(cfg), "targets": list(cfg.targets), "base_model": base_model,
            "base_shape": {k: getattr(model.config, k) for k in ADAPTER_SHAPE_KEYS}}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return directory


def load_adapter(model, directory: str | Path, *, dtype: torch.dtype = torch.float32) -> list[str]:
    """apply_lora with the saved config, then load the saved adapter tensors (resume or reuse an export)."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    names = apply_lora(model, meta["rank"], meta["alpha"], tuple(meta["targets"]), meta["dropout"], dtype=dtype,
                       generator=torch.Generator())  # A is overwritten just below: leave the global RNG alone
    try:
        load_lora_state_dict(model, load_file(directory / ADAPTER_FILE))
    except ValueError as e:  # the adapter's own files disagree (edited or mixed up): say which, not "apply_lora"
        raise ValueError(f"{directory / ADAPTER_FILE} does not hold the adapter its adapter_config.json describes "
                         f"(rank {meta['rank']}, targets {list(meta['targets'])}) on this base model: "
                         f"{str(e).split('; apply_lora')[0]}; the two files must come from the same dgemma train "
                         "run (RUN/adapter or RUN/checkpoints/step-N)") from None
    return names


def load_merged(directory: str | Path, *, dtype: torch.dtype | None = None, device=None, quiet: bool = False):
    """A LoRA adapter directory as a plain model: its base model (`config.adapter_base`) with the adapter put on it
    and folded in by `merge_lora`, the fold `dgemma train` writes RUN/model with, in `dtype` (None: the base's stored
    one). The fold is done in the stored dtype when `dtype` is narrower (an fp32 base asked for in bf16), then each
    weight is rounded once to `dtype`, so the weights are RUN/model's loaded in `dtype`, bit for bit (that path holds
    the stored-dtype model in memory for the fold)."""
    from .checkpoint import CheckpointError, list_tensors
    from .loading import QUANTIZATION_KEY, load_module, stored_float_bytes

    directory = Path(directory)
    ModelConfig.from_file(directory)  # the base exists and has the adapter's shape: said before any weight is read
    base = adapter_base(directory)
    infos, metadata = list_tensors(model_chain(base)[-1])
    if QUANTIZATION_KEY in metadata:
        raise CheckpointError(f"{directory} is a LoRA adapter on {base}, a quantized checkpoint; an adapter merges "
                              f"into full-precision weights: set \"base_model\" in {directory / CONFIG_FILE} to the "
                              "full-precision model (and quantize the merged model)")
    stored = stored_float_bytes(infos)
    wider = dtype is not None and stored and torch.finfo(max(stored, key=stored.get)).bits > torch.finfo(dtype).bits
    module = load_module(base, dtype=None if wider else dtype, device=device, quiet=quiet)  # an adapter base: merged
    load_adapter(module, directory)
    merge_lora(module)
    if wider:  # one rounding per weight, as load_module rounds what it loads
        rounded = {k: v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}
        module.load_state_dict(rounded, assign=True, strict=True)
        module.requires_grad_(False)
    return module
