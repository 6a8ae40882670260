"""The optional compiled decoder step (issue 5 item 3): torch.compile, chosen by the runner, never by the model files.

On a GPU a denoising step of the real model is bound by launching operators (thousands of small kernels per
step), not by reading weights; torch.compile fuses them, and mode "reduce-overhead" replays the whole step as CUDA
graphs. `Engine.compile(mode)` (CLI `--compile [MODE]`, `dgemma.load(..., compile=MODE)`) installs the pieces below
as instance attributes of the loaded module, and `Engine.compile(None)` removes them all (eager again, exactly):

  module.denoise         -> `CompiledStep.denoise`: the model's own `denoise`, compiled (the cache is read first,
                            as a tuple of per-layer contexts, so the compiled function has no side effects)
  module.soft_embedding  -> `CompiledStep.soft_embedding`: the self-conditioning product, compiled
  experts.dense          -> True (the trainer's switch to `forward_dense`) where no grouped GEMM applies but few
                            experts make it cheap; a quantized or adapter subclass keeps its own forward (graph
                            breaks). Plain `Experts` need nothing else: their grouped dispatch has static-size
                            offsets and no host read, and `moe.grouped_mm` keeps the fp32 grouped GEMM in the graph
The model's derived constants (RoPE frequencies per device, the embedding scale per dtype) are made before the first
compile, so the graph only reads the model's caches.

The one canvas loop (engine/scheduler.py) keeps calling `module.denoise` and `module.soft_embedding`, so it runs
the compiled step without knowing it. Eager stays the default and the reference: tests check that the compiled
logits equal the eager ones to fp32 tolerance and that generation gives the same tokens on tiny configs.

Shapes: one graph serves every canvas. The context lengths are symbolic from the first compile on (the cached K/V,
made contiguous once per canvas, have their length marked dynamic, without duck sizing, which would tie the two
layer kinds' lengths together while they are equal in the first canvas; the context position reaches the graph as a
device tensor, not as an int that would be baked in), and a canvas's first step passes a zero self-conditioning
input (exactly "none") instead of None, so it is the same graph as every later step. Another batch size compiles
anew. With "reduce-overhead", CUDA graphs are still recorded per distinct shape, so once per canvas index (a
recording costs about two steps); the step's outputs are copied out of the graphs' memory pool (one [B,L,V] fp32
copy, ~0.1 ms on an H200 at V = 262,144), and the context K/V are copied into the graphs' static inputs each step.
No host synchronisation happens inside the compiled step.
"""

from __future__ import annotations

import functools

import torch
import torch._dynamo
import torch.fx.experimental._config

from ..model import moe
from ..model.compiling import COMPILE_MODES, raise_recompile_limits


def check_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)} "
                         "(or None for eager)")
    return mode


# --- the MoE dispatch under compile -----------------------------------------------------------------------------
def moe_dispatch(layer) -> str:
    """The dispatch the compiled step uses for a layer's experts: "grouped" (static counts), "dense", or "eager"
    (a subclass with its own math, e.g. LoRA or quantized experts, or no grouped GEMM and too many experts)."""
    experts = layer.experts
    if type(experts) is not moe.Experts:
        return "eager"
    w = experts.gate_up_proj
    if moe.grouped_dispatch(w.new_empty(0, w.shape[-1]), w, experts.down_proj):
        return "grouped"
    return "dense" if moe.dense_worthwhile(w.shape[0], layer.router.top_k) else "eager"


# --- the compiled step ---------------------------------------------------------------------------------------------
class ContextView:
    """What `denoise` reads from a cache (`context(i)`, `length`), resolved before the compiled call."""

    def __init__(self, contexts: tuple, length):
        self.contexts, self.length = contexts, length

    def context(self, layer: int):
        return self.contexts[layer]


