"""`dgemma quantize SRC DST`: a full-precision checkpoint -> a quantized one, streamed shard by shard.

Nothing is ever held whole: for each source shard the output header is computed from the source header
alone (every output shape follows from the input shape and the scheme), written first, and then each
tensor is read from the file SLICE_BYTES at a time (whole rows), quantized, and written at its precomputed
offset. Peak memory is one slice (tens of MB) plus Python, whatever the shard or model size
(tests/test_quant_convert.py measures it). Every other file of SRC (config.json, tokenizer,
generation_config.json, chat template, card) is copied unchanged; the scheme goes into each shard's
safetensors metadata (`dgemma.quantization`), never into a file name. The output is written to
DST.partial and renamed to DST when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..config import TOKENIZER_FILES, ModelConfig, is_adapter, model_file
from ..model.checkpoint import DTYPE_NAMES, INDEX_FILE, TensorInfo, list_tensors
from ..model.loading import QUANTIZATION_KEY, map_key
from .modules import is_quantized, metadata_entry
from .schemes import DEFAULT_GROUP_SIZE, QuantError, check_scheme, quantize_weight, scale_dtype_for, stored_layout

SLICE_BYTES = 16 << 20  # source bytes read at once


def _is_target(info: TensorInfo) -> bool:
    action, name = map_key(info.key)
    return action in ("load", "same") and name is not None and is_quantized(name) and len(info.shape) >= 2


def _plan_tensor(info: TensorInfo, scheme: str, group_size, scale_dtype):
    """[(out key, shape, dtype)] for one source tensor, and whether it is quantized."""
    quantized = _is_target(info)
    if not quantized:
        return [(info.key, info.shape, info.dtype)], False
    if not info.dtype.is_floating_point:
        raise QuantError(f"{info.file}: tensor '{info.key}' is {info.dtype}, not a float weight; is SRC already "
                         "quantized?")
    layout = stored_layout(scheme, info.shape, group_size, scale_dtype)
    return [(info.key + suffix, shape, dtype) for suffix, (shape, dtype) in layout.items()], True


def _header(entries, metadata: dict) -> tuple[bytes, dict[str, int]]:
    """safetensors header bytes (padded to 8) for [(key, shape, dtype)] in order, and each key's data offset."""
    header, offsets, pos = {"__metadata__": metadata}, {}, 0
    for key, shape, dtype in entries:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[key] = pos
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def _read_rows(f, info: TensorInfo, row0: int, row1: int, width: int) -> torch.Tensor:
    """Rows [row0, row1) of the tensor seen as [rows, width], read from the open source file."""
    itemsize = info.dtype.itemsize
    f.seek(info.begin + row0 * width * itemsize)
    buf = bytearray((row1 - row0) * width * itemsize)
    f.readinto(buf)
    return torch.frombuffer(buf, dtype=info.dtype).view(row1 - row0, width)


