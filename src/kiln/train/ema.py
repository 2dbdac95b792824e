"""train.ema_decay: an exponential moving average of the weights, kept during training.

    w_ema <- d_n w_ema + (1 - d_n) w    after every optimizer step, in fp32,
    d_n = min(d, n / (n + 1))           n: the weights averaged so far

It averages about the last 1 / (1 - d) steps (0.999: about 1000). Until it holds that many, d_n makes it the
plain mean of the weights so far: a fresh run's random initialisation is not one of them (n starts at 0, so the
first step's weights replace it), a run started from loaded weights (run.init_from, or a resume that turns the
average on) counts them once. Without the ramp the initialisation kept d^k of the average after k steps: 37% of
a 1000-step run's at 0.999.

At a constant learning rate (the stable phase of a WSD run, or `schedule: constant`) the average is the model a
decay would reach, at any step and without the decay (bench/RESULTS.md, "Checkpoint averaging"); after a
decay to 0 there is little left to average. The average lives beside the weights in every checkpoint (under
the same whole-model names, so any layout saves and resumes it); `kiln average CKPT --weights ema --out DIR` turns it into a normal checkpoint
that eval, generate and export take.

Each part's average has the placement of its parameters (a sharded parameter's average is sharded the same
way), so the update needs no communication.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kiln.train.checkpoint import part_weights


class WeightEMA:
    """The fp32 moving average of the weights of a layout's model parts, keyed by whole-model names."""

    def __init__(self, parts: list[nn.Module], *, decay: float, tie_embeddings: bool) -> None:
        assert 0 < decay < 1, decay
        self.decay = decay
        self.live: dict[str, Tensor] = {}  # views of the parameters (they are updated in place)
        for part in parts:
            self.live.update(part_weights(part, tie_embeddings=tie_embeddings))
        self.average = {k: v.detach().float().clone() for k, v in self.live.items()}  # same placements
        self.count = 0  # the weights in the average: none yet (the initialisation is a placeholder)

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step."""
        d = min(self.decay, self.count / (self.count + 1))
        for k, avg in self.average.items():
            avg.lerp_(self.live[k].float(), 1.0 - d)
        self.count += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the current weights, which count once (a run started from another run's, or
        from a checkpoint written without an average)."""
        for k, avg in self.average.items():
            avg.copy_(self.live[k])
        self.count = 1

    def state_dict(self) -> dict[str, Tensor]:
        """The average itself (DCP loads a checkpoint's into it in place)."""
        return self.average
