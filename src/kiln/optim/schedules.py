"""Learning-rate schedules as pure functions of the step: lr(step) = peak * factor(step).

Pure functions resume trivially: the step counter is the whole schedule state.

InfiniteLR ("Beyond Cosine Decay", arXiv 2503.02844, Eq. 1):
    warmup W steps: linear to the peak
    cooldown C steps: cosine from 1 to constant_lr_ratio,
        C = max(min_cooldown_tokens / tokens_per_step, cooldown_ratio x total_steps)   (real-valued)
    constant: constant_lr_ratio until the anneal (or forever)
    anneal (anneal_steps > 0): the run's last anneal_steps go geometrically from the value reached
        there to min_lr_ratio (the paper's exponential anneal), reaching it exactly at the last step
        that runs (total_steps - 1); config validation keeps min_lr_ratio <= constant_lr_ratio, so the
        anneal never raises the LR

Decays that end with the run (cosine, WSD's decay, the anneal) measure progress as
(step - start) / (total_steps - 1 - start): steps are 0-based, so the last one that runs is
total_steps - 1 and it gets the floor exactly.

Extending train.total_tokens on resume (the forgather guide's example 6): total_steps grows and every step is
recomputed from the same formula. C depends on total_steps only through cooldown_ratio x total_steps:
when min_cooldown_tokens dominates (the forgather guide's regime for runs under ~143B tokens at its defaults), C,
and so the LR at every step already trained, is unchanged and the constant phase just extends. When the
ratio term dominates, a longer run stretches the cooldown, so the LR at the resume step rises slightly
(a small upward jump). An anneal moves to the new end of the run; resuming after an anneal has started
jumps back up to the cooldown/constant value, which is what "continue pretraining from the pre-anneal
state" means, but then resume from a checkpoint saved before the anneal.

The forgather guide's claim "3B token run: max(1.22M steps, 32K steps) = 1.22M -> trains at ~99.6% of max_lr
throughout", checked against the formula: the two numbers come from different batches. At the default
4-GPU batch (65,536 tokens/step) the run is 45,776 steps, 0.7 x 45,776 = 32,043, but 100B / 65,536 =
1,525,879 cooldown steps (1.22M is 100B / 81,920, the 5-GPU batch of its example 4). Either way the
cooldown is ~33x longer than the run, so the cosine has covered 3% of its span at the last step: the LR
ends at 99.90% of max_lr with the guide's constant_lr (0.9978 of the way from constant to max). So
the claim holds, and is conservative: the LR never drops below 99.9% of max_lr.
(tests/test_optim.py::test_forgather_claim_3b_tokens checks these numbers.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.config import OptimConfig


def _warmup(cfg: OptimConfig, total_steps: int) -> int:
    return min(cfg.warmup_steps, max(total_steps - 1, 0))


def _progress(step: float, start: int, total_steps: int) -> float:
    """0 at `start`, 1 at the last step that runs (total_steps - 1), clamped to [0, 1]. A decay of one step is
    that last step: 1 (it stayed at 0, so a WSD decay of one step ended the run at the peak)."""
    span = total_steps - 1 - start
    if span <= 0:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / span, 0.0), 1.0)


def _no_decay(total_steps: int, cfg: OptimConfig) -> bool:
    """A run of one step, or one whose optim.warmup_steps does not fit (cut to the run): it ends at the peak,
    and the start-of-run summary says why (describe_schedule)."""
    return total_steps <= 1 or (cfg.warmup_steps >= total_steps and cfg.schedule != "constant")


def _wsd_decay_start(total_steps: int, cfg: OptimConfig) -> int:
    """WSD's first decaying step: the last decay_fraction of the run (at least one step), after the warmup."""
    return max(total_steps - max(int(round(cfg.decay_fraction * total_steps)), 1), _warmup(cfg, total_steps))


def _cosine(progress: float) -> float:
    """1 -> 0 over progress 0 -> 1 (clamped)."""
    return 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@dataclass(frozen=True)
