"""Named speed presets: explicit bundles of sampler knobs that trade a measured amount of quality for speed.

`exact` (the default everywhere) is the reference algorithm with the checkpoint's own generation settings. The
others only change knobs a user could also set one by one (steps, EntropyBound, the stop rule's confidence
threshold); explicit knobs given beside a preset win over it. Their measured cost is in the README's "Speed
presets" table (`python bench/presets.py`): tokens per second against the reference, agreement with the exact
path, the answers' likelihood under the model, mean steps per canvas, and Sudoku scores when a Sudoku model is
given.

Dynamic int8 matmuls (`--int8-dynamic`, dgemma/quant/dynamic.py) are a separate switch because they change the
loaded model, not the sampler; presets combine with it. So does `--compile [MODE]` (dgemma/engine/compiled.py: the
same math, compiled), except `settle`: its forwards over the unsettled positions run eagerly (a warning says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    knobs: dict = field(default_factory=dict)  # GenerationConfig fields (dgemma.config)


PRESETS = {p.name: p for p in (
    Preset("exact", "the reference algorithm with the checkpoint's settings (default; up to 48 steps per canvas)"),
    Preset("confident", "the exact sampler with a looser stop: a canvas ends once its argmax held for a step and its "
           "mean entropy is under 0.05 nats (the checkpoint's rule uses 0.005)", {"confidence_threshold": 0.05}),
    Preset("settle", "'confident' plus settled positions: a position whose argmax held for 2 steps with an entropy "
           "under 0.01 nats is final and no longer computed (dgemma/engine/settle.py; eager even with --compile)",
           {"confidence_threshold": 0.05, "settle_after": 2, "settle_entropy": 0.01}),
    Preset("fast", "at most 16 steps per canvas, EntropyBound 0.5 (accepts more positions per step)",
           {"max_denoising_steps": 16, "entropy_bound": 0.5}),
    Preset("fastest", "at most 8 steps per canvas, EntropyBound 1.0",
           {"max_denoising_steps": 8, "entropy_bound": 1.0}),
)}


def preset_knobs(name: str | None, **explicit) -> dict:
    """The generation options of preset `name` (None: exact), overridden by the explicit ones that are not None.
    Unknown names raise ValueError naming the choices."""
    name = name or "exact"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name].knobs, **{k: v for k, v in explicit.items() if v is not None}}


def add_speed_flags(parser) -> None:
    """--preset, --int8-dynamic and --compile on a command's argparse parser (generate, chat, serve, sudoku, ...)."""
    from .compiled import COMPILE_MODES
    parser.add_argument("--preset", choices=list(PRESETS), default="exact",
                        help="speed preset as the generation defaults (explicit knobs still win): "
                             + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()))
    parser.add_argument("--int8-dynamic", action="store_true",
                        help="CPU float32 only: int8 matmuls with activations quantized on the fly (faster, "
                             "approximate; the README's Speed presets table)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                        help="torch.compile the decoder step (for GPUs, where a step is bound by launching operators; "
                             "the first steps of the first two canvases compile, minutes on a CPU). MODE: "
                             f"{', '.join(COMPILE_MODES)} (default: default; reduce-overhead adds CUDA graphs). "
                             "Before a positional argument write --compile=MODE")
