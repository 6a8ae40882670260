"""dgemma vs the transformers 5.23.0 reference: same weights, same prompt, same fixed steps, same batch.

    python bench/vs_reference.py --config small [--steps 16] [--batch 1] [--reps 3] [--threads 2] [--compile MODE]

Builds the config ONCE with random weights through the reference class (norm weights, router scales and
layer scalars randomised too, so all of the math is exercised), saves it with `save_pretrained`, loads it
with `dgemma.load`, and then alternates whole `generate()` calls: reference, ours in fast mode, ours in
reference-RNG mode, R times after one discarded warm-up of each. Adaptive stopping and end-of-sequence
stopping are off on both sides, so every run does exactly the same work: ceil(new_tokens / L) canvases of
`--steps` decoder steps. The reference and our reference-RNG run start from the same torch.manual_seed, so
their tokens must be identical.

Instrumentation (timers wrapped around the calls, in this script only): the reference's decoder forward
(`model.forward`, which `generate` calls once per step: self-conditioning, decoder, LM head) and encoder
(`model.model.encoder.forward`); our `module.soft_embedding` + `module.denoise` (the same work) and
`module.encode`. A step's "forward" is that decoder time; "ms/step" is everything that is not an encoder
pass (forward + sampler + loop) divided by the steps. The first encoder pass of a run is the prompt
prefill; later ones are commits. When the run has a single canvas (no commit), each side also runs a
short probe (`max_new_tokens = L + 1`, one step per canvas) whose second encoder pass is the commit.
Prints a table and ends with one JSON line (see bench/README.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import DTYPES, NAMED_CONFIGS, PeakMemory, StepCost, Timers, hardware, matmul_peak_gflops, median, \
    random_weights, read_config, sync, device_arg  # noqa: E402

import dgemma  # noqa: E402
from dgemma.engine.compiled import COMPILE_MODES  # noqa: E402

# the reference's global defaults (spec §2.3), passed explicitly to both sides so neither reads anything else
T_MIN, T_MAX, ENTROPY_BOUND = 0.4, 0.8, 0.1
SIDES = ("reference", "fast", "reference_rng")
LABELS = {"reference": "reference (HF)", "fast": "ours, fast", "reference_rng": "ours, reference-RNG"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"one of {sorted(NAMED_CONFIGS)} (bench/configs/) or a path "
                                                   "to a config.json")
    p.add_argument("--steps", type=int, default=16, help="fixed denoising steps per canvas (default 16)")
    p.add_argument("--batch", type=int, default=1, help="rows per generate() call (default 1)")
    p.add_argument("--reps", type=int, default=3, help="measured runs per side, after one warm-up (default 3)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens per row (default 32)")
    p.add_argument("--new-tokens", type=int, default=256, help="max_new_tokens, rounded up to whole canvases "
                                                               "by both sides (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and compute (default fp32)")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="weights, prompt and generation seed (default 0)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n^3 matmul that measures the peak")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="our side only: torch.compile the decoder step (Engine.compile; the warm-up compiles). MODE: "
                        + ", ".join(COMPILE_MODES))
    args = p.parse_args(argv)
    for name in ("steps", "batch", "reps", "prompt_len", "new_tokens", "matmul_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# --- building the shared weights ---------------------------------------------------------------------------
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights at a scale where every piece of the math matters: matrices ~ N(0, 1/fan_in), the embedding
    ~ N(0, 0.3^2), every 1-D weight (norms, router.scale, per_expert_scale) and the layer_scalar buffers
    ~ U(0.25, 1.75) instead of the reference's all-ones initialisation. Vision weights are left alone."""
    random_weights(model, torch.Generator().manual_seed(seed), 0.3, (0.25, 1.75), (0.25, 1.75))


