"""Training for a wall-clock budget (`train.time_budget`): the steps that fit, fixed once, measured.

    step 0           the initial eval (timed)
    steps 1..K       the LR warmup (at most MEASURED_STEPS of it), whose learning rate does not depend on
                     the run's length; the median of the later half of steps 1..K is the step time (the
                     first steps pay one-off costs: allocations, compilation, filling the loader's row
                     shuffle buffer; measured on 2 CPU cores, `demo`'s steps 1-10 ran at half the speed
                     of step 30 on, and a plan timed on steps 2-11 left a fifth of a 300 s budget unused)
    after step K     one checkpoint is written to a scratch folder and deleted (timed), then
                     N = the most steps such that
                         elapsed + (N - K) x step + evals(K, N] x eval + saves(K, N] x save
                               + the final eval + the final save + a margin  <=  budget
                     is fixed: plan.total_steps = N, and TrainState.planned_steps = N goes into every
                     checkpoint, so a resumed run follows the same schedule (never re-planned)

The margin is 2% of the budget (at least two steps): the machine may slow down. If it does anyway,
the run stops, saved, once the budget is over by more than 10% (`overrun`), and says so.
Keep-best saves are not foreseen (they depend on the losses); clock saves are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.errors import ConfigError
from kiln.train.plan import Plan

MEASURED_STEPS = 30  # steps timed, when the warmup is that long; the later half of them gives the step time


@dataclass
class Costs:
    """Measured seconds."""

    step: float
    eval: float
    save: float


def fit_steps(budget: float, *, elapsed: float, done: int, costs: Costs, eval_every: int, save_every: int,
              save_every_minutes: float = 0.0) -> int:
    """The most steps N >= done whose remaining work fits: see the module docstring."""
    margin = max(0.02 * budget, 2 * costs.step)
    left = budget - elapsed - margin - costs.eval - costs.save  # the final eval and save

    def cost(n: int) -> float:
        evals = n // eval_every - done // eval_every - (1 if n % eval_every == 0 else 0)  # the last is the final
        saves = n // save_every - done // save_every - (1 if n % save_every == 0 else 0)
        if save_every_minutes > 0:
            saves += int((n - done) * costs.step / (60 * save_every_minutes))
        return (n - done) * costs.step + max(evals, 0) * costs.eval + max(saves, 0) * costs.save

    if left <= 0:
        return done
    lo, hi = done, done + max(1, math.ceil(left / max(costs.step, 1e-9))) + 1
    while lo < hi:  # cost is increasing in n: the largest n with cost(n) <= left
        mid = (lo + hi + 1) // 2
        if cost(mid) <= left:
            lo = mid
        else:
            hi = mid - 1
    return lo


class TimeBudget:
    """Times the warmup, then fixes `plan.total_steps` (see the module docstring)."""

    def __init__(self, seconds: float, *, text: str, warmup_steps: int) -> None:
        self.seconds, self.text = seconds, text
        self.measure_until = max(2, min(warmup_steps, MEASURED_STEPS))  # <= warmup: LR independent of N
        self.step_times: list[float] = []  # this process's steps, the first (one-off costs) included
        self.eval_time = 0.0

    def step_done(self, step: int, seconds: float) -> None:
        """`step` (1-based, just taken) took `seconds`."""
        if step <= self.measure_until:
            self.step_times.append(seconds)

    def eval_done(self, seconds: float) -> None:
        self.eval_time = max(self.eval_time, seconds)

    def due(self, step: int, planned: int) -> bool:
        """The plan is fixed after the last timed step, once."""
        return planned == 0 and step >= self.measure_until

    def fix(self, plan: Plan, *, elapsed: float, done: int, save_seconds: float, save_every_minutes: float,
            warmup_steps: int) -> int:
        """Set plan.total_steps (and total_tokens, budget_source) to the steps that fit; returns them."""
        times = self.step_times[len(self.step_times) // 2:]  # the first steps pay one-off costs
        step = sorted(times)[len(times) // 2] if times else 0.0  # the median
        costs = Costs(step=step, eval=self.eval_time, save=save_seconds)
        n = fit_steps(self.seconds, elapsed=elapsed, done=done, costs=costs, eval_every=plan.eval_every,
                      save_every=plan.save_every, save_every_minutes=save_every_minutes)
        if n <= max(done, warmup_steps):
            need = elapsed + costs.eval + costs.save + step * max(warmup_steps + 1 - done, 1)
            raise ConfigError(
                f"train.time_budget {self.text} is too short: {done} steps took {elapsed:.1f} s, a step takes "
                f"{step:.2f} s, an eval {costs.eval:.1f} s and a checkpoint {costs.save:.1f} s, so the warmup "
                f"(optim.warmup_steps {warmup_steps}) and the final eval and save need about {need:.0f} s; raise "
                "the budget or lower optim.warmup_steps / train.eval_tokens")
        plan.total_steps, plan.total_tokens, plan.provisional = n, n * plan.tokens_per_step, False
        plan.budget_source = (f"train.time_budget {self.text} ({step * 1e3:.0f} ms/step, eval {costs.eval:.1f} s, "
                              f"checkpoint {costs.save:.2f} s, measured)")
        return n

    def overrun(self, elapsed: float) -> bool:
        """The run is more than 10% past its budget (the machine slowed down after the plan was fixed)."""
        return elapsed > 1.10 * self.seconds
