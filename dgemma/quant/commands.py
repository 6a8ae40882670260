"""`dgemma quantize SRC DST --scheme {int8,int4,fp8} [--group-size G]`: flags -> quantize_checkpoint -> summary."""

from __future__ import annotations

import json

from ..argtypes import positive_int
from .schemes import DEFAULT_GROUP_SIZE, SCHEMES


def add_quantize_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write a weight-only int8/int4/fp8 copy of a checkpoint, shard by shard",
                              description="Quantize every linear layer and the stacked experts of a DiffusionGemma "
                                          "checkpoint (embedding, routers and norms stay in the stored dtype). The "
                                          "scheme is recorded in the safetensors metadata; `dgemma.load` and every "
                                          "--model flag read the result.")
    p.add_argument("src", help="full-precision model directory, or a LoRA adapter directory (its base model with the "
                                "adapter merged in is quantized)")
    p.add_argument("dst", help="output directory (must not exist)")
    p.add_argument("--scheme", choices=SCHEMES, required=True,
                   help="int8: per output channel; int4: group-wise, packed two per byte; fp8: float8_e4m3fn per "
                        "output channel (Hopper GPUs run it on fp8 tensor cores, elsewhere it is dequantized)")
    p.add_argument("--group-size", type=positive_int, default=None,
                   help=f"int4 inputs per scale/zero pair (default {DEFAULT_GROUP_SIZE}; must divide every input "
                        "width)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from .convert import quantize_checkpoint

    if args.group_size is not None and args.scheme != "int4":
        raise ValueError("--group-size applies to --scheme int4 only (int8 and fp8 have one scale per output channel)")
    summary = quantize_checkpoint(args.src, args.dst, args.scheme, args.group_size)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['output']}: {args.scheme}"
              + (f" (group {summary['group_size']})" if summary["group_size"] else "")
              + f", {summary['tensors_quantized']} tensors quantized, {summary['source_bytes'] / 2**20:,.1f} MiB -> "
              f"{summary['output_bytes'] / 2**20:,.1f} MiB in {summary['seconds']:.1f} s")
    return 0
