"""Training: JSONL data -> the uniform-state diffusion objective (spec §7) -> checkpoints in the HF layout.

    data.py      records -> canvas-aligned examples (EOS-filled responses) -> right-padded batches; data order
    loss.py      diffusion_loss(model, batch, generator, cfg): encoder AR loss + self-conditioned denoising loss
    train.py     TrainConfig + train(): one loop, DDP under torchrun, exact resume
    plot.py      the loss curve as a PNG (no plotting library)
    commands.py  `dgemma train` flags
    lora.py      low-rank adapters (apply_lora / merge_lora)
    corpus.py    an offline training corpus (the Python standard library)
"""

from .data import Batch, DataError, Example, collate, load_examples, split_heldout
from .loss import LossConfig, diffusion_loss, summarize
from .train import TrainConfig, TrainResult, train

__all__ = ["Batch", "DataError", "Example", "LossConfig", "TrainConfig", "TrainResult", "collate", "diffusion_loss",
           "load_examples", "split_heldout", "summarize", "train"]
