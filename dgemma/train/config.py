"""What a training run is: `TrainConfig` (every knob, validated, saved as train_config.json), `TrainResult`, and the
pure schedule functions (`learning_rate`, `fit_steps_to_budget`) that make a run a function of (config, step)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..model.compiling import COMPILE_MODES
from .loss import LossConfig

MODES = ("scratch", "full", "lora")
CALIBRATION_STEPS = 20  # with a time budget, the step count is fixed after this many steps (the first 3 untimed)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# what a resumed run must share with the original for the resume to be exact (the rest may change, e.g. steps)
SAME_ON_RESUME = ("init", "model", "config", "tokenizer", "data", "raw", "max_seq_len", "on_too_long",
                  "eval_holdout", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                  "betas", "grad_clip", "freeze_router", "seed", "loss", "lora_rank", "lora_alpha", "lora_targets",
                  "dtype")


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...]  # JSONL file(s), see data.py
    out: str  # output directory
    init: str = "scratch"  # scratch (random init from `config`) | full (fine-tune `model`) | lora (adapters on it)
    model: str | None = None  # model directory for full / lora
    config: str | None = None  # config.json (or a directory holding one) for scratch
    tokenizer: str | None = None  # tokenizer directory; default: `model` (required for scratch)
    eval_data: tuple[str, ...] = ()
    eval_holdout: int = 0  # examples of `data` held out for evaluation (seeded)
    raw: bool = False  # prompt/completion records without a "raw" key are plain text
    max_seq_len: int | None = None  # prompt + padded response; default the model's max_position_embeddings
    on_too_long: str = "truncate"  # truncate | drop | error
    steps: int = 1000
    batch_size: int = 8  # global examples per optimizer step
    grad_accum: int = 1
    lr: float = 1.5e-4  # NeMo's SFT recipe (spec §7); from scratch, tiny models like ~1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 1e-4  # matrices only, not norms/scales
    betas: tuple[float, float] = (0.95, 0.99)
    grad_clip: float = 1.0
    freeze_router: bool | None = None  # None: frozen for full/lora fine-tunes (as NeMo), trained from scratch
    loss: LossConfig = field(default_factory=LossConfig)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attention", "mlp")
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    seed: int = 0
    dtype: str = "float32"  # bfloat16 = autocast with fp32 masters (a LoRA base stays as stored)
    tf32: bool = True  # on CUDA, fp32 matmuls/convolutions use TF32 tensor cores (no effect on CPU)
    compile: str = ""  # "": eager; else a torch.compile mode (COMPILE_MODES) for each layer (train.compile_layers)
    device: str | None = None  # default cuda when available
    resume: bool = False  # continue from the latest checkpoint in `out` (start fresh if there is none)
    progress: bool = True
    data_workers: int | None = None  # processes preparing batches ahead (train/batches.py); None: 1 on CUDA, else 0
    time_budget: float = 0.0  # seconds of wall time for the whole run: see `fit_steps_to_budget` (0: off)

    def __post_init__(self):
        for name in ("data", "eval_data", "lora_targets", "betas"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, os.PathLike)) else tuple(value))
        # paths as absolute strings: train_config.json (what --resume reads) and the adapter's base_model then name
        # the same files from any working directory, and a pathlib.Path is saved as JSON like a str
        object.__setattr__(self, "out", os.fspath(self.out))
        for name in ("data", "eval_data"):
            object.__setattr__(self, name, tuple(os.path.abspath(p) for p in getattr(self, name)))
        for name in ("model", "config", "tokenizer"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.path.abspath(getattr(self, name)))
        if self.init not in MODES:
            raise ValueError(f"init must be one of {MODES}, got {self.init!r}")
        if self.init == "scratch" and (self.config is None or self.tokenizer is None):
            raise ValueError("training from scratch needs config (a config.json) and tokenizer (a directory with "
                             "tokenizer.json)")
        if self.init != "scratch" and self.model is None:
            raise ValueError(f"init={self.init!r} fine-tunes a model: pass model (a model directory)")
        if self.init == "scratch" and self.model is not None:  # was ignored: random weights, not the model's
            raise ValueError(f"init='scratch' trains random weights shaped by config, so model {self.model} would be "
                             "ignored; drop config (--config) to fine-tune the model (--mode full or lora), or drop "
                             "model (--model) to train from scratch")
        if self.init != "scratch" and self.config is not None:  # was ignored: the model's own config.json is used
            raise ValueError(f"init={self.init!r} fine-tunes model {self.model} with its own config.json, so config "
                             f"{self.config} would be ignored; drop config (--config)")
        if self.init == "lora" and self.freeze_router is False:
            raise ValueError("init='lora' trains adapters only, never the router; drop freeze_router=False "
                             "(--no-freeze-router) or fine-tune with init='full'")
        if not self.data:
            raise ValueError("no training data: pass at least one JSONL file")
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "lora_rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("eval_every", "save_every", "warmup_steps", "eval_holdout"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.eval_every and not (self.eval_data or self.eval_holdout):
            raise ValueError(f"eval_every={self.eval_every} has nothing to evaluate: pass eval_data (--eval-data FILE) "
                             "or eval_holdout (--eval-holdout N)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}")
        infinite = [f"{name}={getattr(self, name)}" for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip",
                                                                "time_budget")
                    if not math.isfinite(getattr(self, name))]
        if infinite:
            raise ValueError(f"need finite numbers, got {', '.join(infinite)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0, grad_clip > 0; got "
                             f"lr={self.lr}, min_lr_ratio={self.min_lr_ratio}, weight_decay={self.weight_decay}, "
                             f"grad_clip={self.grad_clip}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if isinstance(self.compile, bool):  # compile=True: the default mode
            object.__setattr__(self, "compile", "default" if self.compile else "")
        if self.compile not in ("", *COMPILE_MODES):
            raise ValueError(f"compile must be '' (off) or one of {COMPILE_MODES}, got {self.compile!r}")
        if self.data_workers is not None and (not isinstance(self.data_workers, int) or self.data_workers < 0):
            raise ValueError(f"data_workers must be an integer >= 0 (or None: 1 on CUDA), got {self.data_workers!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.time_budget < 0 or (self.time_budget and self.warmup_steps < CALIBRATION_STEPS):
            raise ValueError(f"time_budget (seconds, got {self.time_budget}) needs warmup_steps >= {CALIBRATION_STEPS} "
                             "so the calibration steps' learning rate does not depend on the final step count")

    def data_workers_for(self, device: torch.device) -> int:
        return (1 if device.type == "cuda" else 0) if self.data_workers is None else self.data_workers

    @property
    def router_frozen(self) -> bool:
        return self.init != "scratch" if self.freeze_router is None else self.freeze_router

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in raw.items() if k in known}, "loss": LossConfig(**raw.get("loss", {}))})


@dataclass
class TrainResult:
    out: Path
    model_dir: Path  # the final model (HF layout)
    step: int
    metrics: dict  # last step's train metrics
    eval_metrics: dict | None


def fit_steps_to_budget(cfg: TrainConfig, step: int, elapsed: float, step_seconds: list[float]) -> int:
    """The step count that fits the rest of `cfg.time_budget`, at most `cfg.steps`: measured seconds per step
    (median of the timed calibration steps), 10% + 10 s kept for evaluations, checkpoints and the export.
    The run then goes on exactly as `--steps N` would (the warm-up, which covers the calibration steps, does not
    depend on N), so the logged N reproduces it."""
    per_step = sorted(step_seconds)[len(step_seconds) // 2]
    spare = 0.9 * (cfg.time_budget - elapsed) - 10.0
    return max(step, min(cfg.steps, step + int(spare / per_step)))


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from lr to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
