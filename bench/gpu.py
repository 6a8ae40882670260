"""dgemma on one GPU: the 26B-A4B config with random weights built directly on the device (nothing downloaded).

    python bench/gpu.py [--config 26b-a4b] [--dtype bf16] [--steps 16] [--batches 1,4] [--long-prompt 4096]
                        [--compile reduce-overhead] [--quantize {none,int8,int4,fp8}]

--quantize SCHEME quantizes the random model where it was built (dgemma.quant.modules.quantize_module: module by
module, expert by expert, so 26B-A4B fits an H100 while it converts) before anything is timed: the linears and
experts as `dgemma quantize` would write them; the embedding, routers and norms stay in --dtype. fp8 on a Hopper GPU
runs the experts as torch._scaled_grouped_mm on the fp8 weights (dgemma/quant/kernels.py). The JSON line records
the scheme, the experts' path and the weight bytes actually held.

Scenarios, each after a warm-up, every canvas at exactly --steps denoising steps (adaptive stopping off):
  one_user     batch 1, short prompt, --canvases canvases: ms per decoder step, committed tok/s per canvas
  long_prompt  batch 1, --long-prompt tokens: the same plus the prefill, end-to-end tok/s
  batch_B      batch B (each of --batches above 1), short prompt: aggregate committed tok/s
  one_user_loop  one_user again with the MoE's per-expert loop instead of the grouped GEMM (what it buys; --no-loop
               skips it)
  one_user_compiled_MODE, batch_B_compiled_MODE  with --compile MODE[,MODE]: the same runs with the decoder step
               torch.compiled (Engine.compile, dgemma/engine/compiled.py); a warm-up of the same shapes first
               compiles (and records the CUDA graphs of reduce-overhead): its extra time is `compile_s`
"committed tok/s per canvas" = B x canvas / (steps x ms per step + the commit), the figure published engines
quote; "end to end" = new tokens / wall time including the prefill. Peak memory is torch's allocated peak.
Ends with one JSON line. Runs on CPU too (`--device cpu --config small`) for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import (DTYPES, PeakMemory, StepCost, Timers, device_arg, hardware, random_weights,  # noqa: E402
                     read_config, sync)

from dgemma.argtypes import positive_int  # noqa: E402
from dgemma.config import ModelConfig  # noqa: E402
from dgemma.engine.compiled import COMPILE_MODES  # noqa: E402
from dgemma.engine.engine import Engine  # noqa: E402
from dgemma.model import DiffusionGemma, moe  # noqa: E402
from dgemma.quant.modules import QuantExperts, QuantizedWeights, prepare_kernels, quantize_module  # noqa: E402
from dgemma.quant.schemes import DEFAULT_GROUP_SIZE, SCHEMES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="26b-a4b", help="bench config name (bench/configs) or a config.json path")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda", type=device_arg)
    p.add_argument("--steps", type=positive_int, default=16)
    p.add_argument("--canvases", type=positive_int, default=2, help="canvases per run")
    p.add_argument("--short-prompt", type=positive_int, default=32)
    p.add_argument("--long-prompt", type=positive_int, default=4096)
    p.add_argument("--no-loop", action="store_true", help="skip the one_user_loop scenario (the per-expert loop takes "
                   "about 4x a grouped step; with quantized experts it dequantizes expert by expert)")
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--sampling", default="fast", choices=["fast", "reference"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", default="", help="comma-separated torch.compile modes to measure after the eager "
                   f"scenarios ({', '.join(COMPILE_MODES)}); e.g. reduce-overhead")
    p.add_argument("--quantize", default="none", choices=["none", *SCHEMES],
                   help="quantize the linears and experts before timing (int4 with group size "
                        f"{DEFAULT_GROUP_SIZE}); default none")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor; eager or "
                   "aot_eager isolate graph capture from code generation)")
    args = p.parse_args(argv)
    try:
        [positive_int(b) for b in args.batches.split(",")]
    except argparse.ArgumentTypeError as e:
        p.error(f"--batches {args.batches!r}: each batch size {e}")
    args.compile_modes = [m for m in args.compile.split(",") if m]
    for m in args.compile_modes:
        if m not in COMPILE_MODES:
            p.error(f"--compile: unknown mode {m!r}; choose from {', '.join(COMPILE_MODES)}")
    return args


def build(raw: dict, dtype: torch.dtype, device: torch.device, seed: int, quantize: str = "none") -> Engine:
    """Random weights made on the device in `dtype` (no fp32 copy, no host memory): matrices ~ N(0, 1/fan_in),
    the embedding ~ N(0, 0.02^2) (x sqrt(D) in the model), 1-D weights ~ U(0.5, 1.5), layer scalars 1; then
    quantized in place unless `quantize` is "none" (before the Engine exists, so no float weight outlives its swap)."""
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
    module = module.eval().requires_grad_(False)
    if quantize != "none":
        quantize_module(module, quantize, DEFAULT_GROUP_SIZE if quantize == "int4" else None)
        prepare_kernels(module)  # int4: repacked for the device's kernel now, not inside the first timed run
    return Engine(module)


def weight_bytes(module) -> tuple[int, float | None]:
    """(bytes of every weight held: parameters plus quantized buffers, bytes per element of the quantized
    matrices including their scales, or None when nothing is quantized)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    held = elements = 0
    for m in module.modules():
        if isinstance(m, QuantizedWeights):
            held += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
            elements += sum(torch.Size(s).numel() for s in m.shapes.values())
    return total + held, (held / elements if elements else None)


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


