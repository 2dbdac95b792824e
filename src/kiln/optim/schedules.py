"""Learning-rate schedules as pure functions of the step: lr(step) = peak * factor(step).

Pure functions resume trivially: the step counter is the whole schedule state.
"""

from __future__ import annotations

import math

from kiln.config import OptimConfig


def lr_factor(step: int, *, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based), in [min_lr_ratio, 1] after warmup."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup  # linear warmup reaching the peak at the last warmup step
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        # Warmup-Stable-Decay (Hu et al. 2024, MiniCPM): flat at the peak, then decay over the last part.
        decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
        decay_start = max(total_steps - decay_steps, warmup)
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
        if cfg.decay_shape == "linear":
            shape = 1 - progress
        elif cfg.decay_shape == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:  # 1-sqrt (Hagele et al. 2024)
            shape = 1 - math.sqrt(progress)
        return floor + (1 - floor) * shape
    raise AssertionError(cfg.schedule)
