"""`dgemma train`: ONE readable training loop (nanoGPT's shape) for the diffusion objective of spec §7.

    TrainConfig -> model (scratch | full | lora) + tokenizer -> examples -> for each step:
        micro-batches -> loss.backward (DDP all-reduces) -> clip -> AdamW -> log / eval / checkpoint
    -> the final model in the released checkpoint's layout

Output directory (`out`):
    log.jsonl               one JSON object per step ({"kind": "train", ...}) and per evaluation ("eval")
    loss.png                the loss curve (plot.py)
    checkpoints/step-N/     resumable: HF model files (lora: adapter files) + trainer_state.pt
    model/                  final model (LoRA merged) + tokenizer files + generation_config.json; `dgemma.load` and
                            transformers 5.23 both read it
    adapter/                lora only: the final adapters unmerged + generation_config.json (+ the tokenizer files
                            when --tokenizer is given); `dgemma.load` loads it as the base model with them merged in

Reproducibility. The data order (data.Order), the noise of every example (seeded by its slot in the stream of
examples, data.mix) and the learning rate (`learning_rate`) are pure functions of (seed, step). A checkpoint
therefore only needs the weights, the optimizer moments and the step; a run interrupted at step k and resumed
gives bit-identical weights at step n. For the same reason the noise does not depend on how a global batch is
split into micro-batches or across data-parallel ranks (torchrun --nproc_per_node N).

`batch_size` is the GLOBAL batch: examples per optimizer step over all ranks and micro-steps. Each loss is
normalised by the global step's target counts, so ranks x micro-steps x micro-batch only change the arithmetic
order, not the result.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config import TOKENIZER_FILES, ModelConfig, model_file
from ..model import DiffusionGemma, load_module, lora, moe
from ..model.compiling import raise_recompile_limits
from ..model.saving import init_weights, save_checkpoint
from ..text import Tokenizer
from .batches import StepBatches, step_batches
from .data import collate, load_examples, mix, split_heldout
from .config import CALIBRATION_STEPS, DTYPES, SAME_ON_RESUME, TrainConfig, TrainResult, \
    fit_steps_to_budget, learning_rate
from .loss import METRICS, LossConfig, diffusion_loss, summarize
from .plot import Log, progress_bar

EVAL_SALT = 0x5EED_E7A1  # eval noise seeds differ from every training seed, and stay fixed across evaluations

# Every rank holds the same buffers (the layer scalars), so DDP need not broadcast them before each forward.
# torch 2.13 renamed the switch and warns on the old spelling; older torch only has the old one.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


class Objective(nn.Module):
    """The loss as a module's forward, so DistributedDataParallel can hook it; the model stays a plain stack."""

    def __init__(self, model: DiffusionGemma, cfg: LossConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch):
        return diffusion_loss(self.model, batch, None, self.cfg)


