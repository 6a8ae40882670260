"""The lean sampler step's kernel count and time under the CPU and the accelerator work-buffer budgets.

    python bench/sampler_ops.py [--vocab 262144] [--canvas 256] [--batch 1] [--device cpu|cuda] [--reps 5]

`sampling/lean.py` walks the [B*L, V] logits in chunks of positions, each chunk ~40 operator calls whatever its size.
Its budgets (CHUNK_BYTES / BLOCK_BYTES, and sampler.ENTROPY_COLUMNS for fast mode's entropy) are per device type:
small on a CPU (the chunk stays in cache), large on an accelerator, where every call is a kernel launch. For each
budget this prints the positions per chunk, the ATen calls of one step (torch.profiler, top level; views included,
so an upper bound on kernel launches) and, with --reps > 0, the median wall time of one step on --device (after one
warm-up). Both budgets run on the same device, so on a GPU the time column is the change that the accelerator budget
buys there. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import device_arg, hardware, sync  # noqa: E402

from dgemma.argtypes import non_negative_int, positive_int  # noqa: E402
from dgemma.sampling import lean  # noqa: E402
from dgemma.sampling import sampler as S  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=positive_int, default=262_144)
    p.add_argument("--canvas", type=positive_int, default=256)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--reps", type=non_negative_int, default=5, help="timed steps per budget (0: count only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def one_step(logits: torch.Tensor, state: S.DenoiseState, cfg: S.StepConfig, chunk: int) -> None:
    lean.step_lean(logits, state, cfg, torch.Generator(logits.device).manual_seed(1), chunk=chunk)


def measure(args, budget: str, state, cfg, dev) -> dict:
    """One budget's row: the lean step with that budget's chunk and column block, on `dev`."""
    saved = dict(lean.CHUNK_BYTES), dict(lean.BLOCK_BYTES), dict(S.ENTROPY_COLUMNS)
    kind = lean.device_kind(dev)  # the entry step_lean reads on this device
    lean.CHUNK_BYTES[kind], lean.BLOCK_BYTES[kind] = saved[0][budget], saved[1][budget]
    S.ENTROPY_COLUMNS[kind] = saved[2][budget]
    try:
        chunk = lean.default_chunk(args.vocab, dev)
        shape = (args.batch, args.canvas, args.vocab)
        fresh = torch.randn(shape, generator=torch.Generator(dev).manual_seed(2), device=dev)
        one_step(fresh.clone(), state, cfg, chunk)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step(fresh.clone(), state, cfg, chunk)
            sync(dev)
        calls = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None
                    and e.name != "aten::clone")
        times = []
        for _ in range(args.reps):
            x = fresh.clone()
            sync(dev)
            t0 = time.perf_counter()
            one_step(x, state, cfg, chunk)
            sync(dev)
            times.append(time.perf_counter() - t0)
        ms = round(statistics.median(times) * 1e3, 2) if times else None
        return {"budget": budget, "chunk_positions": chunk, "aten_calls": calls, "ms_per_step": ms}
    finally:
        lean.CHUNK_BYTES.update(saved[0])
        lean.BLOCK_BYTES.update(saved[1])
        S.ENTROPY_COLUMNS.update(saved[2])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = S.StepConfig(num_steps=16, sample=S.sample_inverse_cdf)
    g = torch.Generator(dev).manual_seed(0)
    state = S.init_state(S.init_canvas(args.batch, args.canvas, args.vocab, g, device=dev), cfg)
    sc = torch.randn(args.batch, args.canvas, args.vocab, generator=g, device=dev)
    state = dataclasses.replace(state, sc_logits=sc)  # a later step: the self-conditioning merge runs too
    print(f"lean sampler step, fast mode, B={args.batch} L={args.canvas} V={args.vocab:,} on {hardware(dev)}")
    rows = [measure(args, budget, state, cfg, dev) for budget in ("cpu", "accelerator")]
    print(f"{'budget':<12}{'positions/chunk':>16}{'ATen calls':>12}{'ms/step':>10}")
    for r in rows:
        print(f"{r['budget']:<12}{r['chunk_positions']:>16}{r['aten_calls']:>12}{str(r['ms_per_step']):>10}")
    print(json.dumps({"bench": "sampler_ops", "device": hardware(dev), "batch": args.batch, "canvas": args.canvas,
                      "vocab": args.vocab, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
