"""`dgemma plan`: how much memory a model needs, from its config alone (no weights are read or allocated).

Components (bytes), each computed from what dgemma's code allocates:
* weights: the module built on the meta device, quantized modules swapped in (the same swap `dgemma.load`
  does), every parameter and buffer counted at its dtype: exact for what loading allocates.
* kv_cache_per_request: K and V of every layer at `context` positions; sliding layers keep only their last
  window-1 entries (engine/cache.py), full layers everything.
* sampler_per_canvas: the vocabulary-sized buffers of one canvas at their peak, the tied head: the kept
  self-conditioning logits and the fp32 logits, soft-capped in place (model/layers.softcap), plus the head's
  product in the weight dtype when that is not fp32 = 2 to 2.5 fp32 [L, V] buffers (`sampler_bytes`); the lean
  sampler step works in place with one shared chunk: 18 MiB on a CPU, 160 MiB on a GPU (sampling/lean.py
  `work_bytes`; `--device`).
* activation_peak: the largest non-vocabulary working set: max of (a) the prompt prefill, an encoder pass over
  `prompt` tokens, or with `prefill_chunk` its largest piece (encoder.encode's pieces, the last full one or the
  last one), and (b) a denoising step of all canvases. A pass holds the residual stream plus the larger of its
  mixture of experts (the routed copies of the tokens, the experts' outputs, their concatenation and two fp32
  weighted copies, K per token) and its attention (the keys and values concatenated to the cache, repeated per
  query head where attention.attend does so; the encoder's mask as attention.chunk_queries splits it: one chunk's
  block and SDPA's copy of it per call, or a short pass's whole [T, S] masks, held for the pass); a layer runs
  one, then the other.
total = weights + concurrency * kv + max(prefill activations, the step's peak), since a prefill and a canvas's
step never overlap; the step's peak is the largest of C * sampler (at the head), C * 2 [L, V] + the sampler's
chunk (in the step), C * 1 [L, V] + the step's layer activations (in the layers), for C concurrent canvases
batched in one forward. Checked against a measured peak on small configs in tests/test_plan.py (within 15%): the
whole plan where the vocabulary buffers dominate, the prefill in one pass and in pieces where it dominates.
Assumed: an attention kernel that does not materialise the [T, S] score matrix (CUDA SDPA; the CPU flash kernel).
Assumed too: one request's prompt is prefilled at a time unless `prefill_rows` (--prefill-rows) says how many are
encoded together (a batch of B in one `generate` call, or equal-length requests the scheduler groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig, model_chain
from .model.blocks import DiffusionGemma
from .quant.modules import swap_modules
from .quant.schemes import DEFAULT_GROUP_SIZE, SCHEMES, scale_dtype_for
from .sampling.lean import work_bytes

GiB = 2 ** 30
DEFAULT_CONTEXT = 8192  # tokens per request when none is given (or the model's positions, if fewer)


@dataclass(frozen=True)
class Plan:
    config: ModelConfig
    quant: str | None
    group_size: int | None
    dtype: torch.dtype
    context: int
    prompt: int
    prefill_chunk: int | None
    concurrency: int
    weights: dict[str, int]
    kv_cache_per_request: int
    sampler_per_canvas: int
    prefill_activations: int
    step_activations: int
    device: str  # where it runs: sets the sampler step's shared work buffer (sampling/lean.py)
    scale_dtype: torch.dtype | None = None  # a quantized checkpoint's recorded scale dtype (else the scheme's rule)
    prefill_rows: int = 1  # prompts prefilled together in one pass (a generate() call with that many prompts)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def activation_peak(self) -> int:
        return max(self.prefill_activations, self.step_activations)

    @property
    def total_bytes(self) -> int:
        c = self.concurrency
        unit = vocab_unit(self.config)
        step = max(c * self.sampler_per_canvas, c * 2 * unit + work_bytes(self.device),
                   c * unit + self.step_activations)
        return self.weight_bytes + c * self.kv_cache_per_request + max(self.prefill_activations, step)

    def max_concurrency(self, budget_bytes: float) -> int:
        """Most concurrent canvases (each its own request and cache) whose total fits `budget_bytes`."""
        per = self.kv_cache_per_request + self.sampler_per_canvas  # a lower bound on each canvas's cost
        room = budget_bytes - self.weight_bytes
        if room < self.prefill_activations + self.kv_cache_per_request:
            return 0
        lo, hi = 0, int(room // per) + 1  # total_bytes grows with n: binary search the last n that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if plan_with(self, mid).total_bytes <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def as_dict(self) -> dict:
        return {"quant": self.quant or "none", "group_size": self.group_size,
                "dtype": str(self.dtype).removeprefix("torch."), "context": self.context, "prompt": self.prompt,
                "prefill_chunk": self.prefill_chunk, "prefill_rows": self.prefill_rows, "device": self.device,
                "concurrency": self.concurrency, "weights_bytes": self.weight_bytes,
                "weights_by_component": self.weights, "kv_cache_per_request_bytes": self.kv_cache_per_request,
                "sampler_per_canvas_bytes": self.sampler_per_canvas,
                "prefill_activation_bytes": self.prefill_activations,
                "step_activation_bytes": self.step_activations, "activation_peak_bytes": self.activation_peak,
                "total_bytes": self.total_bytes}


def weight_bytes(cfg: ModelConfig, quant: str | None, group_size: int | None, dtype: torch.dtype,
                 scale_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes per component of what `dgemma.load` allocates (meta device, so nothing is allocated here).
    scale_dtype: what a quantized checkpoint stores (an fp32 source keeps fp32 int4 scales under bfloat16)."""
    with torch.device("meta"):
        module = DiffusionGemma(cfg).to(dtype)
    if quant is not None:
        swap_modules(module, quant, group_size, scale_dtype or scale_dtype_for(dtype, quant))
    out = {"experts": 0, "embedding (tied head)": 0, "attention + dense/self-cond MLPs": 0, "router + norms": 0}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        n = t.numel() * t.element_size()
        if ".experts." in name:
            out["experts"] += n
        elif name.startswith("embed_tokens"):
            out["embedding (tied head)"] += n
        elif ".self_attn." in name and not name.endswith("norm.weight") or ".mlp." in name \
                or name.startswith("self_conditioning.") and "norm" not in name:
            out["attention + dense/self-cond MLPs"] += n
        else:
            out["router + norms"] += n
    return out