def _fix_steps(cfg: TrainConfig, step: int, elapsed: float, timed: list[float], world: int, device, log, out: Path,
               lead: bool) -> TrainConfig:
    """Ends the time-budget calibration: every rank adopts rank 0's step count; the run's saved config then
    reads as the equivalent fixed-step run (what --resume continues and what reproduces it)."""
    steps = torch.tensor([fit_steps_to_budget(cfg, step, elapsed, timed)], device=device)
    if world > 1:
        dist.broadcast(steps, 0)
    fixed = replace(cfg, steps=int(steps), time_budget=0.0)
    if lead:
        (out / "train_config.json").write_text(json.dumps(fixed.to_json(), indent=2) + "\n")
        log.write({"kind": "budget", "step": step, "steps": fixed.steps, "time_budget": cfg.time_budget,
                   "elapsed": elapsed, "seconds_per_step": sorted(timed)[len(timed) // 2]})
    return fixed


# --- setup ---------------------------------------------------------------------------------------------------
def _distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"device {cfg.device!r} is not a torch device; use cpu or cuda (or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r}: this torch sees no CUDA device; use cpu (or omit the device)")
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def base_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The dtype the loaded model's weights are held in: fp32 master weights for everything that trains, except a
    LoRA run under --dtype bfloat16, whose frozen base stays as stored (None: a bf16 checkpoint stays bf16, half
    the memory of fp32 copies, e.g. 52 instead of 104 GB for 26B-A4B). Its fp32 adapters are the only masters, autocast
    computes in the low dtype either way, and the merged model is written in the base's dtype, each weight rounded
    once (lora._fold). Under --dtype float32 the computation is fp32, so the base is loaded in fp32."""
    return None if cfg.init == "lora" and DTYPES[cfg.dtype] != torch.float32 else torch.float32


def _build_model(cfg: TrainConfig, device, checkpoint: Path | None):
    """The model to train (fp32 master weights, train mode, trainable flags set), resuming from `checkpoint`."""
    if cfg.init == "scratch" and checkpoint is None:
        model = DiffusionGemma(ModelConfig.from_file(cfg.config))
        init_weights(model, torch.Generator().manual_seed(cfg.seed))
        model = model.to(device)
    else:
        source = checkpoint if checkpoint is not None and cfg.init != "lora" else cfg.model
        model = load_module(source, dtype=base_dtype(cfg), device=device, quiet=True)
    model.train().requires_grad_(True)
    if cfg.init == "lora":
        lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                        generator=torch.Generator().manual_seed(cfg.seed))
        if checkpoint is not None:
            from safetensors.torch import load_file
            lora.load_lora_state_dict(model, load_file(checkpoint / lora.ADAPTER_FILE))
    if cfg.router_frozen:
        for layer in model.layers:
            layer.router.requires_grad_(False)
    return model


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # on CUDA the fused kernel: the same update in a couple of launches instead of a few dozen foreach ones
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def choose_moe_dispatch(model: DiffusionGemma, cfg: TrainConfig, device: torch.device) -> bool:
    """Few experts (moe.dense_worthwhile) and either --compile or CUDA in fp32 (no grouped GEMM there, so the
    per-expert loop would sync with the host in every layer): every expert runs on every token (`Experts.dense`).
    Returns whether it did."""
    mc = model.config
    dense = moe.dense_worthwhile(mc.num_experts, mc.top_k_experts) and (
        cfg.compile or (device.type == "cuda" and DTYPES[cfg.dtype] == torch.float32))
    for layer in model.layers:
        layer.experts.dense = dense
    return dense


def compile_layers(model: DiffusionGemma, mode: str = "default") -> None:
    """Regional compilation: every layer runs the same compiled `Layer.forward` (parameters are graph inputs, so
    the 8 layers share each graph). A graph per layer kind (sliding/full head sizes) x pass (encoder, decoder with
    and without grad): ~6 compilations, then reuse. State-dict keys do not change (checkpoints are unaffected)."""
    raise_recompile_limits()
    for layer in model.layers:
        layer.compile(mode=mode)


def _generation_config(cfg: TrainConfig, model_config: ModelConfig, tokenizer: Tokenizer) -> dict:
    source = model_file(cfg.model, "generation_config.json") if cfg.model else None
    if source is not None:
        return json.loads(source.read_text())
    stops = list(dict.fromkeys(tokenizer.stop_ids)) or list(model_config.eos_token_id)
    return {"max_new_tokens": model_config.canvas_length, "max_denoising_steps": 48, "eos_token_id": stops,
            "pad_token_id": model_config.pad_token_id, "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
            "confidence_threshold": 0.005,
            "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1}}


# --- checkpoints ---------------------------------------------------------------------------------------------
def _checkpoints(out: Path) -> list[Path]:
    found = [p for p in (out / "checkpoints").glob("step-*")  # not step-N.partial: a save interrupted before rename
             if p.name[5:].isdigit() and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _tokenizer_dir(cfg: TrainConfig) -> Path:
    """Where the run's tokenizer files are: --tokenizer, else the model's (a LoRA adapter's: its own or its base's)."""
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    found = model_file(cfg.model, "tokenizer.json")
    return found.parent if found is not None else Path(cfg.model)


def _copy_tokenizer(cfg: TrainConfig, directory: Path) -> None:
    for name in TOKENIZER_FILES:
        src = _tokenizer_dir(cfg) / name
        if src.is_file():
            shutil.copyfile(src, directory / name)


def _export(model, directory: Path, cfg: TrainConfig, generation: dict, metadata: dict) -> None:
    save_checkpoint(model, directory, generation_config=generation, metadata={k: str(v) for k, v in metadata.items()})
    _copy_tokenizer(cfg, directory)


def _save_adapter(model, directory: Path, cfg: TrainConfig, generation: dict) -> None:
    """An adapter directory that loads as the merged model would: the base it records, the run's generation config,
    and the run's tokenizer when --tokenizer named one (else the base model's is the run's)."""
    lora.save_adapter(model, directory, base_model=cfg.model, generation_config=generation)
    if cfg.tokenizer:
        _copy_tokenizer(cfg, directory)


def _save(model, optimizer, step: int, cfg: TrainConfig, generation: dict, out: Path) -> Path:
    """checkpoints/step-N/: model files (lora: adapter only) + trainer_state.pt, written then renamed."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.init == "lora":
        _save_adapter(model, tmp, cfg, generation)
    else:
        _export(model, tmp, cfg, generation, {"dgemma_step": step})
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng, "config": cfg.to_json()},
               tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _checkpoints(out)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def _check_resume(saved: dict, cfg: TrainConfig, where: Path) -> None:
    now = cfg.to_json()
    changed = [k for k in SAME_ON_RESUME if json.dumps(saved.get(k)) != json.dumps(now.get(k))]
    if changed:
        warnings.warn(f"{where}: resuming with changed settings {changed}; the run will not equal an uninterrupted one",
                      stacklevel=3)


# --- the loop ------------------------------------------------------------------------------------------------
def _reduce(sums: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(sums)
    return sums


@torch.no_grad()
def evaluate(objective: nn.Module, examples, micro: int, cfg: TrainConfig, rank: int, world: int, device, pad: int,
             canvas_length: int, autocast) -> dict:
    """Loss over every held-out example with fixed noise (seeded by the example index), split across ranks."""
    sums = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
    mine = list(range(rank, len(examples), world))
    for i in range(0, len(mine), micro):
        idx = mine[i:i + micro]
        batch = collate([examples[j] for j in idx], pad, canvas_length, [mix(cfg.seed, EVAL_SALT, j) for j in idx])
        with autocast():
            _, metrics = objective(batch.to(device))  # not the DDP wrapper: no gradient hooks in eval
        sums += torch.stack([metrics[k] for k in METRICS])
    return summarize(dict(zip(METRICS, _reduce(sums, world).tolist())), cfg.loss.ar_weight)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns where the final model is. Under torchrun every rank calls
    this; only rank 0 writes files."""
    began = time.perf_counter()
    rank, world, device = _distributed(cfg)
    if device.type == "cuda":  # process-wide switches: the trainer owns its process (the CLI, torchrun)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file; pass a directory (new, or a run's to resume)")
    ModelConfig.from_file(cfg.config if cfg.init == "scratch" else cfg.model)  # a wrong path says so, not the tokenizer
    torch.manual_seed(cfg.seed)
    checkpoint = _checkpoints(out)[-1] if cfg.resume and _checkpoints(out) else None
    if not cfg.resume and _checkpoints(out):
        raise ValueError(f"{out} already holds checkpoints; pass resume to continue it, or choose another out")
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True) if checkpoint else None
    if state is not None:
        _check_resume(state["config"], cfg, checkpoint)
        if cfg.time_budget:  # timed afresh from here: the LR of the steps until then follows the maximum step count
            warnings.warn(f"{checkpoint}: resuming with a time budget: the step count is fitted again after "
                          f"{CALIBRATION_STEPS} more steps, so the run will not equal an uninterrupted one (nor "
                          "--steps N); resume with a fixed step count for that", stacklevel=2)
        if state["step"] > cfg.steps:
            raise ValueError(f"{checkpoint} is at step {state['step']}, past steps={cfg.steps}; resume with more "
                             "steps, or start the shorter run in another out")

    tokenizer = Tokenizer.from_dir(_tokenizer_dir(cfg))
    model = _build_model(cfg, device, checkpoint)
    mc: ModelConfig = model.config
    if tokenizer.vocab_size > mc.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {mc.vocab_size}; "
                         "use a bigger vocab_size in the config or a smaller tokenizer")
    L, max_len = mc.canvas_length, cfg.max_seq_len or mc.max_position_embeddings
    if max_len > mc.max_position_embeddings:  # inference refuses positions past it (Engine.check_context)
        raise ValueError(f"max_seq_len {max_len} exceeds the model's max_position_embeddings "
                         f"{mc.max_position_embeddings}; pass --max-seq-len {mc.max_position_embeddings} or less")
    load = dict(canvas_length=L, max_len=max_len, raw=cfg.raw, on_too_long=cfg.on_too_long)
    examples = load_examples(cfg.data, tokenizer, **load)
    examples, heldout = split_heldout(examples, cfg.eval_holdout, cfg.seed)
    if cfg.eval_data:
        heldout = heldout + load_examples(cfg.eval_data, tokenizer, **load)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must split evenly over {world} rank(s) x grad_accum "
                         f"{cfg.grad_accum}")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    pad = mc.pad_token_id

    optimizer = _optimizer(model, cfg)
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start = state["step"]
    choose_moe_dispatch(model, cfg, device)
    if cfg.compile:
        compile_layers(model, cfg.compile)
    objective = Objective(model, cfg.loss)
    runner = objective
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(objective, **NO_BUFFER_SYNC,
                                                     device_ids=[device] if device.type == "cuda" else None)
    generation = _generation_config(cfg, mc, tokenizer)
    lead = rank == 0
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    log = Log(out, start, lead)
    dtype = DTYPES[cfg.dtype]

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    feed = step_batches(StepBatches(examples, cfg.seed, cfg.batch_size, cfg.grad_accum, rank, world, pad, L,
                                    mc.vocab_size, cfg.loss), start, cfg.data_workers_for(device))
    params = [p for p in model.parameters() if p.requires_grad]
    progress = progress_bar(lead and cfg.progress, cfg.steps, start)
    metrics, eval_metrics, timed = {}, None, []
    try:
        step = start
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
            for m, batch in enumerate(next(feed)):
                batch = batch.to(device)
                sync = world == 1 or m == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync else runner.no_sync()), autocast():
                    loss, batch_metrics = runner(batch)
                # DDP averages gradients over ranks; the loss is already a share of the global mean, so undo that
                (loss * world).backward()
                sums += torch.stack([batch_metrics[k] for k in METRICS])
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = summarize(dict(zip(METRICS, _reduce(sums, world).tolist())), cfg.loss.ar_weight)
            seconds = time.perf_counter() - t0
            log.write({"kind": "train", "step": step + 1, **metrics, "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_s": metrics["tokens"] / seconds, "seconds": seconds})
            if cfg.time_budget and step - start >= 3:
                timed.append(seconds)
                if len(timed) == CALIBRATION_STEPS - 3:
                    cfg = _fix_steps(cfg, step + 1, time.perf_counter() - began, timed, world, device, log, out, lead)
                    if progress is not None:
                        progress.update(progress.task_ids[0], total=cfg.steps)
            if progress is not None:
                progress.update(progress.task_ids[0], completed=step + 1, loss=metrics["loss"],
                                tps=metrics["tokens"] / seconds)
            done = step + 1 == cfg.steps
            if heldout and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                model.eval()
                eval_metrics = evaluate(objective, heldout, micro, cfg, rank, world, device, pad, L, autocast)
                model.train()
                log.write({"kind": "eval", "step": step + 1, **eval_metrics})
            if done or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                if lead:
                    _save(model, optimizer, step + 1, cfg, generation, out)
                    log.plot()
                if world > 1:
                    dist.barrier()
            step += 1
    finally:
        if progress is not None:
            progress.stop()
    final = out / "model"
    if lead:
        if cfg.init == "lora":
            _save_adapter(model, out / "adapter", cfg, generation)
            lora.merge_lora(model)
        shutil.rmtree(final, ignore_errors=True)
        _export(model, final, cfg, generation, {"dgemma_step": cfg.steps, "dgemma_init": cfg.init})
        log.plot()
        if cfg.progress:
            print(f"dgemma train: model written to {final}", file=sys.stderr)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out, final, cfg.steps, metrics, eval_metrics)
