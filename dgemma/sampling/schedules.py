"""Temperature schedules for the denoising loop (spec §6.2).

The step counter counts DOWN: a canvas starts at n = N (hottest, t_max) and its last step is n = 1, so t_min itself
is never reached. Rows of a batch may sit at different steps (habit 14), hence n is a per-row tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_temperature(
    n_remaining: Tensor | int, num_steps: int, t_min: float | None, t_max: float | None
) -> Tensor:
    """Temperature for countdown value n: T(n) = t_min + (t_max - t_min) * n / N.

    n_remaining: int or int tensor [B] (N for the first step of a canvas, 1 for the last) -> fp32 tensor, same shape.
    t_min or t_max None disables the schedule (T = 1), as HF only builds its processor when both are set (§9.4).
    """
    n = torch.as_tensor(n_remaining)
    if t_min is None or t_max is None:
        return torch.ones(n.shape, dtype=torch.float32, device=n.device)
    # Same operation order and dtypes as HF's LinearTemperatureScheduleLogitsProcessor, which receives the step as an
    # int32 tensor: int / int -> fp32 ratio, then python-float affine map in fp32. Keeping this order makes ℓ/T
    # bit-identical to the reference, which the acceptance and stop rules (thresholds on entropies) are sensitive to.
    ratio = n / num_steps
    return (t_min + (t_max - t_min) * ratio).to(torch.float32)
