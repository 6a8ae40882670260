"""Shared pieces of the bench scripts: hardware name, peak-memory meter, matmul peak, analytic step cost.

Nothing here imports transformers; `vs_reference.py` (and later GPU scripts) build on these.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
NAMED_CONFIGS = {p.stem: p for p in sorted((BENCH_DIR / "configs").glob("*.json"))}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def read_config(name_or_path: str) -> tuple[str, dict]:
    """A named bench config (small, vocab262k, ...) or a path -> (label, raw dict without "_comment"-style keys)."""
    path = NAMED_CONFIGS.get(name_or_path, Path(name_or_path))
    if not path.is_file():
        raise SystemExit(f"--config {name_or_path!r}: not one of {sorted(NAMED_CONFIGS)} and not a file")
    raw = json.loads(path.read_text())
    return (name_or_path if name_or_path in NAMED_CONFIGS else str(path)), \
        {k: v for k, v in raw.items() if not k.startswith("_")}


def device_arg(name: str) -> str:
    """argparse type of --device: the name, once this torch and machine can use it (dgemma's usable_device), so
    `--device cuda` on a CPU-only machine is a usage error rather than a traceback from deep inside a run."""
    import argparse

    from dgemma.model.loading import usable_device
    try:
        usable_device(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --- hardware -----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host {cpu_model()}"
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- memory -------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _release_free_heap() -> None:
    """Hand freed malloc memory back to the OS, so a run's growth is measured from a clean baseline (glibc
    keeps freed chunks below its dynamic mmap threshold, which would hide a later run's peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _can_reset_hwm() -> bool:
    """Linux >= 4.0: writing 5 to /proc/self/clear_refs resets VmHWM (peak RSS) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return abs(_status_kib("VmHWM") - _status_kib("VmRSS")) < 1024
    except (OSError, KeyError):
        return False


class PeakMemory:
    """Peak memory growth of the code inside `with` (bytes in .peak), above what was live at entry.

    CUDA: torch.cuda.max_memory_allocated above memory_allocated at entry (tensors only, no allocator cache).
    CPU: peak RSS above RSS at entry, after returning freed heap to the OS. The kernel's own high-water mark
    (VmHWM, reset through /proc/self/clear_refs) is exact; where it cannot be reset a thread samples VmRSS
    every `interval` seconds instead (it can miss a peak shorter than that). tracemalloc would see none of
    torch's allocations."""

    _hwm = None

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval, self.peak = device, interval, None
        if PeakMemory._hwm is None and device.type == "cpu":
            PeakMemory._hwm = _can_reset_hwm()

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "VmHWM reset via clear_refs" if PeakMemory._hwm else f"VmRSS sampled every {self.interval * 1e3:g} ms"

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        self.base = _status_kib("VmRSS") * 1024
        self._max = self.base
        if PeakMemory._hwm:
            Path("/proc/self/clear_refs").write_text("5")
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _status_kib("VmRSS") * 1024)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif PeakMemory._hwm:
            self.peak = _status_kib("VmHWM") * 1024 - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _status_kib("VmRSS") * 1024) - self.base
        return False


