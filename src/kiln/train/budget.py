"""Training for a wall-clock budget (`train.time_budget`): the steps that fit, measured, fixed by step.

The clock is TrainState.elapsed(): from the `kiln train` command's start (imports and setup count), plus
the earlier processes of a resumed run.

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
                     checkpoint, so a resumed run follows the same schedule
    step R1, R2..    the re-plans, where the schedule allows them: R1 lies 3/4 of the way from K to the
                     end of N's length-free steps (kiln.optim.schedules.length_free_steps: WSD's stable
                     phase, a constant LR's whole run; cosine has none past its warmup, so it is planned
                     once). The same rule with the mean step time of the later half of steps K+1..R1, the
                     elapsed time and the evals and saves so far gives N', clamped so that steps 1..R1
                     stay length-free under N' too (the LR of every step taken is unchanged). R2 lies 3/4
                     of the way from R1 to the end of N''s length-free steps and re-plans with the later
                     half of steps R1+1..R2, and so on while the next one is at least REPLAN_MIN_STEPS
                     away: the last re-plan comes shortly before WSD's decay starts, on the latest speed.
                     Each plan and its step go into every checkpoint (TrainState.planned_steps,
                     planned_at, plan_final). One step-time sample of a warmup is a poor guess of a run
                     whose machine drifts: on 2 shared CPU cores the speed swings by a quarter over
                     minutes. A 300 s `demo` run planned at 364 ms/step averaged 330 (251 s used); with
                     one re-plan, at 192 ms/step from the steps before it, the rest ran at 176 ms and the
                     run used 273 s (bench/RESULTS.md). The later half, not all the steps since the last
                     plan: a step's cost drifts one way too, as an untied zero-init head's rows of their
                     own grow with the ids the data reaches (`demo`'s steps slow from ~220 to ~290 ms over
                     a 300 s run; a re-plan on the mean of all 771 steps before it overran by 7%).

The plan is rank 0's (broadcast), so every rank takes the same steps. A run resumed before a re-plan
re-plans at the same step by the same rule, with the step times of its own process. The margin is 2% of
the budget (at least two steps): the machine may slow down. If it does anyway, the run stops, saved, once
the budget is over by more than 10% (`overrun`), and says so. A process that resumes a run whose plan is
fixed gets its own share from when it resumes: the budget's fraction for the steps left, plus 10%, plus 10% of
the budget for its one-off costs (`resumed`).
Otherwise a run stopped over its budget, or killed late and resumed, would stop again after every step.
Keep-best saves are not foreseen (they depend on the losses); clock saves are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from kiln.errors import ConfigError
from kiln.train.plan import Plan

MEASURED_STEPS = 30  # steps timed, when the warmup is that long; the later half of them gives the step time
REPLAN_MIN_STEPS = 20  # a re-plan averages at least this many steps, or there is none


class BudgetTooShort(ConfigError):
    """A time budget that cannot fit the warmup and the final eval and save: the run's folder goes (`kiln.train.
    trainer.train`), whatever it logged, since nothing of it will be resumed."""


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
    """Times the warmup, fixes `plan.total_steps`, and re-plans it where the schedule allows (see the
    module docstring). `length_free(N)`: how many first steps of an N-step run have an LR independent of N
    (None: never re-plan)."""

    def __init__(self, seconds: float, *, text: str, warmup_steps: int,
                 length_free: Callable[[int], int] | None = None) -> None:
        self.seconds, self.text = seconds, text
        self.measure_until = max(2, min(warmup_steps, MEASURED_STEPS))  # <= warmup: LR independent of N
        self.length_free = length_free
        self.step_times: list[float] = []  # this process's warmup steps, the first (one-off costs) included
        self.since_plan: list[float] = []  # this process's steps after the last plan, up to the next re-plan
        self.replan_at = 0  # the step of the re-plan (0: none to come)
        self.eval_time = 0.0
        self.save_time = 0.0  # the scratch checkpoint's seconds (0 in a process resumed after the plan)
        self.deadline = 1.10 * seconds  # the run's clock (TrainState.elapsed) past which it stops, saved

    def step_done(self, step: int, seconds: float) -> None:
        """`step` (1-based, just taken) took `seconds`."""
        if step <= self.measure_until:
            self.step_times.append(seconds)
        elif step <= self.replan_at:
            self.since_plan.append(seconds)

    def eval_done(self, seconds: float) -> None:
        self.eval_time = max(self.eval_time, seconds)

    def check_setup(self, elapsed: float) -> None:
        """Before the first eval of a fresh run: a budget the setup already spent is too short, said before an
        eval and a step are paid for."""
        if elapsed > self.seconds:
            raise BudgetTooShort(
                f"train.time_budget {self.text} is too short: setting the run up already took {elapsed:.1f} s, "
                "before its first eval and step; raise the budget")

    def check_not_over(self, elapsed: float, *, done: int, warmup_steps: int) -> None:
        """Before the plan: a budget already spent on the timed warmup steps, or one that the rest of the warmup
        and the final eval cannot fit at the fastest step so far, is too short, said now rather than after the
        rest of the warmup (a plan needs more steps than the warmup: `fix`)."""
        need, fastest = elapsed, min(self.step_times[1:], default=0.0)  # the first pays one-off costs
        if done >= 5:
            need += fastest * (max(warmup_steps, self.measure_until) + 1 - done) + self.eval_time
        if elapsed > self.seconds or need > self.seconds:
            more = (f", and the warmup's other steps (optim.warmup_steps {warmup_steps}, {fastest:.2f} s each at "
                    f"best) and the final eval need {need - elapsed:.0f} s more" if need > elapsed else "")
            raise BudgetTooShort(
                f"train.time_budget {self.text} is too short: {done} of the {self.measure_until} timed warmup steps "
                f"and the first eval already took {elapsed:.1f} s{more}; raise the budget or lower optim.warmup_steps / "
                "train.eval_tokens")

    def due(self, step: int, planned: int) -> bool:
        """The plan is fixed after the last timed step, once."""
        return planned == 0 and step >= self.measure_until

    def fix(self, plan: Plan, *, elapsed: float, done: int, save_seconds: float, save_every_minutes: float,
            warmup_steps: int) -> int:
        """Set plan.total_steps (and total_tokens, budget_source) to the steps that fit; returns them."""
        times = self.step_times[len(self.step_times) // 2:]  # the first steps pay one-off costs
        # the median; a run given its budget when resumed past the timed warmup timed no step in this process:
        # the run's own average so far (its evals, saves and setup included: on the safe side), never 0
        step = sorted(times)[len(times) // 2] if times else elapsed / max(done, 1)
        self.save_time = save_seconds
        costs = Costs(step=step, eval=self.eval_time, save=save_seconds)
        n = fit_steps(self.seconds, elapsed=elapsed, done=done, costs=costs, eval_every=plan.eval_every,
                      save_every=plan.save_every, save_every_minutes=save_every_minutes)
        if n <= max(done, warmup_steps):
            need = elapsed + costs.eval + costs.save + step * max(warmup_steps + 1 - done, 1)
            raise BudgetTooShort(
                f"train.time_budget {self.text} is too short: {done} steps took {elapsed:.1f} s, a step takes "
                f"{step:.2f} s, an eval {costs.eval:.1f} s and a checkpoint {costs.save:.1f} s, so the warmup "
                f"(optim.warmup_steps {warmup_steps}) and the final eval and save need about {need:.0f} s; raise "
                "the budget or lower optim.warmup_steps / train.eval_tokens")
        plan.total_steps, plan.total_tokens, plan.provisional = n, n * plan.tokens_per_step, False
        plan.budget_source = (f"train.time_budget {self.text} ({step * 1e3:.0f} ms/step"
                              + ("" if times else f": the run's average over its {done} steps so far")
                              + f", eval {costs.eval:.2f} s, checkpoint {costs.save:.2f} s, measured)")
        return n

    def schedule_replan(self, planned: int, *, after: int = 0) -> int:
        """Where a run of `planned` steps, (re-)planned after step `after` (0: the warmup's plan, after step
        measure_until), re-plans next (0: it does not)."""
        if self.length_free is None:
            return 0
        k = max(after, self.measure_until)
        at = k + (self.length_free(planned) - k) * 3 // 4
        self.replan_at = at if at - k >= REPLAN_MIN_STEPS else 0
        return self.replan_at

    def replan_due(self, step: int) -> bool:
        return self.replan_at > 0 and step == self.replan_at

    def replan(self, plan: Plan, *, elapsed: float, done: int, planned: int, save_every_minutes: float) -> int:
        """The run's length after step `done` (= replan_at) of a run planned for `planned` steps; the caller
        schedules the next re-plan (schedule_replan with after=done)."""
        assert self.length_free is not None and self.since_plan
        # the mean of the later half: a step's cost drifts (the machine; an untied zero-init head's rows of their own
        # grow as the data reaches more ids), and its latest steps say more of the rest of the run than its first
        recent = self.since_plan[len(self.since_plan) // 2:]
        step = sum(recent) / len(recent)
        costs = Costs(step=step, eval=self.eval_time, save=self.save_time)
        n = fit_steps(self.seconds, elapsed=elapsed, done=done, costs=costs, eval_every=plan.eval_every,
                      save_every=plan.save_every, save_every_minutes=save_every_minutes)
        lo, hi = done, planned  # the shortest run whose first `done` steps are length-free: the LR taken stays
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.length_free(mid) >= done else (mid + 1, hi)
        n = max(n, lo)
        plan.budget_source = (f"train.time_budget {self.text} (re-planned at step {done}: {step * 1e3:.0f} ms/step "
                              f"on average over its last {len(recent)} steps, measured)")
        self.replan_at, self.since_plan = 0, []
        return n

    def resumed(self, *, elapsed: float, done: int, planned: int) -> None:
        """This process resumes, at run clock `elapsed`, a run planned for `planned` steps with `done` taken: its
        steps get the budget's share for them plus 10%, and its own one-off costs (its first, slower steps, the
        final eval and save) 10% of the budget, from now (or the run's own deadline, where later). Without
        that grace a run resumed near the end of its plan got well under a second and stopped, saved, after
        one to nine steps at every command."""
        share = self.seconds * max(planned - done, 0) / max(planned, 1)
        self.deadline = max(self.deadline, elapsed + 1.10 * share + 0.10 * self.seconds)

    def overrun(self, elapsed: float) -> bool:
        """The run is more than 10% past its budget (the machine slowed down after the plan was fixed), or, in a
        resumed process, past its share of it (`resumed`)."""
        return elapsed > self.deadline
