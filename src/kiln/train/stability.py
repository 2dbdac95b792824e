"""Training stability guards: divergence detection and loss / gradient-norm spike detection.

Both are Stateful (their EMAs are saved in every checkpoint), so a resumed run makes exactly the
decisions the uninterrupted run would have made.

DivergenceDetector (a dual-time-scale detector, as in the forgather guide): a fast and a slow exponential moving
average of the training loss. While training is healthy the fast EMA sits at or below the slow one
(the loss falls); when the run diverges the fast EMA rises above the slow one. The run is aborted
when fast - slow > threshold, after a warm-up in which the slow EMA settles. The detector also
remembers the onset: the first step since the last healthy state where fast - slow exceeded
threshold / 2, so checkpoints written after it can be set aside as suspect.

SpikeDetector: z-score of the loss and of the gradient norm against running means and variances
(EMA, Welford-style), updated only with non-spike steps so one spike does not hide the next. A
spike is logged, and with `skip` the update is not applied (the step still counts).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class DivergenceDetector:
    """Fast/slow loss EMAs; `update(step, loss)` returns True when the run has diverged."""

    fast_decay: float = 0.9  # ~10-step memory
    slow_decay: float = 0.99  # ~100-step memory
    threshold: float = 1.0  # nats of fast - slow (the forgather guide uses 1.0)
    warmup: int = 20  # steps before the detector may fire
    fast: float | None = None
    slow: float | None = None
    n: int = 0
    onset: int | None = None  # first step of the current excursion above threshold / 2

    def update(self, step: int, loss: float) -> bool:
        if self.fast is None or self.slow is None:
            self.fast = self.slow = loss
        else:
            self.fast = self.fast_decay * self.fast + (1 - self.fast_decay) * loss
            self.slow = self.slow_decay * self.slow + (1 - self.slow_decay) * loss
        self.n += 1
        gap = self.fast - self.slow
        if gap > self.threshold / 2:
            if self.onset is None:
                self.onset = step
        else:
            self.onset = None
        return self.n > self.warmup and gap > self.threshold

    @property
    def gap(self) -> float:
        return 0.0 if self.fast is None or self.slow is None else self.fast - self.slow

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass
class _RunningStats:
    """Exponentially weighted mean and variance (West 1979), in float64 python floats."""

    decay: float
    floor: float  # smallest std assumed, relative to |mean| when `relative`
    relative: bool = False
    mean: float = 0.0
    var: float = 0.0
    n: int = 0

    def z(self, x: float) -> float:
        if self.n < 2:
            return 0.0
        # A floor on the std: early, the running variance can be far below the real noise, and a tiny
        # denominator would turn ordinary fluctuations into "spikes".
        floor = self.floor * abs(self.mean) if self.relative else self.floor
        return (x - self.mean) / math.sqrt(max(self.var, floor * floor, 1e-12))

    def push(self, x: float) -> None:
        if self.n == 0:
            self.mean, self.var = x, 0.0
        else:
            delta = x - self.mean
            self.mean += (1 - self.decay) * delta
            self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
        self.n += 1


class SpikeDetector:
    """Flags steps whose loss or grad norm is `z_threshold` standard deviations above the running mean."""

    def __init__(self, *, z_threshold: float = 6.0, decay: float = 0.98, warmup: int = 20) -> None:
        self.z_threshold, self.warmup = z_threshold, warmup
        self.loss = _RunningStats(decay, floor=0.01, relative=True)  # 1% of the loss
        self.grad = _RunningStats(decay, floor=0.05)  # of log(grad norm): a 5% change

    def check(self, loss: float, grad_norm: float) -> tuple[bool, float, float]:
        """(is_spike, loss z-score, grad-norm z-score). Healthy steps update the statistics."""
        z_loss = self.loss.z(loss)
        z_grad = self.grad.z(math.log(max(grad_norm, 1e-12)))  # norms are log-normal-ish
        spike = self.loss.n >= self.warmup and (z_loss > self.z_threshold or z_grad > self.z_threshold)
        if not spike:
            self.loss.push(loss)
            self.grad.push(math.log(max(grad_norm, 1e-12)))
        return spike, z_loss, z_grad

    def state_dict(self) -> dict[str, Any]:
        return {"loss": asdict(self.loss), "grad": asdict(self.grad)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss = _RunningStats(**state["loss"])
        self.grad = _RunningStats(**state["grad"])