class InfinitePhases:
    """Phase boundaries of the infinite schedule (real-valued step positions)."""

    warmup: int
    cooldown_steps: float  # C
    cooldown_end: float  # warmup + C
    anneal_start: int | None  # None: no anneal
    cooldown_from_tokens: bool  # True when min_cooldown_tokens set C (not the ratio)


def infinite_phases(total_steps: int, cfg: OptimConfig, tokens_per_step: int | None) -> InfinitePhases:
    """Where the infinite schedule's phases start and end for a run of `total_steps`."""
    if cfg.min_cooldown_tokens > 0 and not tokens_per_step:
        raise ValueError("schedule=infinite with min_cooldown_tokens needs tokens_per_step")
    warmup = _warmup(cfg, total_steps)
    from_tokens = cfg.min_cooldown_tokens / tokens_per_step if tokens_per_step else 0.0
    from_ratio = cfg.cooldown_ratio * total_steps
    cooldown = max(from_tokens, from_ratio)
    anneal_start = max(total_steps - cfg.anneal_steps, warmup) if cfg.anneal_steps > 0 else None
    return InfinitePhases(warmup, cooldown, warmup + cooldown, anneal_start, from_tokens > from_ratio)


def _infinite_before_anneal(step: float, cfg: OptimConfig, ph: InfinitePhases) -> float:
    c = cfg.constant_lr_ratio
    if ph.cooldown_steps <= 0:
        return c
    return c + (1 - c) * _cosine((step - ph.warmup) / ph.cooldown_steps)


def lr_factor(step: int, *, total_steps: int, cfg: OptimConfig, tokens_per_step: int | None = None) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based).

    `tokens_per_step` is needed by schedule=infinite (min_cooldown_tokens); the others ignore it.
    """
    warmup = _warmup(cfg, total_steps)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup  # linear warmup reaching the peak at the last warmup step
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant" or _no_decay(total_steps, cfg):
        return 1.0
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * _cosine(_progress(step, warmup, total_steps))
    if cfg.schedule == "wsd":
        # Warmup-Stable-Decay (Hu et al. 2024, MiniCPM): flat at the peak, then decay over the last part.
        decay_start = _wsd_decay_start(total_steps, cfg)
        if step < decay_start:
            return 1.0
        progress = _progress(step, decay_start, total_steps)
        if cfg.decay_shape == "linear":
            shape = 1 - progress
        elif cfg.decay_shape == "cosine":
            shape = _cosine(progress)
        else:  # 1-sqrt (Hagele et al. 2024)
            shape = 1 - math.sqrt(progress)
        return floor + (1 - floor) * shape
    if cfg.schedule == "infinite":
        ph = infinite_phases(total_steps, cfg, tokens_per_step)
        if ph.anneal_start is None or step < ph.anneal_start:
            return _infinite_before_anneal(step, cfg, ph)
        start = _infinite_before_anneal(ph.anneal_start, cfg, ph)
        progress = _progress(step, ph.anneal_start, total_steps)
        return start * (floor / start) ** progress  # geometric: start at the anneal start, floor at the end
    raise AssertionError(cfg.schedule)


def length_free_steps(total_steps: int, cfg: OptimConfig) -> int:
    """How many of a run's first steps get an LR that does not depend on its length `total_steps`: the
    warmup (cosine; infinite, whose cooldown may scale with the run), warmup + stable phase (WSD), every
    step (constant). A time budget may re-plan the length before this point (kiln.train.budget)."""
    warmup = _warmup(cfg, total_steps)
    if cfg.schedule == "constant":
        return total_steps
    if cfg.schedule == "wsd":
        return _wsd_decay_start(total_steps, cfg)
    return warmup


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The peak LR: `optim.lr`, or with lr_scaling=sqrt `optim.lr x sqrt(global_batch)` (the forgather guide, after
    Smith et al. 2017 / Malladi et al. 2022: sqrt scaling keeps the update noise level for adaptive optimizers)."""
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(global_batch)
    return cfg.lr


