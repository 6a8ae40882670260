"""The scheduler alone (no HTTP): N requests' rows sharing decoder forwards vs one request at a time.

    python bench/scheduler_rows.py                      # bundled model, rows 1 and 8, 128 tokens, 16 steps
    python bench/scheduler_rows.py --rows 1 4 8 --threads 2

Each level runs `rows` requests (the same chat prompt, seeds 0..rows-1, exactly --max-tokens tokens: end tokens
ignored) to the end in one engine/scheduler.py Scheduler, after one discarded warm-up of the level. Reports decoder
forwards, ms per forward and aggregate committed tok/s; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None) -> int:
    from dgemma.argtypes import positive_int

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the bundled default model)")
    p.add_argument("--rows", type=positive_int, nargs="+", default=[1, 8], help="concurrent requests per level (1 8)")
    p.add_argument("--max-tokens", type=positive_int, default=128, help="committed tokens per request (128)")
    p.add_argument("--steps", type=positive_int, default=16, help="max_denoising_steps per canvas (16)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import dgemma
    from dgemma.bundled import default_model_path
    from dgemma.engine.scheduler import Scheduler
    from dgemma.engine.stream import open_request

    engine = dgemma.load(args.model or default_model_path(quiet=True), quiet=True)
    ids = engine.prompt_ids(messages=[{"role": "user", "content": "Write a short story about a robot."}])

    def level(n: int) -> dict:
        scheduler = Scheduler(engine.module)
        for seed in range(n):
            scheduler.add(open_request(engine, ids, seed=seed, max_tokens=args.max_tokens, eos_token_id=[],
                                       max_denoising_steps=args.steps, drafts=False)[0])
        started = time.perf_counter()
        while scheduler.rows:
            scheduler.tick()
        wall = time.perf_counter() - started
        return {"rows": n, "wall_s": round(wall, 4), "forwards": scheduler.forwards,
                "ms_per_forward": round(1000 * wall / max(1, scheduler.forwards), 2),
                "tok_s": round(n * args.max_tokens / wall, 2)}

    levels = {}
    for n in args.rows:
        level(n)  # warm-up
        levels[str(n)] = result = level(n)
        print(f"  {n} rows: {result['forwards']} forwards, {result['ms_per_forward']} ms/forward, "
              f"{result['tok_s']} tok/s aggregate")
    low, high = levels[str(min(args.rows))], levels[str(max(args.rows))]
    print(json.dumps({"bench": "scheduler_rows", "model": args.model or "bundled default",
                      "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "max_tokens": args.max_tokens,
                      "steps": args.steps, "levels": levels, "speedup": round(high["tok_s"] / low["tok_s"], 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
