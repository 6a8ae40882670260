"""What both runners that compile (the engine's `--compile`, the trainer's `--compile`) share. The model itself never
compiles: these are called by engine/compiled.py and train/train.py when the user asks for it."""

from __future__ import annotations

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile's `mode` (inductor)


def raise_recompile_limits() -> None:
    """Each step variant and layer kind is its own graph; torch's default limit (8) would fall back to eager."""
    import torch._dynamo

    config = torch._dynamo.config
    for name, at_least in (("recompile_limit", 64), ("accumulated_recompile_limit", 512)):  # torch >= 2.7 names
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), at_least))