def build(raw: dict, seed: int, dtype: torch.dtype, device: torch.device, directory: Path):
    """Reference model with random weights -> save_pretrained(directory) -> dgemma.load: the same weights twice."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    ref = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig.from_dict(copy.deepcopy(raw))).eval()
    randomise(ref, seed)
    ref.save_pretrained(directory)  # safetensors
    ref = ref.to(device=device, dtype=dtype)
    eng = dgemma.load(directory, dtype=dtype, device=device, quiet=True)
    return ref, eng


def random_prompt(raw: dict, vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """Random ids in [3, first special id): no pad/eos/bos, no image tokens (the reference warns about those)."""
    specials = [raw.get(k) for k in ("image_token_id", "boi_token_id", "eoi_token_id")]
    high = min([vocab] + [s for s in specials if isinstance(s, int) and s > 3])
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(3, high, (batch, length), generator=g)


class Bench:
    def __init__(self, args, raw: dict, ref, eng, ids: torch.Tensor, device: torch.device):
        self.args, self.ref, self.eng, self.ids, self.device = args, ref, eng, ids, device
        self.L = eng.config.canvas_length
        self.timers = Timers(device)
        # decoder forward: the reference's model.forward (self-conditioning + decoder + LM head, once per step)
        # against our soft_embedding + denoise; encoder: the reference's encoder module against our encode
        self.timers.wrap(ref, "forward", "decoder", step=True)
        self.timers.wrap(ref.model.encoder, "forward", "encoder")
        self.timers.wrap(eng.module, "soft_embedding", "decoder")
        self.timers.wrap(eng.module, "denoise", "decoder", step=True)
        self.timers.wrap(eng.module, "encode", "encoder")

    def generate(self, side: str, new_tokens: int, steps: int):
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        ids = self.ids.clone().to(self.device)
        torch.manual_seed(self.args.seed)  # the same global stream for the reference and reference-RNG runs
        if side == "reference":
            return self.ref.generate(
                ids, max_new_tokens=new_tokens, max_denoising_steps=steps, stability_threshold=None,
                confidence_threshold=None, eos_token_id=None, t_min=T_MIN, t_max=T_MAX,
                sampler_config=EntropyBoundSamplerConfig(entropy_bound=ENTROPY_BOUND))
        return self.eng.generate(
            ids, max_new_tokens=new_tokens, max_denoising_steps=steps, stability_threshold=None,
            confidence_threshold=None, eos_token_id=None, t_min=T_MIN, t_max=T_MAX, entropy_bound=ENTROPY_BOUND,
            sampling="fast" if side == "fast" else "reference", return_dict=True)

    def run(self, side: str, new_tokens: int, steps: int) -> dict:
        """One timed generate() call -> wall time, per-component times, peak memory, output."""
        gc.collect()
        self.timers.events.clear()
        with PeakMemory(self.device) as mem:
            sync(self.device)
            ticks0, t0 = cpu_ticks(), time.perf_counter()
            out = self.generate(side, new_tokens, steps)
            sync(self.device)
            t1, ticks1 = time.perf_counter(), cpu_ticks()
        others, steal = other_cpu(ticks0, ticks1)
        events = list(self.timers.events)
        enc = sorted((e for e in events if e[0] == "encoder"), key=lambda e: e[1])
        enc_time = sum(e[2] - e[1] for e in enc)
        dec_time = sum(e[2] - e[1] for e in events if e[0] == "decoder")
        n_steps = sum(1 for e in events if e[3])
        wall = t1 - t0
        return {
            "wall": wall,
            "steps": n_steps,
            "soft_embedding_calls": sum(1 for e in events if e[4] == "soft_embedding"),
            "decoder_time": dec_time,
            "ms_step": (wall - enc_time) / n_steps * 1e3,
            "ms_forward": dec_time / n_steps * 1e3,
            "ms_prefill": (enc[0][2] - enc[0][1]) * 1e3 if enc else None,
            "ms_commits": [(e[2] - e[1]) * 1e3 for e in enc[1:]],
            # time to first committed text: the moment the first canvas is handed to the encoder (or the end)
            "ttfc": (enc[1][1] - t0) if len(enc) > 1 else wall,
            "peak": mem.peak,
            "sequences": out.sequences.cpu(),
            "tokens_per_forward": float(out.tokens_per_forward.float().mean()),
            "other_cpu_pct": others,
            "steal_pct": steal,
        }


def rounded(x):
    """Floats to 6 significant digits, recursively (a readable JSON line)."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def cpu_ticks() -> tuple[int, int, int, int] | None:
    """(all CPU ticks, idle + iowait, steal, this process's ticks) from /proc (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ..., utime, stime
        return sum(ticks), ticks[3] + ticks[4], ticks[7], int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


def other_cpu(before, after) -> tuple[float | None, float | None]:
    """-> (% of the machine's CPU time that OTHER processes used between the two samples, % stolen by the host)."""
    if before is None or after is None or after[0] <= before[0]:
        return None, None
    total, idle, steal, own = (b - a for a, b in zip(before, after))
    return 100 * max(0, total - idle - steal - own) / total, 100 * steal / total


def fmt(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def main(argv=None) -> dict:
    import transformers

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    label, raw = read_config(args.config)

    with tempfile.TemporaryDirectory(prefix="dgemma-bench-") as tmp:
        t_build = time.perf_counter()
        ref, eng = build(raw, args.seed, dtype, device, Path(tmp))
        t_build = time.perf_counter() - t_build
        cfg = eng.config
        L, V = cfg.canvas_length, cfg.vocab_size
        ids = random_prompt(raw, V, args.batch, args.prompt_len, args.seed)
        num_canvases = math.ceil(args.new_tokens / L)
        committed = args.batch * num_canvases * L  # fixed steps, no EOS stop: every canvas is committed
        cost = StepCost(cfg, args.batch, torch.empty((), dtype=dtype).element_size())
        run_flops, run_bytes = cost.run(args.prompt_len, num_canvases, args.steps)

        peak_before = matmul_peak_gflops(args.matmul_size, dtype, device)
        if args.compile:
            eng.compile(args.compile)  # before the timers wrap module.denoise: they time the compiled step
        bench = Bench(args, raw, ref, eng, ids, device)
        results = {s: [] for s in SIDES}
        identical = True
        try:
            for rep in range(args.reps + 1):  # rep 0 is the discarded warm-up
                outs = {}
                for side in SIDES:
                    r = bench.run(side, args.new_tokens, args.steps)
                    outs[side] = r["sequences"]
                    if rep:
                        results[side].append(r)
                identical &= torch.equal(outs["reference"], outs["reference_rng"])
            # a single-canvas run commits nothing: measure the commit with a short two-canvas probe per side
            commits = {s: [c for r in results[s] for c in r["ms_commits"]] for s in SIDES}
            probe_sides = ("reference", "fast")
            if num_canvases == 1:
                for rep in range(args.reps + 1):
                    for side in probe_sides:
                        r = bench.run(side, L + 1, 1)
                        if rep:
                            commits[side] += r["ms_commits"]
                commits["reference_rng"] = commits["fast"]  # the same encode code in both of our modes
        finally:
            bench.timers.restore()
        peak_after = matmul_peak_gflops(args.matmul_size, dtype, device)
    peak = max(peak_before, peak_after)

    sides = {}
    for side in SIDES:
        rs = results[side]
        wall = median([r["wall"] for r in rs])
        steps_done = median([r["steps"] for r in rs])
        gflops = median([run_flops / r["decoder_time"] / 1e9 for r in rs])
        ms_step = median([r["ms_step"] for r in rs])
        ms_forward = median([r["ms_forward"] for r in rs])
        sides[side] = {
            "wall_s": wall,
            "wall_s_all": [round(r["wall"], 4) for r in rs],
            "ms_per_step": ms_step,
            "ms_forward": ms_forward,
            "ms_sampler": ms_step - ms_forward,
            "ms_prefill": median([r["ms_prefill"] for r in rs]),
            "ms_commit": median(commits[side]),
            "ttfc_s": median([r["ttfc"] for r in rs]),
            "tok_s": committed / wall,
            "peak_mem_bytes": max(r["peak"] for r in rs),
            "gflops": gflops,
            "pct_of_matmul_peak": 100 * gflops / peak,
            "gbps": median([run_bytes / r["decoder_time"] / 1e9 for r in rs]),
            "steps_per_canvas": steps_done / num_canvases,
            "tokens_per_forward": median([r["tokens_per_forward"] for r in rs]),
            # CPU time other processes (and the host, as steal) took during each run: a busy machine skews ratios
            "other_cpu_pct_all": [None if r["other_cpu_pct"] is None else round(r["other_cpu_pct"], 1) for r in rs],
            "steal_pct_all": [None if r["steal_pct"] is None else round(r["steal_pct"], 1) for r in rs],
        }
        # our self-conditioning pass is timed only if the loop calls module.soft_embedding (every step but
        # a canvas's first); if the engine ever stops doing so, ms_forward would silently miss it
        sc_calls = median([r["soft_embedding_calls"] for r in rs])
        if side != "reference" and sc_calls != num_canvases * (args.steps - 1):
            print(f"WARNING: {LABELS[side]}: module.soft_embedding ran {sc_calls} times, expected "
                  f"{num_canvases * (args.steps - 1)}; ms_forward may not include self-conditioning",
                  file=sys.stderr)
        if steps_done != num_canvases * args.steps:
            print(f"WARNING: {LABELS[side]} ran {steps_done} decoder steps, expected {num_canvases * args.steps}",
                  file=sys.stderr)

    ref_s = sides["reference"]
    result = {
        "bench": "vs_reference",
        "config": label,
        "hardware": hardware(device),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps": args.steps,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "canvases": num_canvases,
        "canvas_length": L,
        "vocab_size": V,
        "reps": args.reps,
        "compile": args.compile,  # our side's torch.compile mode (None: eager)
        "ratio": ref_s["wall_s"] / sides["fast"]["wall_s"],
        "ratio_reference_rng": ref_s["wall_s"] / sides["reference_rng"]["wall_s"],
        "ratio_step": ref_s["ms_per_step"] / sides["fast"]["ms_per_step"],
        "ratio_step_reference_rng": ref_s["ms_per_step"] / sides["reference_rng"]["ms_per_step"],
        "mem_ratio": (sides["fast"]["peak_mem_bytes"] / ref_s["peak_mem_bytes"]
                      if ref_s["peak_mem_bytes"] > 0 else None),
        "tokens_identical": bool(identical),
        # the most CPU time other processes took during any measured run (percent of all CPUs; None off Linux)
        "max_other_cpu_pct": max((x for s in sides.values() for x in s["other_cpu_pct_all"] if x is not None),
                                 default=None),
        "matmul_peak_gflops": peak,
        "matmul_peak_gflops_before_after": [peak_before, peak_after],
        "decoder_gflop_per_step": run_flops / (num_canvases * args.steps) / 1e9,
        "decoder_gb_per_step": run_bytes / (num_canvases * args.steps) / 1e9,
        "memory_method": PeakMemory(device).method,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sides": sides,
    }

    print_table(result, t_build)
    print(json.dumps(rounded(result)))
    return result


def print_table(r: dict, t_build: float) -> None:
    print(f"dgemma vs transformers {r.get('transformers', '?')} reference: config {r['config']}, {r['dtype']}, "
          f"batch {r['batch']}, {r['steps']} fixed steps per canvas (adaptive stop off), prompt {r['prompt_len']}, "
          f"{r['new_tokens']} new tokens = {r['canvases']} canvas(es) of {r['canvas_length']}, vocab "
          f"{r['vocab_size']}, {r['reps']} reps after 1 warm-up (model built in {t_build:.1f} s)"
          + (f"; our decoder step compiled ({r['compile']})" if r.get("compile") else ""))
    print(f"hardware: {r['hardware']}; torch {r['torch']}")
    print(f"matmul peak: {r['matmul_peak_gflops']:.1f} GFLOP/s ({r['dtype']}, best of before/after: "
          + " / ".join(f"{x:.1f}" for x in r["matmul_peak_gflops_before_after"]) + ")")
    print(f"decoder step (analytic): {r['decoder_gflop_per_step']:.2f} GFLOP of matmuls, "
          f"{r['decoder_gb_per_step']:.3f} GB of weights + KV read; peak memory: {r['memory_method']}")
    head = (f"{'':22}{'wall s':>9}{'ms/step':>9}{'fwd ms':>9}{'smp ms':>9}{'prefill':>9}{'commit':>9}"
            f"{'TTFC s':>8}{'tok/s':>9}{'peak MiB':>10}{'GFLOP/s':>9}{'%peak':>7}{'GB/s':>7}{'tok/fwd':>8}")
    print(head)
    for side, s in r["sides"].items():
        print(f"{LABELS[side]:22}{s['wall_s']:9.3f}{s['ms_per_step']:9.1f}{s['ms_forward']:9.1f}"
              f"{s['ms_sampler']:9.1f}{fmt(s['ms_prefill'], '9.1f')}{fmt(s['ms_commit'], '9.1f')}"
              f"{s['ttfc_s']:8.3f}{s['tok_s']:9.1f}{s['peak_mem_bytes'] / 2 ** 20:10.1f}{s['gflops']:9.1f}"
              f"{s['pct_of_matmul_peak']:7.1f}{s['gbps']:7.2f}{s['tokens_per_forward']:8.2f}")
    if r["max_other_cpu_pct"] is not None:
        print("other processes' share of the CPUs during each run (%): " + "; ".join(
            f"{LABELS[k]} {s['other_cpu_pct_all']}" for k, s in r["sides"].items()))
        if r["max_other_cpu_pct"] > 10:
            print(f"WARNING: other processes took up to {r['max_other_cpu_pct']:.0f}% of the CPUs during a run: "
                  "the times and ratios are skewed; rerun on a quiet machine", file=sys.stderr)
    mem = "-" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}"
    print(f"ratio reference/ours (wall): fast {r['ratio']:.2f}x, reference-RNG {r['ratio_reference_rng']:.2f}x; "
          f"per step: {r['ratio_step']:.2f}x / {r['ratio_step_reference_rng']:.2f}x; peak memory ours-fast/reference "
          f"{mem}; tokens identical (reference-RNG vs reference): {'yes' if r['tokens_identical'] else 'NO'}")


if __name__ == "__main__":
    main()
