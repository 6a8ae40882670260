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
        """Append the K/V of new tokens [B,Hk,T,D]; sliding layers drop what no later query can see."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        if self.config.is_sliding(layer):
            keep = self.config.sliding_window - 1
            k, v = k[:, :, -keep:], v[:, :, -keep:]
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
