"""`dgemma train` flags -> TrainConfig -> train(). `add_train_parser` registers the subcommand on the main CLI.
Data parallel is the same command under torchrun: `torchrun --nproc_per_node 2 -m dgemma train --data ... --out ...`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..argtypes import positive_int
from .config import COMPILE_MODES


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train or fine-tune with the block-diffusion objective (spec §7)",
                              description="Train a DiffusionGemma model on JSONL data (chat 'messages' or "
                                          "'prompt'/'completion' records, plain text with 'raw': true or --raw). "
                                          "Writes checkpoints, log.jsonl, loss.png and the final model (Hugging "
                                          "Face layout) to OUT/model under --out (LoRA: merged; OUT/adapter alone).")
    g = p.add_argument_group("model")
    g.add_argument("--config", help="config.json (or a directory with one): train from scratch")
    g.add_argument("--model", help="model directory to fine-tune")
    g.add_argument("--mode", choices=["scratch", "full", "lora"], default=None,
                   help="default: scratch with --config, full with --model")
    g.add_argument("--tokenizer", help="tokenizer directory (default: --model; required from scratch)")
    g.add_argument("--freeze-router", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze the MoE routers (default: frozen when fine-tuning, trained from scratch)")
    g.add_argument("--lora-rank", type=positive_int, default=8, help="rank r of each adapter (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0,
                   help="adapter scale: the update is alpha / r times B A x (default 16)")
    g.add_argument("--lora-targets", default="attention,mlp",
                   help="comma-separated: attention, mlp, self_conditioning, experts")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", help="training JSONL file (repeatable)")
    g.add_argument("--eval-data", action="append", default=[], help="held-out JSONL file (repeatable)")
    g.add_argument("--eval-holdout", type=int, default=0, help="hold out N training examples for evaluation")
    g.add_argument("--raw", action="store_true", help="prompt/completion records are plain text (no chat template)")
    g.add_argument("--max-seq-len", type=positive_int, default=None, help="prompt + padded response limit")
    g.add_argument("--on-too-long", choices=["truncate", "drop", "error"], default="truncate",
                   help="an example past --max-seq-len: keep the canvases that fit (truncate, the default), drop it, "
                        "or stop with an error")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps (default 1000; with --time-budget: at most; with --resume alone: a new total)")
    g.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="fit the run into this much wall time: the step count is fixed after "
                        "the first steps are timed (needs --warmup >= 20); logged, and saved in train_config.json")
    g.add_argument("--batch-size", type=positive_int, default=8, help="examples per step, over all ranks (default 8)")
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="split each step's batch into N micro-batches (same update, less memory; default 1)")
    g.add_argument("--lr", type=float, default=1.5e-4,
                   help="peak learning rate, AdamW (default 1.5e-4; tiny models from scratch like ~1e-3)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine decay ends at lr times this (default 0.1)")
    g.add_argument("--warmup", type=int, default=0, help="warm-up steps of the learning rate (default 0)")
    g.add_argument("--weight-decay", type=float, default=1e-4,
                   help="AdamW weight decay, on matrices only (default 1e-4)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.95, 0.99), metavar=("BETA1", "BETA2"),
                   help="AdamW betas (default 0.95 0.99)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (default 1.0)")
    g.add_argument("--ar-weight", type=float, default=1.0, help="weight of the encoder's next-token loss (0: off)")
    g.add_argument("--self-cond-prob", type=float, default=0.5,
                   help="probability that an example is trained with a self-conditioning signal (default 0.5, "
                        "spec §7)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and initialisation (default 0)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype: bfloat16 = autocast with fp32 master weights (LoRA: the frozen base stays as "
                        "stored); default float32")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="on CUDA, keep fp32 matmuls in full fp32 (default: TF32 tensor cores, ~10 mantissa bits)")
    g.add_argument("--data-workers", type=int, default=None, metavar="N",
                   help="processes that prepare batches (collation, noise) ahead of the step (default: 1 on CUDA, "
                        "where it hides the host's share of the step; 0 on CPU, where it would take the trainer's "
                        "cores)")
    g.add_argument("--compile", nargs="?", const="default", default="", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the layers (fewer, fused kernels per step: for GPUs, where the step is bound "
                        "by launching operators; the first steps compile, minutes). MODE: torch.compile's mode, "
                        f"one of {', '.join(COMPILE_MODES)} (default: default)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--eval-every", type=int, default=0,
                   help="steps between evaluations on the held-out data (default 0: only at the end)")
    g.add_argument("--save-every", type=int, default=0,
                   help="steps between resumable checkpoints (default 0: only at the end)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=2,
                   help="resumable checkpoints kept, the latest ones (default 2)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out; without "
                                                         "--data, reuses --out's train_config.json (only --steps "
                                                         "may change)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return p


def _explicit_flags(args) -> set[str]:
    """The `dgemma train` options whose value differs from the parser's default (those the user set)."""
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    defaults = vars(parser.parse_args(["train", "--out", str(args.out)]))
    return {name for name, value in vars(args).items() if name in defaults and value != defaults[name]}


def config_from_args(args):
    from .loss import LossConfig
    from .train import TrainConfig

    if args.resume and not args.data:  # `--out DIR --resume`: the saved run, as it was configured
        saved = Path(args.out) / "train_config.json"
        if not saved.is_file():
            raise ValueError(f"{saved} not found: pass --data and the model flags to start a run")
        given = sorted(_explicit_flags(args) - {"out", "resume", "steps", "no_progress"})
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"--resume without --data continues the run saved in {saved}, which {flags} would not "
                             "change; pass --data and the model flags too to resume with new settings")
        raw = json.loads(saved.read_text())
        raw.update(out=args.out, resume=True, progress=not args.no_progress)  # --out: the run may have been moved
        if args.steps is not None:
            raw["steps"] = args.steps
        return TrainConfig.from_json(raw)
    if not args.data:
        raise ValueError("no training data: pass --data FILE.jsonl")
    mode = args.mode or ("scratch" if args.config else "full")
    lora_flags = sorted({"lora_rank", "lora_alpha", "lora_targets"} & _explicit_flags(args))
    if mode != "lora" and lora_flags:
        raise ValueError(f"{', '.join('--' + f.replace('_', '-') for f in lora_flags)} only apply to --mode lora "
                         f"(this run is --mode {mode})")
    return TrainConfig(
        data=tuple(args.data), out=args.out, init=mode, model=args.model, config=args.config,
        tokenizer=args.tokenizer, eval_data=tuple(args.eval_data), eval_holdout=args.eval_holdout, raw=args.raw,
        max_seq_len=args.max_seq_len, on_too_long=args.on_too_long,
        steps=TrainConfig.steps if args.steps is None else args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, betas=tuple(args.betas), grad_clip=args.grad_clip,
        freeze_router=args.freeze_router,
        loss=LossConfig(ar_weight=args.ar_weight, self_cond_prob=args.self_cond_prob),
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        eval_every=args.eval_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, dtype=args.dtype, tf32=args.tf32, compile=args.compile, data_workers=args.data_workers,
        device=args.device, resume=args.resume,
        progress=not args.no_progress,
        time_budget=args.time_budget)


def cmd_train(args) -> int:
    from .train import train

    result = train(config_from_args(args))
    if result.eval_metrics is not None and args.no_progress is False:
        print(f"eval loss {result.eval_metrics['loss']:.4f}", file=sys.stderr)
    return 0
