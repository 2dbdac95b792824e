"""The default learning rate of a post-training stage, derived from the checkpoint it starts from.

`kiln sft | dpo | rlvr` without --optim.lr train at

    lr(stage) = peak x min(1, RATIO[stage] x (ANCHOR_WIDTH / d_model) ** WIDTH_EXPONENT)

peak       the pretraining run's peak LR. A post-training run records it as posttrain.pretrain_lr,
           so DPO after SFT still sees the pretraining peak, not the SFT rate; a source without it
           (a pretraining run) gives its own peak: optim.lr (x sqrt(global batch) under
           optim.lr_scaling=sqrt). An imported HF model has kiln's default optim.lr (3e-4) there;
           --posttrain.pretrain_lr names the real one.
RATIO      fine-tuning LR / pretraining peak in the published recipes for 7-8B Llama models, which
           are 4096 wide (ANCHOR_WIDTH) and were pretrained at a peak of 3e-4 (Llama 2, Touvron et
           al. 2023; Llama 3, Dubey et al. 2024):
             sft   1/30    between Tulu 2's 2e-5 (Ivison et al. 2023, Llama 2-Chat's own SFT rate,
                           1/15) and Tulu 3's 5e-6 (Lambert et al. 2024, 1/60): their geometric mean
             dpo   1/600   Tulu 2 and Tulu 3 8B DPO: 5e-7 (Zephyr-7B, Tunstall et al. 2023: 5e-7 too)
             rlvr  1/1000  Tulu 3 8B RLVR: 3e-7
width      narrower models take a larger share of their pretraining peak. Published small-model
           recipes run far hotter than the 7B ratios: SmolLM2-1.7B (d 2048, peak 5e-4) does SFT
           at 3e-4 and DPO at 1e-6 (alignment-handbook recipes/smollm2), nanochat fine-tunes at its
           pretraining LR (chat_sft.py init_lr_frac 1.0). muP's 1/width for Adam (Yang et al. 2022,
           Tensor Programs V) is too shallow to reach that. Measured on kiln's tiny (d 128, peak
           2e-3, after 40 SFT steps; bench/posttrain_lr.py data): DPO's held-out margin after 40
           steps is 0.025 at the 1/width rate 1.1e-4, 0.14 at 4e-4, 0.08 at 2e-3; RLVR's greedy
           reward after 20 steps stays 0 at 6.4e-5 and reaches 0.12 at 4e-4. The exponent 1.5 joins
           the 7-8B ratios to those rates. The share is capped at 1: never above the peak.

What it gives (SFT, DPO, RLVR): a 1B model (d 2048, peak 3e-4) 2.8e-5, 1.4e-6, 8.5e-7 (kiln's earlier
fixed defaults, tuned for ~1B, were 2e-5, 5e-7, 1e-6; SmolLM2-1.7B's DPO 1e-6); kiln's `tiny`
(d 128, peak 2e-3) 2e-3, 6.0e-4, 3.6e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import Config
from kiln.optim import scaled_lr

ANCHOR_WIDTH = 4096  # d_model of the 7-8B Llama models the ratios are read from
WIDTH_EXPONENT = 1.5  # joins those ratios (d 4096) to what kiln's tiny (d 128) needs, see above
RATIO = {"sft": 1 / 30, "dpo": 1 / 600, "rlvr": 1 / 1000}


@dataclass(frozen=True)
class StageLR:
    """A stage's derived LR, the pretraining peak it came from, and where that peak was read."""

    lr: float
    peak: float
    peak_from: str
    factor: float

    def describe(self, stage: str, *, d_model: int) -> str:
        return (f"pretraining peak {self.peak:.3g} ({self.peak_from}) x min(1, {_frac(RATIO[stage])} x "
                f"({ANCHOR_WIDTH}/d_model {d_model})^{WIDTH_EXPONENT:g}) = x {self.factor:.3g}")


def _frac(x: float) -> str:
    return f"1/{round(1 / x)}"


def pretrain_peak(source: Config) -> tuple[float, str]:
    """(the pretraining peak LR of the model in `source`, the config key it was read from)."""
    if source.posttrain.pretrain_lr > 0:
        return source.posttrain.pretrain_lr, "posttrain.pretrain_lr"
    key = "optim.lr x sqrt(train.global_batch_size)" if source.optim.lr_scaling == "sqrt" else "optim.lr"
    return scaled_lr(source.optim, source.train.global_batch_size), key


def stage_lr(stage: str, source: Config, *, peak: float | None = None, peak_from: str = "") -> StageLR:
    """The default optim.lr of `stage` ("sft" | "dpo" | "rlvr") for a run starting from `source`
    (the checkpoint's resolved config); `peak` overrides the pretraining peak read from it."""
    if peak is None:
        peak, peak_from = pretrain_peak(source)
    factor = min(1.0, RATIO[stage] * (ANCHOR_WIDTH / source.model.d_model) ** WIDTH_EXPONENT)
    return StageLR(lr=peak * factor, peak=peak, peak_from=peak_from, factor=factor)