def describe_schedule(total_steps: int, cfg: OptimConfig, tokens_per_step: int | None = None, *,
                      peak_lr: float | None = None) -> list[str]:
    """A few human-readable lines for the start-of-run summary and --dry-run: the phases and the LR at
    the end of warmup and at 25/50/75/100% of the run. `peak_lr` defaults to `cfg.lr` (pass scaled_lr())."""
    peak = cfg.lr if peak_lr is None else peak_lr
    last = max(total_steps - 1, 0)
    warmup = _warmup(cfg, total_steps)

    def at(step: int) -> str:
        f = lr_factor(step, total_steps=total_steps, cfg=cfg, tokens_per_step=tokens_per_step)
        return f"{peak * f:.3g} ({100 * f:.2f}%)"

    scaling = ""
    if cfg.lr_scaling == "sqrt":
        scaling = (f" (base {cfg.lr:g} x sqrt(global batch) = x{peak / cfg.lr:.3g})" if peak_lr is not None
                   else " (lr_scaling=sqrt: this is the base LR for global batch 1)")
    whole = total_steps > 1 and _no_decay(total_steps, cfg)  # `tiny` for 20 steps
    cut = f" (optim.warmup_steps {cfg.warmup_steps}, cut to the run)" if cfg.warmup_steps > warmup else ""
    lines = [f"lr schedule {cfg.schedule}: peak {peak:.3g}{scaling}, warmup {warmup:,} steps{cut}"]
    if whole or total_steps <= 1:  # the step after the warmup is at the peak: no decay (the note below says why)
        pass
    elif cfg.schedule == "cosine":
        lines.append(f"  cosine decay steps {warmup:,}-{last:,} to {cfg.min_lr_ratio:g} x peak")
    elif cfg.schedule == "wsd":
        start = _wsd_decay_start(total_steps, cfg)
        stable = f"stable steps {warmup:,}-{start - 1:,}" if start > warmup else "no stable steps"  # a short run
        lines.append(f"  {stable}, {cfg.decay_shape} decay steps {start:,}-{last:,} to {cfg.min_lr_ratio:g} x peak")
    elif cfg.schedule == "infinite":
        ph = infinite_phases(total_steps, cfg, tokens_per_step)
        why = (f"min_cooldown_tokens {cfg.min_cooldown_tokens:.3g} / {tokens_per_step:,} tokens/step"
               if ph.cooldown_from_tokens else f"{cfg.cooldown_ratio:g} x {total_steps:,} steps")
        end = math.ceil(ph.cooldown_end)
        where = "past the end of the run" if end > last else f"then constant {cfg.constant_lr_ratio:g} x peak"
        lines.append(f"  cosine cooldown to {cfg.constant_lr_ratio:g} x peak over {ph.cooldown_steps:,.0f} steps "
                     f"({why}): steps {warmup:,}-{end - 1:,}, {where}")
        if ph.anneal_start is not None:
            lines.append(f"  anneal steps {ph.anneal_start:,}-{last:,} geometrically to {cfg.min_lr_ratio:g} x peak")
    points = [("warmup end", max(warmup - 1, 0))] + [(f"{q}%", min(last, (total_steps * q) // 100))
                                                     for q in (25, 50, 75)] + [("100%", last)]
    points.sort(key=lambda p: p[1])  # in step order: a warmup may end after the 25% (or 50%) point
    lines.append("  lr at " + ", ".join(f"{label} (step {s:,}) {at(s)}" for label, s in points))
    if whole:
        lines.append(f"  note: optim.warmup_steps {cfg.warmup_steps} is not shorter than the run's {total_steps:,} "
                     f"steps, so the warmup takes the whole run and the LR never decays; set --optim.warmup_steps "
                     f"{max(total_steps // 10, 1)} for a decay")
    return lines
