"""Load test of `dgemma serve`: 1 client, then N concurrent streaming clients, against the real server.

Starts `python -m dgemma serve` as a subprocess on a free loopback port (the bundled default model, a model
directory, or a bench config with random weights), waits for /health, sends one discarded warm-up request, then
for each concurrency level runs that many client threads. Each client sends streaming chat completions one after
another (`--requests` each, or until `--duration` seconds have passed since the level started). Every request
asks for exactly `--max-tokens` committed tokens (`ignore_eos`, so every request does the same work; pass
--allow-eos to let the model stop early). Per level it reports:

    tok/s      aggregate committed tokens (usage.completion_tokens) / the level's wall time
    latency    per request, first byte sent -> `data: [DONE]`   (p50, p95, p99)
    ttft       per request, first byte sent -> first non-empty content or reasoning delta   (p50, p95)
    errors     requests that failed (HTTP error, error chunk, no [DONE], or wrong token count)

and ends with one JSON line: {"bench": "serve_load", ..., "levels": {"1": {...}, "8": {...}}, "speedup": ...}
where speedup is aggregate tok/s at the highest level over the lowest.

    python bench/serve_load.py                               # bundled model, 1 and 8 clients
    python bench/serve_load.py --config small --max-tokens 256 --requests 1
    python bench/serve_load.py --model DIR --clients 1 4 16 --duration 60
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import cpu_model, read_config  # noqa: E402

PROMPTS = ["Write the Python function is_prime(n) from the math module: Return True if n is prime.",
           "Write a class Stack with push, pop and peek.", "Explain what a KV cache is.",
           "def fibonacci(n):", "Write a function that reverses the words of a sentence."]
NAME = "bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory (default: the bundled default model)")
    src.add_argument("--config", help="a bench config (small, vocab262k, ... or a path): random weights, the "
                                      "bundled model's tokenizer and chat template")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrency levels (default 1 8)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default 2)")
    p.add_argument("--duration", type=float, default=600.0,
                   help="per level: no new request starts after this many seconds (default 600)")
    p.add_argument("--max-tokens", type=int, default=128, help="committed tokens per request (default 128)")
    p.add_argument("--steps", type=int, default=None, help="max_denoising_steps per canvas (default: the model's)")
    p.add_argument("--allow-eos", action="store_true", help="let requests stop at end-of-sequence")
    p.add_argument("--device", default=None, help="server --device (default cpu)")
    p.add_argument("--scheduling", choices=("batched", "serial"), default="batched",
                   help="server --scheduling: batched (shared decoder forwards, the default) or serial (turns)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may wait for the server's next bytes before it fails (default 600)")
    args = p.parse_args(argv)
    if min(args.clients) < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("--clients, --requests and --max-tokens must be >= 1")
    return args


def random_model(config: str, directory: Path) -> Path:
    """A bench config with random weights, written as a servable model directory."""
    import torch

    from dgemma.bundled import PACKAGED
    from dgemma.config import ModelConfig
    from dgemma.model import DiffusionGemma
    from dgemma.model.saving import init_weights, save_checkpoint

    from dgemma.text.tokenizer import load_tokenizer

    _, raw = read_config(config)
    model_config, tokens = ModelConfig.from_dict(raw), load_tokenizer(PACKAGED).vocab_size
    if model_config.vocab_size < tokens:  # the served prompts would hold ids the embedding lacks
        raise SystemExit(f"--config {config}: vocab_size {model_config.vocab_size} is smaller than the bundled "
                         f"tokenizer's {tokens} tokens; use a config with vocab_size >= {tokens} (e.g. small)")
    module = DiffusionGemma(model_config)
    init_weights(module, torch.Generator().manual_seed(0))
    save_checkpoint(module, directory, generation_config=json.loads((PACKAGED / "generation_config.json").read_text()))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(PACKAGED / name, directory / name)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: str | None, log) -> tuple[subprocess.Popen, str]:
    port, max_clients = free_port(), max(args.clients)
    cmd = [sys.executable, "-m", "dgemma", "serve", "--port", str(port), "--served-model-name", NAME,
           "--max-concurrency", str(max_clients), "--max-queue", str(max_clients)]
    cmd += ["--model", model] if model else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--scheduling", args.scheduling]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise SystemExit(f"the server did not answer /health within 300 s:\n{log_tail(log)}")


def log_tail(log, chars: int = 3000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-chars:]


def one_request(base: str, args, prompt: str, seed: int) -> dict:
    """One streaming chat completion -> {"ok", "latency_s", "ttft_s", "tokens", "error"}."""
    body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "stream": True, "seed": seed,
            "max_tokens": args.max_tokens, "stream_options": {"include_usage": True}}
    if not args.allow_eos:
        body["ignore_eos"] = True
    if args.steps:
        body["max_denoising_steps"] = args.steps
    out = {"ok": False, "latency_s": None, "ttft_s": None, "tokens": 0, "error": None}
    started, finished = time.perf_counter(), False
    try:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=args.timeout) as r:
            if r.status_code != 200:
                r.read()
                out["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                return out
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    finished = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    return out
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if out["ttft_s"] is None and (delta.get("content") or delta.get("reasoning_content")):
                    out["ttft_s"] = time.perf_counter() - started
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["latency_s"] = time.perf_counter() - started
    if not finished:
        out["error"] = "the stream ended without [DONE]"
    elif not args.allow_eos and out["tokens"] != args.max_tokens:
        out["error"] = f"{out['tokens']} tokens committed, asked for exactly {args.max_tokens}"
    out["ok"] = out["error"] is None
    return out


def percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (q in [0, 100])."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_level(base: str, args, clients: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def client(index: int) -> None:
        for r in range(args.requests):
            if r and time.perf_counter() - start > args.duration:
                break
            res = one_request(base, args, PROMPTS[(index + r) % len(PROMPTS)], seed=1000 * index + r)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    lat, ttft = [r["latency_s"] for r in ok], [r["ttft_s"] for r in ok]
    per_request = [r["tokens"] / r["latency_s"] for r in ok if r["latency_s"]]

    def r4(x):
        return None if x is None else round(x, 4)

    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_messages": sorted({r["error"] for r in results if r["error"]})[:3], "wall_s": r4(wall),
            "tokens": tokens, "tok_s": r4(tokens / wall), "latency_p50_s": r4(percentile(lat, 50)),
            "latency_p95_s": r4(percentile(lat, 95)), "latency_p99_s": r4(percentile(lat, 99)),
            "ttft_p50_s": r4(percentile(ttft, 50)), "ttft_p95_s": r4(percentile(ttft, 95)),
            "per_request_tok_s_median": r4(statistics.median(per_request)) if per_request else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dgemma-serve-load-"))
    try:
        model = args.model
        if args.config:
            print(f"building random weights for {args.config} ...", file=sys.stderr)
            model = str(random_model(args.config, tmp / "model"))
        with open(tmp / "server.log", "w+") as log:
            server, base = start_server(args, model, log)
            try:
                warm = one_request(base, args, PROMPTS[0], seed=0)
                if not warm["ok"]:
                    raise SystemExit(f"warm-up request failed: {warm['error']}")
                levels = {}
                for clients in args.clients:
                    levels[str(clients)] = level = run_level(base, args, clients)
                    print(f"{clients:>3} clients: {level['requests']} requests, {level['errors']} errors, "
                          f"{level['tok_s']} tok/s aggregate, latency p50 {level['latency_p50_s']} s "
                          f"p95 {level['latency_p95_s']} s, ttft p50 {level['ttft_p50_s']} s "
                          f"p95 {level['ttft_p95_s']} s", file=sys.stderr)
                health = httpx.get(base + "/health", timeout=5).json()
            finally:
                server.terminate()
                server.wait(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lo, hi = levels[str(min(args.clients))], levels[str(max(args.clients))]
    speedup = round(hi["tok_s"] / lo["tok_s"], 3) if lo["tok_s"] else None
    print(json.dumps({"bench": "serve_load", "model": args.config or args.model or "bundled default",
                      "hardware": f"{cpu_model()}, {os.cpu_count()} logical CPUs", "device": args.device or "cpu",
                      "max_tokens": args.max_tokens, "steps": args.steps, "ignore_eos": not args.allow_eos,
                      "requests_per_client": args.requests, "scheduling": args.scheduling, "worker": health,
                      "levels": levels, "speedup": speedup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
