"""dgemma on one GPU: the 26B-A4B config with random weights built directly on the device (nothing downloaded).

    python bench/gpu.py [--config 26b-a4b] [--dtype bf16] [--steps 16] [--batches 1,4] [--long-prompt 4096]

Scenarios, each after a warm-up, every canvas at exactly --steps denoising steps (adaptive stopping off):
  one_user     batch 1, short prompt, --canvases canvases: ms per decoder step, committed tok/s per canvas
  long_prompt  batch 1, --long-prompt tokens: the same plus the prefill, end-to-end tok/s
  batch_B      batch B (each of --batches above 1), short prompt: aggregate committed tok/s
  one_user_loop  one_user again with the MoE's per-expert loop instead of the grouped GEMM (what it buys)
"committed tok/s per canvas" = B x canvas / (steps x ms per step + the commit), the figure published engines
quote; "end to end" = new tokens / wall time including the prefill. Peak memory is torch's allocated peak.
Ends with one JSON line. Runs on CPU too (`--device cpu --config small`) for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import DTYPES, PeakMemory, StepCost, Timers, hardware, random_weights, read_config, sync  # noqa: E402

from dgemma.config import ModelConfig  # noqa: E402
from dgemma.engine.engine import Engine  # noqa: E402
from dgemma.model import DiffusionGemma, moe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="26b-a4b", help="bench config name (bench/configs) or a config.json path")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--canvases", type=int, default=2, help="canvases per run")
    p.add_argument("--short-prompt", type=int, default=32)
    p.add_argument("--long-prompt", type=int, default=4096)
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--sampling", default="fast", choices=["fast", "reference"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(raw: dict, dtype: torch.dtype, device: torch.device, seed: int) -> Engine:
    """Random weights made on the device in `dtype` (no fp32 copy, no host memory): matrices ~ N(0, 1/fan_in),
    the embedding ~ N(0, 0.02^2) (x sqrt(D) in the model), 1-D weights ~ U(0.5, 1.5), layer scalars 1."""
    config = ModelConfig.from_dict(raw)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            module = DiffusionGemma(config)
    finally:
        torch.set_default_dtype(default)
    module = module.to_empty(device=device)
    random_weights(module, torch.Generator(device=device).manual_seed(seed), 0.02, (0.5, 1.5), None)
    return Engine(module.eval().requires_grad_(False))


def run(eng: Engine, timers: Timers, args, batch: int, prompt: int, canvases: int, steps: int) -> dict:
    device, L = eng.device, eng.config.canvas_length
    g = torch.Generator().manual_seed(args.seed + prompt + batch)
    ids = torch.randint(3, min(eng.config.vocab_size, 255_000), (batch, prompt), generator=g).to(device)
    timers.events.clear()
    with PeakMemory(device) as mem:
        sync(device)
        t0 = time.perf_counter()
        eng.generate(ids, max_new_tokens=canvases * L, max_denoising_steps=steps, stability_threshold=None,
                     confidence_threshold=None, eos_token_id=None, sampling=args.sampling,
                     generator=torch.Generator(device=device).manual_seed(args.seed))
        sync(device)
        wall = time.perf_counter() - t0
    enc = sorted((e for e in timers.events if e[0] == "encoder"), key=lambda e: e[1])
    n_steps = sum(1 for e in timers.events if e[3])
    enc_time = sum(e[2] - e[1] for e in enc)
    ms_step = (wall - enc_time) / n_steps * 1e3
    commits = [(e[2] - e[1]) * 1e3 for e in enc[1:]]
    ms_commit = sum(commits) / len(commits) if commits else 0.0
    per_canvas_s = (steps * ms_step + ms_commit) / 1e3
    return {"batch": batch, "prompt": prompt, "canvases": canvases, "steps": n_steps, "wall_s": round(wall, 3),
            "ms_per_step": round(ms_step, 2),
            "ms_forward": round(sum(e[2] - e[1] for e in timers.events if e[0] == "decoder") / n_steps * 1e3, 2),
            "ms_prefill": round((enc[0][2] - enc[0][1]) * 1e3, 1) if enc else None, "ms_commit": round(ms_commit, 1),
            "tok_s_per_canvas": round(batch * L / per_canvas_s, 1),
            "tok_s_end_to_end": round(batch * canvases * L / wall, 1), "peak_bytes_above_model": mem.peak}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    label, raw = read_config(args.config)
    t0 = time.perf_counter()
    eng = build(raw, dtype, device, args.seed)
    sync(device)
    t_build = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in eng.module.parameters())
    print(f"built {label} on {hardware(device)}: {model_bytes / 1e9:.2f} GB of {args.dtype} weights in "
          f"{t_build:.1f} s", flush=True)
    timers = Timers(device)
    timers.wrap(eng.module, "soft_embedding", "decoder")
    timers.wrap(eng.module, "denoise", "decoder", step=True)
    timers.wrap(eng.module, "encode", "encoder")
    run(eng, timers, args, 1, args.short_prompt, 1, 2)  # warm-up: kernels, allocator, cuBLAS handles
    scenarios = {"one_user": (1, args.short_prompt), "long_prompt": (1, args.long_prompt)}
    for b in (int(x) for x in args.batches.split(",")):
        if b > 1:
            scenarios[f"batch_{b}"] = (b, args.short_prompt)
    results = {}
    for name, (batch, prompt) in scenarios.items():
        results[name] = run(eng, timers, args, batch, prompt, args.canvases, args.steps)
        print(name, json.dumps(results[name]), flush=True)
    moe.set_grouped_dispatch("off")
    try:
        results["one_user_loop"] = run(eng, timers, args, 1, args.short_prompt, args.canvases, args.steps)
        print("one_user_loop", json.dumps(results["one_user_loop"]), flush=True)
    finally:
        moe.set_grouped_dispatch("auto")
    cost = StepCost(eng.config, 1, torch.finfo(dtype).bits // 8)
    step_bytes = cost.bytes(args.short_prompt, True)
    one = results["one_user"]
    summary = {
        "bench": "gpu", "config": label, "hardware": hardware(device), "dtype": args.dtype, "torch": torch.__version__,
        "steps": args.steps, "sampling": args.sampling, "build_s": round(t_build, 1), "model_bytes": model_bytes,
        "grouped_dispatch": moe.grouped_dispatch(torch.empty(0, device=device, dtype=dtype),
                                                 *(eng.module.layers[0].experts.gate_up_proj,
                                                   eng.module.layers[0].experts.down_proj)),
        "ms_per_step": one["ms_per_step"], "tok_s_per_canvas": one["tok_s_per_canvas"],
        "tok_s_end_to_end_long_prompt": results["long_prompt"]["tok_s_end_to_end"],
        "ms_prefill_long_prompt": results["long_prompt"]["ms_prefill"],
        "weight_gb_s": round(step_bytes / (one["ms_per_step"] / 1e3) / 1e9, 1),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "scenarios": results,
    }
    for name, r in results.items():
        if name.startswith("batch_"):
            summary[f"{name}_aggregate_ratio"] = round(r["tok_s_per_canvas"] / one["tok_s_per_canvas"], 2)
    summary["grouped_vs_loop_speedup"] = round(results["one_user_loop"]["ms_per_step"] / one["ms_per_step"], 2)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