# --- achievable arithmetic rate ------------------------------------------------------------------------------
def matmul_peak_gflops(n: int, dtype: torch.dtype, device: torch.device, reps: int = 3) -> float:
    """GFLOP/s of the best of `reps` n x n x n matmuls (after one warm-up): what this machine, these threads
    and this dtype actually reach on a large, well-shaped product."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync(device)
        if i:  # the first is a warm-up
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# --- analytic cost of one decoder step ------------------------------------------------------------------------
class StepCost:
    """Matmul FLOPs and bytes read of ONE decoder forward (canvas [B,L] against a context of P positions),
    counted from the config the way dgemma's model computes it (dgemma/model/*.py):

    per layer: q/k/v/o projections (full-attention layers have no v_proj: V is the raw K), attention
    scores and values over [context ; canvas] (sliding layers see the last min(P, window-1) cached
    entries, full layers all P), the dense gated MLP, the router, K experts per token; then the tied LM
    head; with self-conditioning (every step but a canvas's first): the soft-embedding product
    [L,V]x[V,D] and the self-conditioning gated MLP. Norms, RoPE, softmax and elementwise work are not
    counted (they are small next to these). A multiply-add is 2 FLOPs.

    Bytes: every weight the step reads once (the embedding twice with self-conditioning: head and soft
    embedding; experts in proportion to how many are expected to be hit under uniform routing) plus the
    cached K/V it attends to. A lower bound on traffic; the logits themselves are not counted. `quant_itemsize`
    (bytes per element of a quantized matrix, scales included: what dgemma/quant/modules.py QUANTIZED covers, the
    projections, dense and self-conditioning MLPs and experts) counts a quantized model; None: all in `itemsize`."""

    def __init__(self, cfg, batch: int, itemsize: int, quant_itemsize: float | None = None):
        self.cfg, self.B, self.itemsize = cfg, batch, itemsize
        self.quant_itemsize = itemsize if quant_itemsize is None else quant_itemsize

    def _layers(self):
        c = self.cfg
        for i in range(c.num_hidden_layers):
            yield c.is_sliding(i), c.head_dim_of(i), c.num_kv_heads_of(i)

    def flops(self, context: int, self_conditioning: bool, attention: bool = True) -> float:
        c, B, L = self.cfg, self.B, self.cfg.canvas_length
        D, H, I, E, K = c.hidden_size, c.num_attention_heads, c.intermediate_size, c.num_experts, c.top_k_experts
        n = B * L  # tokens in the step
        total = 0.0
        for sliding, dh, hk in self._layers():
            seen = min(context, c.sliding_window - 1) if sliding else context
            total += 2 * n * D * (H * dh)  # q
            total += 2 * n * D * (hk * dh) * (2 if sliding else 1)  # k (+ v on sliding layers)
            total += 2 * n * (seen + L) * H * dh * 2 if attention else 0  # q k^T and p v
            total += 2 * n * (H * dh) * D  # o
            total += 2 * n * D * I * 3  # dense gated MLP
            total += 2 * n * D * E  # router
            total += 2 * n * D * c.moe_intermediate_size * 3 * K  # top-K experts
        total += 2 * n * D * c.vocab_size  # tied LM head
        if self_conditioning:
            total += 2 * n * c.vocab_size * D + 2 * n * D * I * 3  # soft embedding + its gated MLP
        return total

    def bytes(self, context: int, self_conditioning: bool) -> float:
        c, L = self.cfg, self.cfg.canvas_length
        D, H, I, E, K = c.hidden_size, c.num_attention_heads, c.intermediate_size, c.num_experts, c.top_k_experts
        hit = E * (1 - (1 - K / E) ** (self.B * L))  # expected distinct experts used by B*L tokens
        quantized = kept = kv = 0.0
        for sliding, dh, hk in self._layers():
            seen = min(context, c.sliding_window - 1) if sliding else context
            quantized += D * H * dh * 2 + D * hk * dh * (2 if sliding else 1) + 3 * D * I
            kept += D * E  # router
            quantized += hit * 3 * D * c.moe_intermediate_size
            kv += self.B * 2 * hk * dh * seen
        kept += c.vocab_size * D * (2 if self_conditioning else 1)
        quantized += 3 * D * I if self_conditioning else 0
        return (kept + kv) * self.itemsize + quantized * self.quant_itemsize

    def run(self, prompt_len: int, num_canvases: int, steps: int) -> tuple[float, float]:
        """(FLOPs, bytes) of every decoder step of a fixed-step run: canvas j sees P = prompt + j*L."""
        flops = nbytes = 0.0
        for j in range(num_canvases):
            P = prompt_len + j * self.cfg.canvas_length
            for s in range(steps):
                flops += self.flops(P, s > 0)
                nbytes += self.bytes(P, s > 0)
        return flops, nbytes


# --- random weights -----------------------------------------------------------------------------------------
def random_weights(module: torch.nn.Module, generator: torch.Generator, embed_std: float,
                   one_d: tuple[float, float], scalars: tuple[float, float] | None) -> None:
    """In place: matrices ~ N(0, 1/fan_in), the embedding ~ N(0, embed_std^2), every 1-D weight ~ U(one_d), the
    layer_scalar buffers ~ U(scalars) (None: 1). Vision weights are left alone."""
    with torch.no_grad():
        for name, p in module.named_parameters():  # tied weights are listed once
            if "vision" in name:
                continue
            if name.endswith("embed_tokens.weight"):
                p.normal_(0.0, embed_std, generator=generator)
            elif p.ndim == 1:
                p.uniform_(*one_d, generator=generator)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=generator)
        for name, b in module.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(*scalars, generator=generator) if scalars else b.fill_(1.0)


# --- instrumentation ----------------------------------------------------------------------------------------
class Timers:
    """Wraps methods of live objects with timers (instance attributes that shadow the class methods; removed
    by `restore`). Records (kind, start, end, counts_as_step, method name) per call. On CUDA it synchronises around
    every timed call, which costs little: both loops already synchronise once per step."""

    def __init__(self, device: torch.device):
        self.device, self.events, self._wrapped = device, [], []

    def wrap(self, obj, name: str, kind: str, step: bool = False) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(self.device)
            self.events.append((kind, t0, time.perf_counter(), step, name))
            return out

        object.__setattr__(obj, name, timed)
        self._wrapped.append((obj, name))

    def restore(self) -> None:
        for obj, name in reversed(self._wrapped):
            object.__delattr__(obj, name)
        self._wrapped.clear()
