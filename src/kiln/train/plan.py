"""How long a run is and how often things happen: derived once from the config and the model size.

    tokens/step  = train.global_batch_size x train.seq_len
    accumulation = global batch / (micro batch x data-parallel ranks)   micro-batches per rank per step
    steps        = train.max_steps, else train.time_budget's (fixed after the warmup, kiln.train.budget),
                   else train.total_tokens / tokens per step, else Chinchilla's 20 tokens per parameter
                   (Hoffmann et al. 2022)
    intervals    = train.log_every / eval_every / save_every, each x train.step_cadence
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kiln.config import ModelConfig, OptimConfig, StageConfig, TrainConfig
from kiln.data.stages import stage_at, stage_starts
from kiln.errors import ConfigError
from kiln.model import count_params
from kiln.optim import scaled_lr

PROVISIONAL_STEPS = 10**9  # a time budget's length until it is fixed


@dataclass
class Plan:
    """The run's length, batch split, peak LR and intervals."""

    n_params: int
    tokens_per_step: int
    accum_steps: int  # micro-batches per optimizer step on each data-parallel rank
    total_steps: int
    total_tokens: int
    budget_source: str  # what set total_steps, for the printout
    peak_lr: float
    log_every: int
    eval_every: int
    save_every: int
    provisional: bool = False  # train.time_budget before the steps are fixed: total_steps is a placeholder
    stage_starts: list[int] = field(default_factory=list)  # data.stages: each stage's first step
    stage_names: list[str] = field(default_factory=list)

    def set_stages(self, stages: list[StageConfig], *, step: int = 0, started: list[int] | None = None) -> None:
        """The data stages' first steps for the current total_steps (kiln.data.stages), for a run that has taken
        `step` steps following the starts `started`: a stage begun before `step` keeps its start (a longer run
        moves a fractional start, but the batches before it were drawn), and one that would now begin in the
        past begins at `step`."""
        new = stage_starts(stages, total_steps=self.total_steps, tokens_per_step=self.tokens_per_step)
        old = list(started or [])
        self.stage_starts = [old[i] if i < len(old) and old[i] < step else max(s, step) for i, s in enumerate(new)]
        self.stage_names = [s.name or str(i) for i, s in enumerate(stages)]

    def stage_of(self, step: int) -> str | None:
        """The data stage's name of 0-based step `step` (None without stages)."""
        return self.stage_names[stage_at(self.stage_starts, step)] if self.stage_starts else None


def make_plan(model: ModelConfig, train: TrainConfig, optim: OptimConfig, *, dp_size: int = 1,
              pipeline_microbatches: int = 1, stages: list[StageConfig] | None = None) -> Plan:
    """The plan for `dp_size` data-parallel ranks; a pipeline runs `pipeline_microbatches` micro-batches
    per schedule step, so the accumulation must be a multiple of it."""
    t = train
    n_params = count_params(model)
    per_pass = t.micro_batch_size * dp_size
    if t.global_batch_size % per_pass:
        fits = [m for m in range(t.micro_batch_size, 0, -1) if t.global_batch_size % (m * dp_size) == 0]
        fix = (f"; set --train.micro_batch_size {fits[0]} (the same global batch)" if fits else
               f"; set --train.global_batch_size {per_pass} or a multiple of it")
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size x data-parallel ranks ({t.micro_batch_size} x {dp_size}){fix}")
    accum = t.global_batch_size // per_pass
    if accum % pipeline_microbatches:
        n = pipeline_microbatches
        fits = [m for m in range(t.micro_batch_size, 0, -1)
                if t.global_batch_size % (m * dp_size) == 0 and (t.global_batch_size // (m * dp_size)) % n == 0]
        fix = (f"set --train.micro_batch_size {fits[0]} (the same global batch)" if fits else
               f"set --train.global_batch_size {per_pass * n} or a multiple of it")
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} gives {accum} micro-batch{'es' if accum != 1 else ''} of "
            f"{t.micro_batch_size} per data-parallel rank, not a multiple of the pipeline's {n} microbatches per step "
            f"(parallel.pp_microbatches; its default, 0, is one per pipeline stage); {fix}")
    tokens_per_step = t.global_batch_size * t.seq_len
    provisional = False
    if t.max_steps > 0:
        steps, source = t.max_steps, "train.max_steps"
    elif t.time_budget:  # until it is fixed no schedule phase but the warmup may depend on the length
        steps, source, provisional = PROVISIONAL_STEPS, f"train.time_budget {t.time_budget} (fixed after the warmup)", True
    elif t.total_tokens > 0:
        steps, source = math.ceil(t.total_tokens / tokens_per_step), "train.total_tokens"
    else:
        steps, source = math.ceil(20 * n_params / tokens_per_step), "Chinchilla default (20 x parameters)"

    def cadence(n: int) -> int:
        return max(1, round(n * t.step_cadence))

    plan = Plan(n_params=n_params, tokens_per_step=tokens_per_step, accum_steps=accum, total_steps=steps,
                total_tokens=steps * tokens_per_step, budget_source=source,
                peak_lr=scaled_lr(optim, t.global_batch_size), log_every=cadence(t.log_every),
                eval_every=cadence(t.eval_every), save_every=cadence(t.save_every), provisional=provisional)
    if stages:
        plan.set_stages(stages)
    return plan