def _write_shard(src: Path, infos: list[TensorInfo], dst: Path, scheme, group_size, scale_dtype,
                 metadata: dict) -> tuple[int, int]:
    entries, quantized = [], {}
    for info in infos:
        planned, quantized[info.key] = _plan_tensor(info, scheme, group_size, scale_dtype)
        entries += planned
    head, offsets = _header(entries, metadata)
    base = len(head)
    count = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(head)
        for info in infos:
            width = info.shape[-1] if info.shape else 1
            rows = (info.end - info.begin) // max(1, width * info.dtype.itemsize)
            step = max(1, SLICE_BYTES // max(1, width * info.dtype.itemsize))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                block = _read_rows(fin, info, r0, r1, width)
                if not quantized[info.key]:
                    fout.seek(base + offsets[info.key] + r0 * width * info.dtype.itemsize)
                    fout.write(memoryview(block.view(torch.uint8).numpy()))
                    continue
                for suffix, t in quantize_weight(block, scheme, group_size).items():
                    t = t.contiguous()
                    per_row = t.numel() // (r1 - r0) * t.element_size()
                    fout.seek(base + offsets[info.key + suffix] + r0 * per_row)
                    fout.write(memoryview(t.view(torch.uint8).numpy()).cast("B"))
            count += quantized[info.key]
    return dst.stat().st_size, count


def _merged_model(adapter: Path, dst: Path) -> Path:
    """A LoRA adapter directory as a model directory (DST.merged): its base model with the adapter merged in, in the
    base's stored dtype (lora.load_merged; it takes the whole model in memory), and the files that go with it."""
    from ..model.loading import load_module
    from ..model.saving import save_checkpoint

    merged = dst.with_name(dst.name + ".merged")
    if merged.exists():  # never someone else's directory to delete (it is removed once the conversion is done)
        raise QuantError(f"{merged} already exists; the adapter's merged model is written there while {dst.name} is "
                         "converted: move it away or give another DST")
    save_checkpoint(load_module(adapter, quiet=True), merged)
    generation, tokenizer = model_file(adapter, "generation_config.json"), model_file(adapter, "tokenizer.json")
    for src in [generation] + ([tokenizer.parent / name for name in TOKENIZER_FILES] if tokenizer else []):
        if src is not None and src.is_file():
            shutil.copy2(src, merged / src.name)
    return merged


STDERR = object()  # quantize_checkpoint's default `log`: sys.stderr as it is at the call, not at import


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str, group_size: int | None = None,
                        log=STDERR) -> dict:
    """Write a quantized copy of the model directory `src` to `dst` (which must not exist; `src` may be a LoRA adapter
    directory: its merged model is quantized). Returns a summary.
    `log`: a text stream for one progress line per shard (default: sys.stderr), or None for none."""
    src, dst = Path(src), Path(dst)
    log = sys.stderr if log is STDERR else log
    group_size = (group_size or DEFAULT_GROUP_SIZE) if scheme == "int4" else None
    check_scheme(scheme, group_size)
    ModelConfig.from_file(src)  # a DiffusionGemma directory, or a clear error
    if dst.exists():
        raise QuantError(f"{dst} already exists; give a new directory for the quantized model")
    if is_adapter(src):  # the merged model, written beside dst for the streaming conversion, then removed
        merged = _merged_model(src, dst)
        try:
            return {**quantize_checkpoint(merged, dst, scheme, group_size, log), "source": str(src)}
        finally:
            shutil.rmtree(merged, ignore_errors=True)
    infos, metadata = list_tensors(src)
    if QUANTIZATION_KEY in metadata:
        raise QuantError(f"{src} is already quantized ({metadata[QUANTIZATION_KEY]}); quantize the full-precision "
                         "checkpoint instead")
    targets = [i for i in infos.values() if _is_target(i)]
    dtypes = {i.dtype for i in targets}
    scale_dtype = scale_dtype_for(dtypes.pop(), scheme) if len(dtypes) == 1 else torch.float32
    for info in targets:  # every shape must fit the scheme BEFORE anything is written
        try:
            stored_layout(scheme, info.shape, group_size, scale_dtype)
        except QuantError as e:
            fits = [g for g in (16, 32, 64, 128, 256) if all(t.shape[-1] % g == 0 for t in targets)]
            hint = f" (this checkpoint's widths take --group-size {', '.join(map(str, fits))})" if fits else ""
            raise QuantError(f"{info.file.name}: tensor '{info.key}' {list(info.shape)}: {e}{hint}") from None
    by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
    for info in sorted(infos.values(), key=lambda i: (i.file.name, i.begin)):
        by_file[info.file].append(info)
    tmp = dst.with_name(dst.name + ".partial")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise QuantError(f"cannot create the output directory {tmp} (renamed to {dst.name} when done): "
                         f"{e.strerror or e}; give a DST in a writable place") from None
    meta = {"format": "pt", **metadata_entry(scheme, group_size, scale_dtype)}
    start, total_in, total_out, num_quantized, weight_map = time.perf_counter(), 0, 0, 0, {}
    for k, (path, shard) in enumerate(by_file.items(), 1):
        t0 = time.perf_counter()
        size, n = _write_shard(path, shard, tmp / path.name, scheme, group_size, scale_dtype, meta)
        total_in, total_out, num_quantized = total_in + path.stat().st_size, total_out + size, num_quantized + n
        for info in shard:
            for key, _, _ in _plan_tensor(info, scheme, group_size, scale_dtype)[0]:
                weight_map[key] = path.name
        if log is not None:
            print(f"dgemma quantize: [{k}/{len(by_file)}] {path.name}: {path.stat().st_size / 2**20:,.1f} MiB -> "
                  f"{size / 2**20:,.1f} MiB ({time.perf_counter() - t0:.1f} s)", file=log)
    if (src / INDEX_FILE).exists():
        index = {"metadata": {"total_size": total_out}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for item in src.iterdir():  # config, tokenizer, generation config, template, card
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX_FILE:
            shutil.copy2(item, tmp / item.name)
    tmp.rename(dst)
    return {"source": str(src), "output": str(dst), "scheme": scheme, "group_size": group_size,
            "scale_dtype": str(scale_dtype).removeprefix("torch."), "tensors_quantized": num_quantized,
            "source_bytes": total_in, "output_bytes": total_out,
            "seconds": round(time.perf_counter() - start, 3)}