def run_compiled(eng: Engine, timers: Timers, args, mode: str, results: dict) -> dict:
    """The one_user and batch_B runs with the decoder step compiled in `mode`: per batch size, a warm-up of the same
    shapes (compiles, records CUDA graphs), then the measured run. Adds rows to `results`; returns the summary."""
    from torch._dynamo.utils import counters

    timers.restore()  # the timers shadow module.denoise: compile first, then wrap the compiled step
    counters.clear()
    try:
        eng.compile(mode, backend=args.compile_backend)
        timers.wrap(eng.module, "soft_embedding", "decoder")
        timers.wrap(eng.module, "denoise", "decoder", step=True)
        timers.wrap(eng.module, "encode", "encoder")
        out = {"moe": eng.compiled["moe"], "backend": args.compile_backend}
        for b in sorted({1, *(int(x) for x in args.batches.split(","))}):
            name = f"{'one_user' if b == 1 else f'batch_{b}'}_compiled_{mode}"
            warm = run(eng, timers, args, b, args.short_prompt, args.canvases, args.steps)
            graphs = counters["stats"]["unique_graphs"]
            r = results[name] = run(eng, timers, args, b, args.short_prompt, args.canvases, args.steps)
            r["compile_s"] = round(warm["wall_s"] - r["wall_s"], 1)  # the warm-up's extra time
            r["graphs_compiled_in_run"] = counters["stats"]["unique_graphs"] - graphs  # 0: the warm-up covered it
            eager = results["one_user" if b == 1 else f"batch_{b}"]
            r["speedup_vs_eager"] = round(eager["ms_per_step"] / r["ms_per_step"], 2)
            print(name, json.dumps(r), flush=True)
            out[name] = {k: r[k] for k in ("ms_per_step", "tok_s_per_canvas", "compile_s", "speedup_vs_eager",
                                           "graphs_compiled_in_run")}
    finally:
        timers.restore()
        eng.compile(None)
        timers.wrap(eng.module, "soft_embedding", "decoder")
        timers.wrap(eng.module, "denoise", "decoder", step=True)
        timers.wrap(eng.module, "encode", "encoder")
    out["graph_breaks"] = sum(counters["graph_break"].values())
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    label, raw = read_config(args.config)
    t0 = time.perf_counter()
    eng = build(raw, dtype, device, args.seed, args.quantize)
    sync(device)
    t_build = time.perf_counter() - t0
    model_bytes, quant_itemsize = weight_bytes(eng.module)
    quantized = "" if args.quantize == "none" else f", linears and experts {args.quantize}"
    print(f"built {label} on {hardware(device)}: {model_bytes / 1e9:.2f} GB of {args.dtype} weights{quantized} in "
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
    if not args.no_loop:
        moe.set_grouped_dispatch("off")
        try:
            results["one_user_loop"] = run(eng, timers, args, 1, args.short_prompt, args.canvases, args.steps)
            print("one_user_loop", json.dumps(results["one_user_loop"]), flush=True)
        finally:
            moe.set_grouped_dispatch("auto")
    compiled = {}
    for mode in args.compile_modes:
        try:
            compiled[mode] = run_compiled(eng, timers, args, mode, results)
        except Exception as e:  # keep the eager rows and the JSON line when a compile fails on a new machine
            traceback.print_exc()
            compiled[mode] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    cost = StepCost(eng.config, 1, torch.finfo(dtype).bits // 8, quant_itemsize)
    step_bytes = cost.bytes(args.short_prompt, True)
    one = results["one_user"]
    experts = eng.module.layers[0].experts
    probe = torch.empty(0, eng.config.hidden_size, device=device, dtype=dtype)
    path = experts.kernel_kind(probe) if isinstance(experts, QuantExperts) else None
    summary = {
        "bench": "gpu", "config": label, "hardware": hardware(device), "dtype": args.dtype, "torch": torch.__version__,
        "steps": args.steps, "sampling": args.sampling, "build_s": round(t_build, 1), "model_bytes": model_bytes,
        "quantize": args.quantize, "experts_kernel": path,
        "grouped_dispatch": path != "loop" if path else moe.grouped_dispatch(probe, experts.gate_up_proj,
                                                                             experts.down_proj),
        "ms_per_step": one["ms_per_step"], "tok_s_per_canvas": one["tok_s_per_canvas"],
        "tok_s_end_to_end_long_prompt": results["long_prompt"]["tok_s_end_to_end"],
        "ms_prefill_long_prompt": results["long_prompt"]["ms_prefill"],
        "weight_gb_s": round(step_bytes / (one["ms_per_step"] / 1e3) / 1e9, 1),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "scenarios": results,
    }
    for name, r in results.items():
        if name.startswith("batch_") and "_compiled_" not in name:
            summary[f"{name}_aggregate_ratio"] = round(r["tok_s_per_canvas"] / one["tok_s_per_canvas"], 2)
    loop = results.get("one_user_loop")
    summary["grouped_vs_loop_speedup"] = round(loop["ms_per_step"] / one["ms_per_step"], 2) if loop else None
    if compiled:
        summary["compiled"] = compiled
        done = [m for m in compiled if f"one_user_compiled_{m}" in compiled[m]]
        if done:
            best = min(done, key=lambda m: compiled[m][f"one_user_compiled_{m}"]["ms_per_step"])
            summary["compiled_best"] = {"mode": best, **compiled[best][f"one_user_compiled_{best}"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
