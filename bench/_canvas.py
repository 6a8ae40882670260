"""One fixed-step canvas on a bench config with random weights: the shared setup, run and report envelope of the
CPU benches that time variants of the same canvas (int8_parts.py, logits_buffers.py); `run` also serves
step_profile.py (any device)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import json

import torch

from _common import hardware, read_config
from vs_reference import build, random_prompt

from dgemma.argtypes import positive_int


def parse(description: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="small", help="a bench/configs name or a path (default small)")
    p.add_argument("--steps", type=positive_int, default=16,
                   help="denoising steps of the canvas (default 16, fast's budget)")
    p.add_argument("--reps", type=positive_int, default=5, help="measured reps, after one warm-up (default 5)")
    p.add_argument("--prompt-len", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def setup(args):
    """-> (config label, engine at the fast preset's knobs, prompt ids [1, prompt_len]) for `args`."""
    label, raw = read_config(args.config)
    with tempfile.TemporaryDirectory(prefix="dgemma-canvas-bench-") as tmp:
        ref, engine = build(raw, args.seed, torch.float32, torch.device("cpu"), Path(tmp))
    del ref
    engine.use_preset("fast")
    return label, engine, random_prompt(raw, engine.config.vocab_size, 1, args.prompt_len, args.seed)


def run(engine, ids: torch.Tensor, args, canvases: int = 1, sampling: str = "fast") -> None:
    """`canvases` canvases of `args.steps` fixed steps each (no stop rule, no stop id), seeded with `args.seed`."""
    engine.generate(ids.clone(), max_new_tokens=canvases * engine.config.canvas_length, max_denoising_steps=args.steps,
                    eos_token_id=None, stability_threshold=None, confidence_threshold=None, sampling=sampling,
                    generator=torch.Generator(device=engine.device).manual_seed(args.seed))


def title(label: str, args, length: int) -> str:
    return f"{label}, {args.steps} steps, one {length}-token canvas, {hardware(torch.device('cpu'))}"


def result(bench: str, label: str, args, rows: dict) -> dict:
    """The bench's JSON line (printed) and return value: its name, the setup and the variants' rows."""
    out = {"bench": bench, "config": label, "steps": args.steps, "reps": args.reps,
           "threads": torch.get_num_threads(), "hardware": hardware(torch.device("cpu")), "variants": rows}
    print(json.dumps(out))
    return out
