"""Reading safetensors checkpoints by memory map, with errors that name the file and the key.

Format (safetensors): 8-byte little-endian header length N, N bytes of JSON
{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data block.
We map the file copy-on-write and wrap each tensor with `torch.frombuffer`, so nothing is read until a
tensor is used or moved, and a 50 GB checkpoint never needs a second copy in RAM before placement.
Sharded checkpoints list their files in `model.safetensors.index.json` ({"weight_map": {key: file}}).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import read_json, unreadable

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, the key and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse one safetensors file's header and check every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(unreadable(path, e)) from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors (truncated download?)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: header length {n} does not fit a {size}-byte file; the file is "
                                  "truncated or not safetensors. Re-download it.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download the file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object); "
                              "re-download the file")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos = {}
    for key, entry in header.items():
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()
                and isinstance(entry["shape"], list) and all(isinstance(s, int) and s >= 0 for s in entry["shape"])
                and isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2
                and all(isinstance(o, int) and o >= 0 for o in entry["data_offsets"])):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{key}' ({entry!r}); it needs "
                                  "'dtype', 'shape' and two 'data_offsets'. Re-download the file.")
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor '{key}' has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor '{key}' declares shape {list(shape)} ({entry['dtype']}) but "
                                  f"{end - begin} bytes; the file is corrupt")
        if base + end > size:
            raise CheckpointError(f"{path}: tensor '{key}' ends at byte {base + end} but the file has {size} "
                                  "bytes: the file is truncated (interrupted download?). Re-download it.")
        infos[key] = TensorInfo(key, path, dtype, shape, base + begin, base + end)
    return infos, metadata


def list_tensors(directory: Path) -> tuple[dict[str, TensorInfo], dict]:
    """All tensors of a model directory (single file or shards), key -> TensorInfo, plus merged metadata."""
    index = directory / INDEX_FILE
    single = directory / SINGLE_FILE
    if index.exists():
        fix = "it needs a 'weight_map' object; re-download it"
        weight_map = read_json(index, fix=fix, error=CheckpointError)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
            raise CheckpointError(f"{index}: not a valid shard index; {fix}")
        files = sorted(set(weight_map.values()))
        infos, metadata = {}, {}
        for name in files:
            shard = directory / name
            if not shard.exists():
                raise CheckpointError(f"{index} lists shard '{name}' but {shard} does not exist; "
                                      "the download is incomplete")
            shard_infos, shard_meta = read_header(shard)
            for key, info in shard_infos.items():
                if weight_map.get(key, name) != name:
                    continue  # a stray copy: the index names another shard for this tensor
                if key in infos:
                    raise CheckpointError(f"tensor '{key}' is stored in both {infos[key].file} and {shard}, and "
                                          f"{index} names neither; a checkpoint holds each tensor once: re-download it")
                infos[key] = info
            metadata.update(shard_meta)
        for key, name in weight_map.items():
            if key not in infos:
                raise CheckpointError(f"{index} maps '{key}' to '{name}' but that shard does not contain it")
        return infos, metadata
    if single.exists():
        return read_header(single)
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; is this a DiffusionGemma model directory?")


class MappedFiles:
    """Keeps one copy-on-write memory map per file; tensors are views into it."""

    def __init__(self):
        self._maps: dict[Path, mmap.mmap] = {}

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = (info.end - info.begin) // info.dtype.itemsize
        if count == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(mm, dtype=info.dtype, count=count, offset=info.begin).reshape(info.shape)
