"""GPU check of the quantized fast paths (CUDA) against the dequantize reference, bf16 activations, with timings.
Prints one JSON line. `python bench/quant_gpu_check.py`

1. Linear [N, K] at M=256 rows for int8 (chunked dequantize), int4 (tinygemm kernel) and fp8 (torch._scaled_mm on
   Hopper, else dequantize): `rel_err` = max |fast - reference| / max |reference|, `ms` per call.
2. fp8 experts of 26B-A4B (bench/configs/26b-a4b.json: 128 experts, D=2816, I=704) on one canvas routed top-8: the
   [M=256*8, 2816] rows sorted by expert through QuantExperts.forward_sorted, by each path: "fp8-grouped"
   (torch._scaled_grouped_mm; Hopper only), "dequant-grouped" (dequantize + torch._grouped_mm) and the reference
   loop (per expert, dequantize then matmul), beside the unquantized bf16 grouped GEMM. `rel_err` against the
   reference loop, `rel_err_vs_bf16` against the bf16 weights, `ms` per call (both projections and the GELU).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import read_config  # noqa: E402
from dgemma.model.moe import Experts  # noqa: E402
from dgemma.quant import kernels  # noqa: E402
from dgemma.quant.modules import QuantLinear, quantize_module, set_kernel  # noqa: E402
from dgemma.quant.schemes import quantize_weight  # noqa: E402


def timed(fn, reps=20) -> float:
    """ms per call of fn() after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((a.float() - ref.float()).abs().max() / ref.float().abs().max()), 5)


def fp8_experts_check(dev: torch.device, g: torch.Generator, E: int, D: int, I: int, K: int, L: int = 256) -> dict:
    """Section 2 of the module docstring: E experts of [2I, D] and [D, I], L tokens routed top-K."""
    holder, layer = torch.nn.Module(), torch.nn.Module()  # the names quantize_module matches: layers.0.experts
    with torch.device(dev):
        layer.experts = Experts(E, D, I).bfloat16().requires_grad_(False)
        holder.embed_tokens = torch.nn.Embedding(2, D).bfloat16()
        plain = Experts(E, D, I).bfloat16().requires_grad_(False)
    holder.layers = torch.nn.ModuleList([layer])
    gd = torch.Generator(device=dev).manual_seed(1)
    with torch.no_grad():
        layer.experts.gate_up_proj.normal_(0, D ** -0.5, generator=gd)
        layer.experts.down_proj.normal_(0, I ** -0.5, generator=gd)
        plain.gate_up_proj.copy_(layer.experts.gate_up_proj)
        plain.down_proj.copy_(layer.experts.down_proj)
    q = quantize_module(holder, "fp8").layers[0].experts
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L)]).to(dev)  # one canvas, top-K each
    ranked, _ = torch.sort(ids.reshape(-1))
    offsets = torch.searchsorted(ranked, torch.arange(E, device=dev), right=True)
    x = torch.randn(L * K, D, generator=g).bfloat16().to(dev)  # [M, D] rows, already in expert order
    active = int((torch.diff(offsets, prepend=offsets.new_zeros(1)) > 0).sum())
    out = {"shape": {"M": L * K, "D": D, "I": I, "E": E, "active_experts": active}, "experts_kernel": q.kernel_kind(x)}
    set_kernel(q, "reference")
    reference = q.forward_sorted(x, offsets)
    out["reference_loop"] = {"ms": round(timed(lambda: q.forward_sorted(x, offsets), 3), 3)}
    set_kernel(q, "fast")
    bf16 = plain.forward_sorted(x, offsets)
    out["bf16_grouped"] = {"rel_err": rel_err(bf16, reference),
                           "ms": round(timed(lambda: plain.forward_sorted(x, offsets)), 4)}
    for kind in ("fp8-grouped", "dequant-grouped"):
        try:
            y = q.forward_path(kind, x, offsets)
            out[kind] = {"rel_err": rel_err(y, reference), "rel_err_vs_bf16": rel_err(y, bf16),
                         "ms": round(timed(lambda kind=kind: q.forward_path(kind, x, offsets)), 4)}
        except Exception as e:  # report, do not hide
            out[kind] = {"error": repr(e)[:300]}
    try:  # one projection alone: the GEMM the 8-bit target rests on
        offs = offsets.to(torch.int32)
        out["fp8_gate_up_gemm_ms"] = round(timed(lambda: kernels.grouped_matmul_fp8(x, q.gate_up_proj,
                                                                                   q.gate_up_proj_scale, offs)), 4)
    except Exception as e:
        out["fp8_gate_up_gemm_ms"] = repr(e)[:300]
    return out


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("quant_gpu_check.py needs a CUDA GPU, and this torch sees none (torch.cuda.is_available() "
                         f"is False; torch {torch.__version__})")
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    g = torch.Generator().manual_seed(0)
    for scheme in ("int8", "int4", "fp8"):
        for N, K in ((1408, 2816), (2816, 704), (4096, 2816)):
            w = (torch.randn(N, K, generator=g) * 0.02).bfloat16()
            layer = QuantLinear(K, N, scheme, 64 if scheme == "int4" else None,
                                torch.bfloat16 if scheme == "int4" else torch.float32)
            for suffix, t in quantize_weight(w, scheme, layer.group_size).items():
                getattr(layer, "weight" + suffix).copy_(t)
            layer = layer.to(dev)
            x = torch.randn(256, K, generator=g).bfloat16().to(dev)
            set_kernel(layer, "reference")
            ref = layer(x).float()
            set_kernel(layer, "fast")
            try:
                err = rel_err(layer(x), ref)
                ms = timed(lambda layer=layer, x=x: layer(x))
                kind = layer.converted.get("weight", kernels.fast_kernel(scheme, dev, x.dtype))
                out[f"{scheme}_{N}x{K}"] = {"kind": kind, "rel_err": err, "ms": round(ms, 4)}
            except Exception as e:  # report, do not hide
                out[f"{scheme}_{N}x{K}"] = {"error": repr(e)[:300]}
    try:
        qi = torch.randint(-127, 127, (512, 1024), dtype=torch.int8, device=dev)
        torch._weight_int8pack_mm(torch.randn(8, 1024, device=dev).bfloat16(), qi,
                                  torch.rand(512, device=dev).bfloat16())
        out["int8pack_mm_cuda"] = "available"
    except Exception as e:
        out["int8pack_mm_cuda"] = repr(e)[:200]
    text = read_config("26b-a4b")[1]["text_config"]
    try:
        out["fp8_experts_26b"] = fp8_experts_check(dev, g, text["num_experts"], text["hidden_size"],
                                                   text["moe_intermediate_size"], text["top_k_experts"])
    except Exception as e:  # report, do not hide
        out["fp8_experts_26b"] = {"error": repr(e)[:500]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