class CompiledStep:
    """The compiled denoise and self-conditioning product of one module (see the module docstring)."""

    def __init__(self, module, mode: str = "default", backend: str = "inductor", dynamic: bool | None = None):
        self.module, self.mode, self.backend = module, check_mode(mode), backend
        # CUDA graphs replay into a memory pool that the next replay overwrites: outputs are copied out
        self.cudagraphs = mode == "reduce-overhead" and backend == "inductor"
        options = {"mode": mode} if backend == "inductor" else {}
        cls = type(module)
        self._memo = None  # (the cache's raw contexts, its length, canonical contexts, length tensor)
        self._zero = None  # the self-conditioning input of a canvas's first step
        self._denoise = torch.compile(lambda tokens, contexts, length, soft: cls.denoise(
            module, tokens, ContextView(contexts, length), soft=soft), backend=backend, dynamic=dynamic, **options)
        self._soft = torch.compile(functools.partial(cls.soft_embedding, module), backend=backend, dynamic=dynamic,
                                   **options)

    def denoise(self, tokens: torch.Tensor, cache, soft: torch.Tensor | None = None) -> torch.Tensor:
        contexts, length = self._contexts(cache, tokens.device)
        if soft is None:  # a zero signal is exactly none (no biases, rms-norm of 0 is 0): one graph for every step
            soft = self._zeros(tokens)
        return self._run(self._denoise, tokens, contexts, length, soft)

    def _zeros(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.module.embed_tokens.weight
        shape = (*tokens.shape, w.shape[1])
        if self._zero is None or self._zero.shape != shape or self._zero.device != tokens.device:
            self._zero = torch.zeros(shape, dtype=w.dtype, device=tokens.device)
        return self._zero

    def _contexts(self, cache, device) -> tuple:
        """(contexts, length) for the compiled call. The per-layer contexts in one memory layout (contiguous): a KV
        cache holds transposed projections after a prefill and trimmed views on sliding layers after a commit, and
        every layout would be its own graph; the length as a device tensor (a Python int would be baked into the
        graph; `torch.full` launches a fill, no host-to-device copy). A canvas's steps share one context, so this
        is done once per canvas: the memo holds the cache's own K/V tensors and reuses its result while they are
        the same objects (a cache replaces them whenever it is written)."""
        raw = tuple(cache.context(i) for i in range(self.module.config.num_hidden_layers))
        key = _length_key(cache.length)
        memo = self._memo
        if memo is not None and memo[1] == key and all(
                (a is None and b is None) or (a is not None and b is not None and a[0] is b[0] and a[1] is b[1])
                for a, b in zip(memo[0], raw)):
            return memo[2], memo[3]
        contexts = tuple(None if c is None else (_canonical(c[0]), _canonical(c[1]), c[2]) for c in raw)
        for c in contexts:  # the context lengths are symbolic from the first compile on
            if c is not None:
                for t, dim in ((c[0], 2), (c[1], 2), (c[2], 1)):
                    if t is not None:
                        torch._dynamo.maybe_mark_dynamic(t, dim)
        length = cache.length
        if isinstance(length, torch.Tensor):  # per-row lengths (stacked caches) live on the CPU
            length = length.to(device, non_blocking=True)
        else:
            length = torch.full((1,), length, dtype=torch.long, device=device)
        self._memo = (raw, key, contexts, length)
        return contexts, length

    def soft_embedding(self, sc_logits: torch.Tensor, sc_mask: torch.Tensor | None = None,
                       chunk: int | None = None) -> torch.Tensor:
        return self._run(self._soft, sc_logits, sc_mask, chunk)

    def _run(self, fn, *args):
        # no duck shapes: equal context lengths of both layer kinds in the first canvas stay two symbols, so the
        # next canvas (where they differ) reuses the graph
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            if not self.cudagraphs:
                return fn(*args)
            torch.compiler.cudagraph_mark_step_begin()
            return fn(*args).clone()


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """t contiguous, with the row-major strides even on size-1 dimensions (where torch leaves any stride, and the
    graph's guards would still tell the layouts apart): a copy only if t was not contiguous."""
    t = t.contiguous()
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= size
    strides = tuple(reversed(strides))
    return t if t.stride() == strides else t.as_strided(t.shape, strides, t.storage_offset())


def _length_key(length):
    return tuple(length.tolist()) if isinstance(length, torch.Tensor) else length  # stacked caches: a CPU tensor


PATCHED = ("denoise", "soft_embedding")


def compile_step(module, mode: str = "default", backend: str = "inductor", dynamic: bool | None = None) -> dict:
    """Install the compiled step on `module` (see the module docstring) -> {"mode", "moe": dispatch per layer}."""
    uncompile_step(module)
    step = CompiledStep(module, mode, backend, dynamic)
    raise_recompile_limits()
    dispatch = []
    for layer in module.layers:
        kind = moe_dispatch(layer)
        if kind == "dense":  # "grouped": Experts.forward itself (static-size offsets, no host read)
            layer.experts.dense = True
        dispatch.append(kind)
    # the model's derived constants, made now (eagerly) so the graph only reads its caches
    w = module.embed_tokens.weight
    module.rope(torch.zeros(1, 1, dtype=torch.long, device=w.device), torch.float32)
    module.embed_scale(w.dtype)
    module.denoise, module.soft_embedding = step.denoise, step.soft_embedding
    return {"mode": mode, "backend": backend, "moe": sorted(set(dispatch))}


def uncompile_step(module) -> None:
    """Remove everything `compile_step` installed (a no-op on an eager module)."""
    for name in PATCHED:
        module.__dict__.pop(name, None)
    for layer in module.layers:
        layer.experts.__dict__.pop("dense", None)  # back to the class default (eager dispatch)
