"""The micro-batches of each optimizer step, prepared ahead of the step that runs them.

`StepBatches[s]` is everything this rank feeds the model at step s: its share of the step's global batch, collated
(data.collate) and with the noise of every example already drawn (loss.sample_noise, seeded by the example's slot
in the stream), so the step itself only moves tensors to the device. It is a pure function of (seed, s), which is
what makes resuming and data parallelism exact (train.py's docstring).

`step_batches(dataset, start, workers)` iterates it from step `start`: in the training process (workers=0), or in
`workers` background processes (torch's DataLoader) that stay a few steps ahead. On a GPU the host-side work
(Python collation and one torch.Generator per example) was 17-20% of an H200 step (0.052 s of 0.30 s at batch
256, 0.129 s of 0.63 s at batch 768, measured 2026-11-27); a worker hides it behind the GPU step. Workers
produce the same tensors (the same seeded draws), so the weights are the same either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .data import Batch, Example, Order, ar_targets, collate, mix
from .loss import LossConfig, sample_noise

PREFETCH_STEPS = 4  # steps each worker keeps ready


class StepBatches(Dataset):
    def __init__(self, examples: Sequence[Example], seed: int, global_batch: int, grad_accum: int, rank: int,
                 world: int, pad_id: int, canvas_length: int, vocab_size: int, loss: LossConfig):
        self.examples, self.seed, self.G, self.grad_accum = examples, seed, global_batch, grad_accum
        self.rank, self.world, self.pad_id, self.L, self.V, self.loss = rank, world, pad_id, canvas_length, \
            vocab_size, loss
        self.micro = global_batch // (world * grad_accum)
        self.order = Order(len(examples), seed)

    def __len__(self) -> int:  # steps are unbounded; the trainer stops asking
        return 2 ** 62

    def __getitem__(self, step: int) -> list[Batch]:
        slots = [step * self.G + j for j in range(self.G)]  # positions in the example stream = noise seeds
        chosen = [self.examples[self.order[s]] for s in slots]
        ar_total = float(sum(ar_targets(e) for e in chosen))
        batches = []
        for m in range(self.grad_accum):
            first = (m * self.world + self.rank) * self.micro
            mine = range(first, first + self.micro)
            batch = collate([chosen[j] for j in mine], self.pad_id, self.L, [mix(self.seed, slots[j]) for j in mine],
                            diffusion_denominator=float(self.G * self.L), ar_denominator=ar_total)
            batch.noise = sample_noise(batch.seeds.tolist(), batch.num_canvases.tolist(), self.L, self.V, self.loss)
            batches.append(batch)
        return batches


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a worker's draws are tiny; intra-op threads would only fight the trainer


def step_batches(dataset: StepBatches, start: int, workers: int = 0) -> Iterator[list[Batch]]:
    """dataset[start], dataset[start + 1], ...: computed on demand (workers=0) or by `workers` processes ahead."""
    if workers < 0:
        raise ValueError(f"data workers must be >= 0, got {workers}")
    if workers == 0:
        return (dataset[s] for s in itertools.count(start))
    loader = DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=workers,
                        prefetch_factor=PREFETCH_STEPS, worker_init_fn=_one_thread, persistent_workers=False)
    return iter(loader)
