"""Where a denoising step's time goes, by kind of work: torch.profiler over two canvases at fixed steps.

    python bench/step_profile.py [--config 26b-a4b] [--device cuda] [--dtype bf16] [--batch 1] [--steps 8]
                                 [--compile MODE] [--quantize {none,int8,int4,fp8}] [--sampling fast]
    python bench/step_profile.py --device cpu --config small --dtype fp32 --steps 4      # the same on a CPU

Builds the config with random weights on the device (bench/gpu.py's `build`), runs a warm-up, times a run of two
canvases at --steps steps each without the profiler (the wall clock per step), then profiles another. Every operator
the profiler records is charged its own (self) device time (kernel time on a GPU, CPU time on a CPU) and sorted
into:
  phase     prefill and commit (`module.encode`: the prompt's, then the canvas's; in all), forward (`denoise`,
            `soft_embedding`, `head`: the decoder and the self-conditioning product), sampler and loop (everything
            else between the encodes)
  kind      head and self-conditioning (`head` and `soft_embedding`: the two products with the vocabulary as a
            dimension, with their soft-cap and softmax), experts (inside the MoE's experts; eager only), other
            matrix products (projections, dense and self-conditioning MLPs, routers), attention (SDPA), copies and
            indexing, elementwise and reductions (norms, activations, the sampler's softmax passes, ...)
Per step it reports: wall ms, device-busy ms and its share of the wall (a GPU step far below 100% is bound by
launching kernels, not by the kernels), the kernel (or operator) count, the forward's and each kind's ms, and the
bandwidth the forward's device time implies for the weights one step reads (bench/_common.py StepCost). A step of
26B-A4B reads ~50 GB of bf16 weights; on an H200 (4.8 TB/s) that is 10.5 ms, the floor of a one-user step. The
prefill (--prompt tokens) and the commit (one canvas) get their ms by kind too.

With --compile MODE the step runs torch.compiled (Engine.compile). reduce-overhead replays CUDA graphs, whose
kernels the profiler may not attribute to operators: profile `default` (inductor, no graphs) for the kinds.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _canvas  # noqa: E402
from _common import DTYPES, StepCost, Timers, device_arg, hardware, read_config, sync  # noqa: E402
from gpu import build, weight_bytes  # noqa: E402

from dgemma.argtypes import positive_int  # noqa: E402
from dgemma.engine.compiled import COMPILE_MODES  # noqa: E402
from dgemma.quant.schemes import SCHEMES  # noqa: E402

# the annotations the phases and the first two kinds are read from
ENCODE, FORWARD, VOCAB, EXPERTS = "dgemma.encode", "dgemma.forward", "dgemma.vocab", "dgemma.experts"
KINDS = ("head and self-conditioning", "experts", "other matrix products", "attention", "copies and indexing",
         "elementwise and reductions")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::_scaled_mm",
           "quantized::linear_dynamic", "aten::_weight_int4pack_mm", "aten::_weight_int8pack_mm",
           "aten::_weight_int4pack_mm_for_cpu"}
GROUPED = {"aten::_grouped_mm", "aten::_scaled_grouped_mm"}
COPIES = ("copy", "to_copy", "index", "gather", "scatter", "cat", "clone", "contiguous", "take", "fill", "zero",
          "cumsum", "sort", "argsort", "embedding", "repeat", "expand", "narrow", "slice", "select", "view")


def kind_of(name: str, annotations: list[str]) -> str:
    """One profiled operator -> one of KINDS, from the annotations it ran inside and its name."""
    if VOCAB in annotations:
        return "head and self-conditioning"
    if EXPERTS in annotations:
        return "experts"
    if name in MATMULS or name in GROUPED:
        return "other matrix products"
    if "scaled_dot_product" in name or "attention" in name or "flash" in name:
        return "attention"
    if any(word in name for word in COPIES):
        return "copies and indexing"
    return "elementwise and reductions"


def _annotate(obj, name: str, label: str) -> None:
    """Shadow `obj.name` with a call inside record_function(label) (an instance attribute, as bench Timers do)."""
    inner = getattr(obj, name)

    def annotated(*args, **kwargs):
        with record_function(label):
            return inner(*args, **kwargs)

    object.__setattr__(obj, name, annotated)


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def summarize(events, device: torch.device, steps: int) -> dict:
    """Profiled events of one canvas -> ms by phase (prefill, commit: in all; forward, sampler: per step) and by kind
    within each, operator (or kernel) counts, the top operators of the steps."""
    on_gpu = device.type != "cpu"
    encodes = sorted(e.time_range.start for e in events if e.name == ENCODE)  # the first is the prompt's prefill
    phase_ms, kind_ms, top, launches = Counter(), Counter(), Counter(), Counter()
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or e.name.startswith("dgemma."):
            continue
        own = (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / 1e3
        ancestors = list(_ancestors(e))  # self times exclude the children's: summed, nothing counts twice
        names = [a.name for a in ancestors]
        encode = next((a for a in ancestors if a.name == ENCODE), None)
        if encode is not None:
            phase = "prefill" if encode.time_range.start == encodes[0] else "commit"
        else:
            phase = "forward" if FORWARD in names or VOCAB in names else "sampler"
        launches[phase] += len(e.kernels) if on_gpu else 1
        if own <= 0:
            continue
        kind = kind_of(e.name, names)
        phase_ms[phase] += own
        kind_ms[phase, kind] += own
        if phase in ("forward", "sampler"):
            top[f"{kind}: {e.name}"] += own
    per = 1.0 / steps

    def kinds(phases, scale):
        return {k: round(sum(kind_ms[p, k] for p in phases) * scale, 2) for k in KINDS}

    return {"busy_ms_per_step": round((phase_ms["forward"] + phase_ms["sampler"]) * per, 2),
            "forward_ms_per_step": round(phase_ms["forward"] * per, 2),
            "sampler_ms_per_step": round(phase_ms["sampler"] * per, 2),
            "encode_ms": round(phase_ms["prefill"] + phase_ms["commit"], 2),
            "kinds_ms_per_step": kinds(("forward", "sampler"), per),
            ("kernels" if on_gpu else "operators") + "_per_step": {
                "forward": round(launches["forward"] * per, 1), "sampler": round(launches["sampler"] * per, 1)},
            "top_ms_per_step": {n: round(t * per, 2) for n, t in top.most_common(16)},
            "prefill_ms": round(phase_ms["prefill"], 2), "prefill_kinds_ms": kinds(("prefill",), 1.0),
            "commit_ms": round(phase_ms["commit"], 2), "commit_kinds_ms": kinds(("commit",), 1.0),
            ("kernels" if on_gpu else "operators") + "_encode": {"prefill": launches["prefill"],
                                                                  "commit": launches["commit"]}}


CANVASES = 2  # per run: the prompt's prefill, a canvas, its commit, a canvas (the last canvas is not committed)


def run_canvases(eng, args, ids) -> float:
    sync(eng.device)
    t0 = time.perf_counter()
    _canvas.run(eng, ids, args, CANVASES, args.sampling)
    sync(eng.device)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="26b-a4b", help="bench config name (bench/configs) or a config.json path")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda", type=device_arg)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=positive_int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sampling", default="fast", choices=["fast", "reference"])
    p.add_argument("--compile", default="", help=f"torch.compile mode for the step ({', '.join(COMPILE_MODES)})")
    p.add_argument("--quantize", default="none", choices=["none", *SCHEMES])
    p.add_argument("--int8-dynamic", action="store_true", help="CPU: dynamic int8 matmuls (Engine.use_int8_dynamic)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.compile and args.compile not in COMPILE_MODES:
        p.error(f"--compile: unknown mode {args.compile!r}; choose from {', '.join(COMPILE_MODES)}")
    if args.batch < 1 or args.steps < 1:
        p.error("--batch and --steps must be >= 1")
    device = torch.device(args.device)
    label, raw = read_config(args.config)
    eng = build(raw, DTYPES[args.dtype], device, args.seed, args.quantize)
    if args.int8_dynamic:
        eng.use_int8_dynamic(True)
    for name, m in eng.module.named_modules():
        if name.endswith(".experts") and not args.compile:  # compiled: the kernels are inductor's, not the MoE's ops
            _annotate(m, "forward", EXPERTS)
    if args.compile:
        eng.compile(args.compile)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, min(eng.config.vocab_size, 255_000), (args.batch, args.prompt), generator=g).to(device)
    run_canvases(eng, args, ids)  # warm-up (and the compile)
    timers = Timers(device)  # the unprofiled wall clock of a step: the canvas less its prefill and commit
    timers.wrap(eng.module, "encode", "encoder")
    try:
        wall = run_canvases(eng, args, ids) - sum(end - start for _, start, end, *_ in timers.events)
    finally:
        timers.restore()
    for method, annotation in (("denoise", FORWARD), ("head", VOCAB), ("soft_embedding", VOCAB)):
        if not (args.compile and method == "head"):  # compiled, the head runs inside the traced step: leave it be
            _annotate(eng.module, method, annotation)
    _annotate(eng.module, "encode", ENCODE)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_canvases(eng, args, ids)
    result = summarize(prof.events(), device, CANVASES * args.steps)
    model_bytes, quant_itemsize = weight_bytes(eng.module)
    step_bytes = StepCost(eng.config, args.batch, torch.finfo(DTYPES[args.dtype]).bits // 8,
                          quant_itemsize).bytes(args.prompt, True)
    wall_step = wall / (CANVASES * args.steps) * 1e3
    result = {"bench": "step_profile", "config": label, "hardware": hardware(device), "dtype": args.dtype,
              "torch": torch.__version__, "batch": args.batch, "steps": args.steps, "sampling": args.sampling,
              "compile": args.compile or None, "quantize": args.quantize, "int8_dynamic": args.int8_dynamic,
              "model_bytes": model_bytes,
              "wall_ms_per_step": round(wall_step, 2),
              "busy_share": round(result["busy_ms_per_step"] / wall_step, 3),
              "forward_weight_gb_s": round(step_bytes / max(result["forward_ms_per_step"], 1e-6) / 1e6, 1), **result}
    print(f"{label} on {hardware(device)}, {args.dtype}, batch {args.batch}, {CANVASES} canvases of {args.steps} steps"
          f"{', compiled ' + args.compile if args.compile else ''}: wall {wall_step:.1f} ms a step, device busy "
          f"{result['busy_ms_per_step']:.1f} ms (forward {result['forward_ms_per_step']:.1f}, sampler and loop "
          f"{result['sampler_ms_per_step']:.1f}); the forward reads the weights at "
          f"{result['forward_weight_gb_s']} GB/s")
    for kind, ms in result["kinds_ms_per_step"].items():
        print(f"  {kind:28s} {ms:9.2f} ms a step")
    for phase in ("prefill", "commit"):
        print(f"{phase} ({args.prompt if phase == 'prefill' else eng.config.canvas_length} tokens): "
              f"{result[phase + '_ms']:.1f} ms: " + ", ".join(f"{k} {ms:.1f}" for k, ms in
                                                            result[phase + "_kinds_ms"].items() if ms))
    print("the largest operators of a step, by kind:")
    for name, ms in result["top_ms_per_step"].items():
        print(f"  {name:70s} {ms:9.2f} ms a step")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
