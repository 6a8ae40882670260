"""GPU check of the quantized fast paths (CUDA): int4 tinygemm kernel and int8 vs the dequantize reference,
for a Linear and the stacked experts, bf16. Prints one JSON line. `python bench/quant_gpu_check.py`"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dgemma.quant import kernels  # noqa: E402
from dgemma.quant.modules import QuantLinear, set_kernel  # noqa: E402
from dgemma.quant.schemes import quantize_weight  # noqa: E402

dev = torch.device("cuda")
out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
g = torch.Generator().manual_seed(0)
for scheme in ("int8", "int4"):
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
            fast = layer(x).float()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                layer(x)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / 20 * 1e3
            err = float((fast - ref).abs().max() / ref.abs().max())
            kind = layer.converted.get("weight", kernels.fast_kernel(scheme, dev, x.dtype))
            out[f"{scheme}_{N}x{K}"] = {"kind": kind, "rel_err": round(err, 5), "ms": round(ms, 4)}
        except Exception as e:  # report, do not hide
            out[f"{scheme}_{N}x{K}"] = {"error": repr(e)[:300]}
try:
    qi = torch.randint(-127, 127, (512, 1024), dtype=torch.int8, device=dev)
    torch._weight_int8pack_mm(torch.randn(8, 1024, device=dev).bfloat16(), qi, torch.rand(512, device=dev).bfloat16())
    out["int8pack_mm_cuda"] = "available"
except Exception as e:
    out["int8pack_mm_cuda"] = repr(e)[:200]
print(json.dumps(out))