def kv_cache_bytes(cfg: ModelConfig, context: int, itemsize: int) -> int:
    total = 0
    for i in range(cfg.num_hidden_layers):
        kept = min(context, cfg.sliding_window - 1) if cfg.is_sliding(i) else context
        total += 2 * cfg.num_kv_heads_of(i) * cfg.head_dim_of(i) * kept * itemsize
    return total


def vocab_unit(cfg: ModelConfig) -> int:
    """One fp32 [L, V] buffer: a canvas's logits."""
    return cfg.canvas_length * cfg.vocab_size * 4


def sampler_bytes(cfg: ModelConfig, itemsize: int = 4) -> int:
    """Vocabulary-sized peak of one canvas, at the tied head: the kept self-conditioning logits plus the head's
    fp32 logits, soft-capped in place = 2 fp32 [L, V] buffers, plus the head's product in the weight dtype while
    it is copied to fp32 (bf16: half a buffer; fp32 weights: the product IS the fp32 logits). The sampler step
    itself (2 buffers + one shared chunk, see `Plan.total_bytes`) and the chunked soft embedding stay at or
    below that."""
    unit = vocab_unit(cfg)
    return 2 * unit + (unit * itemsize // 4 if itemsize < 4 else 0)


def attention_bytes(cfg: ModelConfig, tokens: int, context: int, itemsize: int, causal: bool,
                    device: str) -> tuple[int, int]:
    """(held for the whole pass, working set of one layer's attention at its largest layer kind) beyond the residual
    stream. The working set: the keys and values
    concatenated to the cache, the query heads (q, rotated q, output), the K/V heads repeated per query head where
    attention.attend does so (CUDA, unless the flash kernel takes the call), and, for a causal (encoder) pass, its
    mask: split as attention.chunk_queries splits it (asked here on the meta device, so the same rule decides), a
    long pass builds one chunk's bool block per call and SDPA copies it to the query dtype, plus the chunks' outputs
    before their concatenation; a pass it leaves whole holds one bool [T, S] mask per layer kind for the whole pass
    (the held bytes), and SDPA copies it in each call."""
    from .model.attention import ChunkedMask, chunk_queries, flash_takes
    from .model.encoder import EncoderMask

    H = cfg.num_attention_heads
    held, worst = 0, 0
    for sliding in sorted({cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)}):
        i = next(i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i) == sliding)
        kept = min(context, cfg.sliding_window - 1) if sliding else context
        dh, hk, keys = cfg.head_dim_of(i), cfg.num_kv_heads_of(i), kept + tokens
        extra = 0
        if causal:
            mask = chunk_queries(EncoderMask(kept, tokens, context, cfg.sliding_window if sliding else None, None,
                                             "meta"))
            if isinstance(mask, ChunkedMask):
                rows, keys = max(((q1 - q0), (k1 - k0)) for q0, q1, k0, k1 in mask.chunks)
                extra = rows * keys * (1 + itemsize) + tokens * H * dh * itemsize
            else:
                held += tokens * keys
                extra = tokens * keys * itemsize
        flash = flash_takes(itemsize == 2, dh, masked=causal)  # attention.attend repeats no heads then
        repeated = 2 * keys * H * dh * itemsize if device == "cuda" and H != hk and not flash else 0
        worst = max(worst, 2 * (kept + tokens) * hk * dh * itemsize + repeated + 3 * tokens * H * dh * itemsize
                    + extra)
    return held, worst


