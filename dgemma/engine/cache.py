"""The KV cache: the only state that outlives one canvas, owned by the engine, written only by `encode`.

What it keeps is exactly what later passes read (spec §4.7-§4.8): full-attention layers keep every
position; sliding layers keep only the last `window - 1` entries, because the next encoder query sees
`window` keys including itself and every canvas query sees the same last `window - 1` context keys.
For the real model that caps 25 of 30 layers at 1023 entries whatever the context length.

`valid` [B, P] records padded slots (left padding of a batch); it stays None while nothing is padded,
so the unpadded path builds no decoder mask at all.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def _own(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it where it is a slice of a larger tensor (whose memory it would keep alive)."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int):
        self.config = config
        self.batch_size = batch_size
        self.keys: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.valid: torch.Tensor | None = None  # [B, length] bool, None = no padding anywhere
        self.length = 0  # positions consumed, pad slots included

    def context(self, layer: int):
        """(k, v, key_valid) for `layer` as stored ([B,Hk,S,D], [B,Hk,S,D], [B,S] bool | None), or None."""
        k = self.keys[layer]
        if k is None:
            return None
        valid = None if self.valid is None else self.valid[:, self.length - k.shape[2]:]
        return k, self.values[layer], valid

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append the K/V of new tokens [B,Hk,T,D]; sliding layers drop what no later query can see.

        A sliding layer stores its last window-1 entries in a tensor of their own: a slice of the pass's K/V would
        keep all of it alive (a whole prompt's, after a one-pass prefill), and `nbytes` would not show it."""
        old_k, old_v = self.keys[layer], self.values[layer]
        sliding = self.config.is_sliding(layer)
        if sliding:
            keep = self.config.sliding_window - 1
            k, v = k[:, :, -keep:], v[:, :, -keep:]
            if old_k is not None:  # only the entries still inside the window, so the concatenation is all kept
                first = max(old_k.shape[2] + k.shape[2] - keep, 0)
                old_k, old_v = old_k[:, :, first:], old_v[:, :, first:]
        if old_k is not None:
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        elif sliding:
            k, v = _own(k), _own(v)
        self.keys[layer], self.values[layer] = k, v

    def extend(self, num_new: int, valid: torch.Tensor | None) -> None:
        """Advance the position counter after an encoder pass wrote every layer."""
        if valid is not None or self.valid is not None:
            old = self.valid if self.valid is not None else torch.ones(
                self.batch_size, self.length, dtype=torch.bool, device=self._device(valid))
            new = valid if valid is not None else torch.ones(
                self.batch_size, num_new, dtype=torch.bool, device=old.device)
            self.valid = torch.cat([old, new.to(torch.bool)], dim=1)
        self.length += num_new

    def _device(self, fallback: torch.Tensor | None):
        first = next((k for k in self.keys if k is not None), None)
        return first.device if first is not None else fallback.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class StackedCaches:
    """Several caches side by side as ONE batch: rows of different requests, each at its own context length.

    Reads stack: `context(layer)` puts each cache's stored entries right-aligned in [R,Hk,S,D] (S = the most any
    cache holds for that layer), so a shorter row's missing slots sit on the left, masked exactly like left
    padding; slot j of a row at length P then holds position P - S + j on every layer kind (sliding caches keep
    their last min(P, window-1) entries, which are the right-aligned ones). `length` is the [R] tensor of each
    row's next position, which the decoder (per-row canvas positions) and the encoder (per-row start) read.

    Writes split: `write`/`extend` hand each cache its own rows, so every cache keeps trimming its sliding layers
    to its window. `counts` [R] (one per row) are the true new tokens per row of a right-padded encoder batch
    (prompts of different lengths encoded together); only those are written. Rows of one cache share a count.
    Stacking copies the stored K/V once per layer per view; build a new view when a cache changed."""

    def __init__(self, caches: list[KVCache], counts: list[int] | None = None):
        self.caches = list(caches)
        self.sizes = [c.batch_size for c in self.caches]
        self.batch_size = sum(self.sizes)
        self.config = self.caches[0].config
        self.counts = counts
        if counts is not None and len(counts) != len(self.caches):
            raise ValueError(f"need one count per cache ({len(self.caches)}), got {len(counts)}")
        self.length = torch.tensor([c.length for c, n in zip(self.caches, self.sizes) for _ in range(n)],
                                   dtype=torch.long)
        self._stacked: dict[int, tuple | None] = {}

    def context(self, layer: int):
        if layer not in self._stacked:
            self._stacked[layer] = self._stack(layer)
        return self._stacked[layer]

    def _stack(self, layer: int):
        parts = [c.context(layer) for c in self.caches]
        first = next((p for p in parts if p is not None), None)
        if first is None:
            return None
        widths = [0 if p is None else p[0].shape[2] for p in parts]
        width = max(widths)
        if all(w == width for w in widths) and all(p[2] is None for p in parts):
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), None
        keys, values, valid = [], [], []
        for part, size, w in zip(parts, self.sizes, widths):
            pad = width - w
            for out, i in ((keys, 0), (values, 1)):
                shape = (size, first[i].shape[1], pad, first[i].shape[3])
                blank = first[i].new_zeros(shape)
                out.append(blank if part is None else torch.cat([blank, part[i]], dim=2))
            mask = torch.zeros(size, width, dtype=torch.bool, device=first[0].device)
            if part is not None:
                mask[:, pad:] = True if part[2] is None else part[2]
            valid.append(mask)
        return torch.cat(keys), torch.cat(values), torch.cat(valid)

    def _split(self, t: torch.Tensor, dim: int = 0):
        return torch.split(t, self.sizes, dim=dim)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for i, (cache, ki, vi) in enumerate(zip(self.caches, self._split(k), self._split(v))):
            n = ki.shape[2] if self.counts is None else self.counts[i]
            cache.write(layer, ki[:, :, :n], vi[:, :, :n])

    def extend(self, num_new: int, valid: torch.Tensor | None) -> None:
        parts = [None] * len(self.caches) if valid is None else self._split(valid)
        for i, (cache, part) in enumerate(zip(self.caches, parts)):
            n = num_new if self.counts is None else self.counts[i]
            part = None if part is None else part[:, :n]
            cache.extend(n, None if part is None or bool(part.all()) else part)
        self._stacked.clear()


class RowSubset:
    """Some rows of a cache, read as a batch of their own: the decoder's view while only those rows of a Rows are
    still denoising (engine/scheduler.py). Read-only; each layer's rows are gathered once, on first read (copies of
    their stored K/V: build a new view when the rows or the cache change). Stacks like a KVCache (StackedCaches)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows
        self.config = cache.config
        self.batch_size = int(rows.numel())
        self.length = cache.length
        self._gathered: dict[int, tuple | None] = {}

    def context(self, layer: int):
        if layer not in self._gathered:
            part = self.cache.context(layer)
            self._gathered[layer] = None if part is None else tuple(
                None if t is None else t.index_select(0, self.rows) for t in part)
        return self._gathered[layer]
