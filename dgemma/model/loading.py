"""Hugging Face checkpoint -> DiffusionGemma module: the ONE key-mapping table, meta build, mmap + assign.

What is physically in a checkpoint (spec §3.3): every text weight under `model.decoder.`, the encoder's 30
`layer_scalar` buffers, the vision tower (skipped until image input exists), nothing for `lm_head` (tied
to the embedding). Anything else that a tool may have written (untied encoder copies, an explicit
`lm_head.weight`) must equal its decoder twin, which we check instead of assuming.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import torch

from ..config import ModelConfig, is_adapter, missing_path
from .blocks import DiffusionGemma
from .checkpoint import DTYPE_NAMES, INDEX_FILE, SINGLE_FILE, CheckpointError, MappedFiles, list_tensors

QUANTIZATION_KEY = "dgemma.quantization"  # metadata of a `dgemma quantize` checkpoint (dgemma/quant/modules.py)

# (checkpoint key pattern, action, our parameter name). Actions: "load" into the module, "same" = must
# equal the named (already loaded) tensor, "skip" = ignored (vision). First match wins.
KEY_MAP: list[tuple[str, str, str | None]] = [
    (r"model\.decoder\.(layers\.\d+\.layer_scalar)", "load", r"\1"),
    (r"model\.decoder\.(.+)", "load", r"\1"),
    (r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar", "load", r"layers.\1.encoder_layer_scalar"),
    (r"model\.encoder\.language_model\.(.+)", "same", r"\1"),
    (r"lm_head\.weight", "same", "embed_tokens.weight"),
    (r"model\.encoder\.(vision_tower|embed_vision)\..+", "skip", None),
]


def map_key(key: str) -> tuple[str, str | None]:
    """Checkpoint key -> (action, our name). Unknown keys give ("unexpected", None)."""
    for pattern, action, target in KEY_MAP:
        m = re.fullmatch(pattern, key)
        if m:
            return action, (m.expand(target) if target else None)
    return "unexpected", None


def checkpoint_key(name: str) -> str:
    """Our parameter/buffer name -> the key it is saved under (the inverse of KEY_MAP's "load" rows)."""
    m = re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", name)
    if m:
        return f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
    return f"model.decoder.{name}"


def usable_device(device) -> torch.device:
    """device (None: CPU) -> torch.device, or a ValueError naming it when this torch build or machine lacks it
    (e.g. "cuda" with a CPU-only torch), before any weight is read."""
    try:
        device = torch.device(device if device is not None else "cpu")
        if device.type == "meta":
            raise ValueError("the meta device holds no data")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:  # AssertionError: torch built without CUDA
        raise ValueError(f"device {str(device)!r} is not usable here ({e}); pass a device this machine has, "
                         "e.g. cpu") from None
    return device


def stored_float_bytes(infos: dict, exact: set[str] = frozenset()) -> Counter:
    """Bytes of the checkpoint's float weights per stored dtype (`exact`: quantized tensors, not counted)."""
    stored = Counter()
    for key, info in infos.items():
        action, name = map_key(key)
        if action == "load" and name not in exact and info.dtype.is_floating_point:
            stored[info.dtype] += info.end - info.begin
    return stored


def common_dtype(infos: dict, exact: set[str], directory: Path, quiet: bool) -> torch.dtype | None:
    """The dtype to load a checkpoint in when the caller names none: None (keep the stored dtype) when its float
    weights share one, else the dtype that holds most of their bytes (one module runs in one dtype; a mixed one
    fails in its first matmul). `exact` (quantized tensors) keep theirs and do not count."""
    stored = stored_float_bytes(infos, exact)
    if len(stored) < 2:
        return None
    dtype = max(stored, key=stored.get)
    if not quiet:
        mix = ", ".join(f"{DTYPE_NAMES[d]} {n / 2**20:.1f} MiB" for d, n in stored.most_common())
        print(f"dgemma: {directory} stores its weights in several dtypes ({mix}); loading all as {dtype} (pass a "
              "dtype to choose another)", file=sys.stderr)
    return dtype


def load_module(directory: str | Path, *, dtype: torch.dtype | None = None, device=None,
                quiet: bool = False, prepare=None) -> DiffusionGemma:
    """Build the module on the meta device, then assign memory-mapped checkpoint tensors into it.

    dtype None keeps the stored dtype (if they are mixed, the one holding most bytes); device None means CPU.
    Tensors are converted and moved one at a time, so peak host memory stays about one tensor above what the target
    device holds.
    prepare(module, metadata) -> names: runs on the meta module before loading (quant/ swaps in its quantized
    modules for a quantized checkpoint); the named tensors keep their stored dtype, which must be theirs.
    A LoRA adapter directory loads as its base model with the adapter merged in (lora.load_merged; no `prepare`)."""
    if not Path(directory).exists():
        raise CheckpointError(missing_path(directory))
    directory = Path(directory)
    if is_adapter(directory):
        from .lora import load_merged  # here, not above: lora imports saving, which imports this module
        return load_merged(directory, dtype=dtype, device=device, quiet=quiet)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a model directory; pass the directory that holds "
                              f"config.json and model.safetensors (or its shards), e.g. {directory.parent}")
    device = usable_device(device)
    config = ModelConfig.from_file(directory)
    infos, metadata = list_tensors(directory)
    with torch.device("meta"):
        module = DiffusionGemma(config)
    if prepare is None and QUANTIZATION_KEY in metadata:
        raise CheckpointError(f"{directory}: a quantized checkpoint ({metadata[QUANTIZATION_KEY]}); load it with "
                              "dgemma.load for inference, or train from the full-precision checkpoint")
    exact = prepare(module, metadata) if prepare is not None else set()
    expected = dict(module.state_dict(keep_vars=True))
    if dtype is None:
        dtype = common_dtype(infos, exact, directory, quiet)
    files = MappedFiles()
    loaded, deferred, skipped = {}, [], 0
    for key, info in infos.items():
        action, name = map_key(key)
        if action == "skip":
            skipped += 1
            continue
        if action == "unexpected" or name not in expected:
            raise CheckpointError(f"{info.file}: unexpected tensor '{key}'; it is not part of a DiffusionGemma "
                                  "text model with this config.json (wrong model, or config and weights disagree)")
        want = tuple(expected[name].shape)
        if info.shape != want:
            raise CheckpointError(f"{info.file}: tensor '{key}' has shape {list(info.shape)} but config.json implies "
                                  f"{list(want)}; the config does not fit the weights")
        if expected[name].is_floating_point() and not info.dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: tensor '{key}' is stored as {info.dtype}, but this weight is floating "
                                  "point (a quantized checkpoint records its scheme in the metadata, which this file "
                                  "lacks); the checkpoint is corrupt or from another tool")
        if name in exact and info.dtype != expected[name].dtype:
            raise CheckpointError(f"{info.file}: tensor '{key}' is {info.dtype} but the quantization recorded in the "
                                  f"metadata stores it as {expected[name].dtype}; the checkpoint is corrupt")
        if action == "same":
            deferred.append((key, info, name))
            continue
        if name in loaded:
            raise CheckpointError(f"{info.file}: tensor '{key}' maps to '{name}', which was already loaded")
        tensor = files.tensor(info)
        target_dtype = dtype if dtype is not None and tensor.is_floating_point() and name not in exact else tensor.dtype
        loaded[name] = tensor.to(device=device, dtype=target_dtype)
    missing = sorted(checkpoint_key(name) for name in set(expected) - set(loaded))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        source = directory / (INDEX_FILE if (directory / INDEX_FILE).exists() else SINGLE_FILE)
        raise CheckpointError(f"{source}: missing tensor(s) {shown}; the checkpoint is incomplete or for another "
                              "model")
    for key, info, name in deferred:  # duplicated twins must be bit-equal to what we loaded
        twin = files.tensor(info).to(loaded[name].device, loaded[name].dtype)
        if not torch.equal(twin, loaded[name]):
            raise CheckpointError(f"{info.file}: tensor '{key}' should be tied to '{name}' but differs from it; "
                                  "dgemma uses one shared stack for encoder and decoder")
    module.load_state_dict(loaded, assign=True, strict=True)
    module.eval().requires_grad_(False)
    if skipped and not quiet:
        print(f"dgemma: skipped {skipped} vision tensors (image input is not supported yet)", file=sys.stderr)
    return module
