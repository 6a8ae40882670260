"""`dgemma` command line: parse flags, build configs, call the library. No model or sampling logic here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fmt_count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.2f}M)"


def cmd_inspect(args) -> int:
    from .config import ModelConfig
    from .model.summary import census, describe, stored_bytes

    path = Path(args.path)
    cfg = ModelConfig.from_file(path)
    counts = census(cfg)
    stored = stored_bytes(path) if path.is_dir() else None
    if args.json:
        print(json.dumps({"config": str(path), "total_parameters": counts["total"],
                          "active_parameters_per_token": counts["active_per_token"],
                          "by_component": counts["by_component"], "stored_bytes_by_dtype": stored}))
        return 0
    print(f"DiffusionGemma text model: {path}")
    for line in describe(cfg):
        print("  " + line)
    print(f"  parameters        {_fmt_count(counts['total'])} total, "
          f"{_fmt_count(counts['active_per_token'])} active per token")
    for name, n in sorted(counts["by_component"].items(), key=lambda kv: -kv[1]):
        print(f"    {name:<22}{n:>16,}")
    if stored is not None:
        for dtype, nbytes in sorted(stored.items()):
            print(f"  stored {dtype:<10} {nbytes / 2**30:10.3f} GiB")
    else:
        for label, size in (("bf16", 2), ("fp32", 4)):
            print(f"  weights in {label:<6} {counts['total'] * size / 2**30:10.3f} GiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma: load, inspect and generate.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="architecture summary and parameter counts, without loading weights")
    p.add_argument("path", help="model directory or config.json")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .model.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"dgemma {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