def pass_activation_bytes(cfg: ModelConfig, tokens: int, context: int, itemsize: int, causal: bool,
                          device: str = "cuda", rows: int = 1) -> int:
    """Working set of one pass over `tokens` new tokens against `context` cached ones (no vocab terms): the residual
    stream, plus the larger of the mixture of experts (the routed copies of the tokens, K per token, the experts'
    outputs and two fp32 weighted copies; the router's fp32 scores) and the attention (`attention_bytes`): a layer
    runs one, then the other, and each frees its working set before the next begins; plus the masks a short encoder
    pass holds throughout. `rows` sequences of `tokens` each in one pass (a batch of prompts) take `rows` times the
    per-token and per-row terms; the mask is one for all of them (no padding)."""
    D, K, n = cfg.hidden_size, cfg.top_k_experts, rows * tokens
    moe = n * K * D * (3 * itemsize + 8) + n * cfg.num_experts * 4 * 2
    stream = n * D * (3 * itemsize + 2 * 4)  # residual, normed input, layer output; fp32 norm temporaries
    held, attention = attention_bytes(cfg, tokens, context, itemsize, causal, device)
    return held + max(stream + moe, 2 * n * D * itemsize + rows * attention)  # residual + normed input in attention


def make_plan(cfg: ModelConfig, *, quant: str | None = None, group_size: int | None = None,
              dtype: torch.dtype = torch.bfloat16, context: int | None = None, concurrency: int = 1,
              prompt: int | None = None, prefill_chunk: int | None = None, device: str = "cuda",
              scale_dtype: torch.dtype | None = None, prefill_rows: int = 1) -> Plan:
    if quant == "int4":
        group_size = group_size or DEFAULT_GROUP_SIZE
    else:
        group_size = None  # int8 / fp8: one scale per output channel
    context = min(DEFAULT_CONTEXT, cfg.max_position_embeddings) if context is None else context
    if context < cfg.canvas_length:
        raise ValueError(f"context {context} is shorter than one canvas ({cfg.canvas_length} tokens)")
    if context > cfg.max_position_embeddings:
        raise ValueError(f"context {context:,} exceeds this model's {cfg.max_position_embeddings:,} positions "
                         "(max_position_embeddings); the engine refuses longer requests")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if prefill_rows < 1:
        raise ValueError(f"prefill_rows must be >= 1, got {prefill_rows}")
    prompt = context - cfg.canvas_length if prompt is None else prompt
    if not 0 <= prompt <= context - cfg.canvas_length:
        raise ValueError(f"a {prompt:,}-token prompt leaves no room for a {cfg.canvas_length}-token canvas in a "
                         f"context of {context:,}: give --prompt at most {context - cfg.canvas_length:,}, or a "
                         f"--context of at least {prompt + cfg.canvas_length:,}")
    itemsize = dtype.itemsize
    # a prompt prefilled in pieces of `prefill_chunk` tokens (encoder.encode): full pieces, then what is left; the
    # last full piece (the most tokens) or the last piece (the most context) peaks
    piece = min(prompt, prefill_chunk or prompt)
    passes = {(prompt - (prompt - 1) // piece * piece, (prompt - 1) // piece * piece)} if prompt else set()
    if prompt > piece:
        passes.add((piece, ((prompt - 1) // piece - 1) * piece))
    prefill = max((pass_activation_bytes(cfg, t, c, itemsize, True, device, prefill_rows) for t, c in passes),
                  default=0)
    return Plan(cfg, quant, group_size, dtype, context, prompt, prefill_chunk, concurrency,
                weight_bytes(cfg, quant, group_size, dtype, scale_dtype), kv_cache_bytes(cfg, context, itemsize),
                sampler_bytes(cfg, itemsize),
                prefill,
                pass_activation_bytes(cfg, concurrency * cfg.canvas_length, context, itemsize, False, device), device,
                scale_dtype, prefill_rows)


def plan_with(plan: Plan, concurrency: int) -> Plan:
    return make_plan(plan.config, quant=plan.quant, group_size=plan.group_size, dtype=plan.dtype,
                     context=plan.context, concurrency=concurrency, prompt=plan.prompt,
                     prefill_chunk=plan.prefill_chunk, device=plan.device, scale_dtype=plan.scale_dtype,
                     prefill_rows=plan.prefill_rows)


def table_unit(largest: int) -> tuple[str, int, str, int]:
    """(binary name, bytes, decimal name, bytes) of the largest unit in which `largest` is at least 1: GiB for a
    model of gigabytes, MiB/KiB for a small one (whose sizes would all read 0.00 GiB)."""
    for power, binary, decimal in ((3, "GiB", "GB"), (2, "MiB", "MB")):
        if largest >= 1024 ** power:
            return binary, 1024 ** power, decimal, 1000 ** power
    return "KiB", 1024, "kB", 1000


def render(plan: Plan, budgets_gib=(18, 24, 80)) -> list[str]:
    c = plan.concurrency
    prompts = f"{plan.prefill_rows} {plan.prompt:,}-token prompts together" if plan.prefill_rows > 1 else \
        f"{plan.prompt:,}-token prompt"
    prefill = f"prefill, {prompts} " + (f"in {plan.prefill_chunk:,}-token pieces" if plan.prefill_chunk
                                         else "in one pass")
    rows = [(f"weights: {plan.quant or 'not quantized'}" + (f", group {plan.group_size}" if plan.group_size else "")
             + f", rest {str(plan.dtype).removeprefix('torch.')}", plan.weight_bytes)]
    rows += [(f"  {name}", n) for name, n in plan.weights.items()]
    rows += [(f"KV cache per request at {plan.context:,} tokens", plan.kv_cache_per_request),
             ("sampler + self-conditioning per canvas", plan.sampler_per_canvas),
             ("activation peak", plan.activation_peak), (f"  {prefill}", plan.prefill_activations),
             (f"  denoising step, {c} canvas(es)", plan.step_activations),
             (f"total, {c} concurrent canvas(es)", plan.total_bytes)]
    binary, b, decimal, d = table_unit(plan.total_bytes)
    lines = [f"{label:<50}{n / b:8.2f} {binary} ({n / d:6.2f} {decimal})" for label, n in rows]
    for gb in budgets_gib:
        n = plan.max_concurrency(gb * GiB)
        lines.append(f"fits in {gb:g} GiB: " + (f"yes, up to {n} concurrent canvas(es) at this context" if n else "no"))
    lines.append("budgets are GiB, what GPU makers call GB (a '24 GB' card has 24 GiB); not counted: the CUDA "
                 "context (~0.3-0.5 GiB) and allocator fragmentation")
    return lines


# --- `dgemma plan` ------------------------------------------------------------------------------------------
def add_plan_parser(subparsers) -> None:
    from .argtypes import non_negative_int, positive_int

    p = subparsers.add_parser("plan", help="memory needed for weights, KV cache, sampler and activations, from the "
                                           "config alone (nothing is downloaded or allocated)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (a quantized one brings its scheme)")
    src.add_argument("--config", help="config.json (or a directory with one)")
    p.add_argument("--quant", choices=["none", *SCHEMES], default=None,
                   help="weight quantization (default: the checkpoint's, else none)")
    p.add_argument("--group-size", type=positive_int, default=None, help=f"int4 group size ({DEFAULT_GROUP_SIZE})")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="dtype of unquantized weights, activations and the KV cache (default: with --model, the one "
                        "dgemma.load keeps, i.e. as stored; with --config, bfloat16)")
    p.add_argument("--context", type=positive_int, default=None,
                   help=f"tokens per request (default {DEFAULT_CONTEXT}, or the model's positions if fewer)")
    p.add_argument("--prompt", type=non_negative_int, default=None,
                   help="prompt tokens prefilled in one pass (default: context minus one canvas)")
    p.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help="plan a prompt prefilled in pieces of N tokens (generate, chat and serve take "
                        "the same --prefill-chunk N; default: one pass)")
    p.add_argument("--concurrency", type=positive_int, default=1, help="canvases denoised at once (default 1)")
    p.add_argument("--prefill-rows", type=positive_int, default=1, metavar="N",
                   help="prompts prefilled together in one pass: a generate() call with N prompts, or N equal-length "
                        "requests that the server's scheduler groups (default 1: one prompt at a time)")
    p.add_argument("--budget", type=float, action="append", default=None, metavar="GB",
                   help="memory budgets to check, in GiB (repeatable; default 18, 24, 80)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where it will run: the sampler's work buffer is 160 MiB on a GPU, 18 MiB on a CPU "
                        "(default cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_plan)


RUN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes a loaded module runs in


def cmd_plan(args) -> int:
    import json
    import math
    from pathlib import Path

    from .model.checkpoint import list_tensors
    from .model.loading import stored_float_bytes
    from .quant.modules import read_metadata

    path = Path(args.model or args.config)
    cfg = ModelConfig.from_file(path)
    quant, group_size, scale_dtype = args.quant, args.group_size, None
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    if args.model and path.is_dir():
        infos, metadata = list_tensors(model_chain(path)[-1])  # a LoRA adapter: its base model's weights
        record = read_metadata(metadata)
        if record is not None and quant is None:
            quant, group_size = record["scheme"], group_size or record["group_size"]
            scale_dtype = record["scale_dtype"]
        # what dgemma.load keeps: the stored dtype (if mixed, the one holding most bytes; fp8 codes never run so)
        stored = {d: n for d, n in stored_float_bytes(infos).items() if d in RUN_DTYPES}
        if dtype is None and stored:
            dtype = max(stored, key=stored.get)
    dtype = dtype or torch.bfloat16
    quant = None if quant in (None, "none") else quant
    if args.group_size is not None and quant != "int4":
        raise ValueError(f"--group-size applies to int4 only, not to {quant or 'unquantized'} weights (int8 and fp8 "
                         "have one scale per output channel); drop it or add --quant int4")
    plan = make_plan(cfg, quant=quant, group_size=group_size, dtype=dtype, context=args.context,
                     concurrency=args.concurrency, prompt=args.prompt, prefill_chunk=args.prefill_chunk,
                     device=args.device, scale_dtype=scale_dtype, prefill_rows=args.prefill_rows)
    budgets = args.budget or [18, 24, 80]
    if not all(math.isfinite(gb) and gb > 0 for gb in budgets):
        raise ValueError(f"--budget takes a positive number of GiB, got {args.budget}")
    if args.json:
        fits = {f"{gb:g}GiB": plan.max_concurrency(gb * GiB) for gb in budgets}
        print(json.dumps({"source": str(path), **plan.as_dict(), "max_concurrency": fits}))
        return 0
    print(f"dgemma plan: {path}")
    for line in render(plan, budgets):
        print("  " + line)
    return 0
