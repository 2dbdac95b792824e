"""Training for a wall-clock budget, to a target, and with downstream tasks scored at every eval."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_kiln
from kiln.config import OptimConfig, load_config, parse_duration
from kiln.errors import ConfigError
from kiln.eval.suite import heldout_next_items, load_tasks
from kiln.optim import length_free_steps, lr_factor
from kiln.runinfo import format_duration
from kiln.train import checkpoint as ckpt_io
from kiln.train.budget import REPLAN_MIN_STEPS, BudgetTooShort, Costs, TimeBudget, fit_steps
from kiln.train.metrics import read_metrics
from kiln.train.plan import Plan
from kiln.train.trainer import train
from test_train import small_overrides


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_kiln(*args, capture_output=True, text=True, timeout=600)


def train_records(run: Path) -> dict[int, dict]:
    wall = {"tokens_per_sec", "elapsed_sec", "eta_sec", "progress"}
    return {r["step"]: {k: v for k, v in r.items() if k not in wall}
            for r in read_metrics(run) if r["kind"] == "train"}


def test_durations_parse_and_bad_ones_are_one_line():
    assert [parse_duration(x) for x in ("90s", "10m", "8h", "1h30m", "45", "1.5m")] == [90, 600, 28800, 5400, 45, 90]
    assert parse_duration("1h30m20s") == 5420 and parse_duration("5m30s") == 330
    for ambiguous in ("1h30", "5m30"):  # a trailing bare number after a unit could be minutes or seconds
        with pytest.raises(ConfigError, match=f"'{ambiguous}' is ambiguous; write {ambiguous}m or {ambiguous}s"):
            parse_duration(ambiguous)
    for bad in ("", "abc", "10 minutes", "0s", "-5m"):
        with pytest.raises(ConfigError, match="train.time_budget: ") as e:
            parse_duration(bad)
        assert "\n" not in str(e.value)
    # a bare number on the command line is seconds, as "45" is (YAML reads it as a number, not a string)
    for typed, seconds in (("300", 300.0), ("0.5", 0.5)):
        cfg = load_config("demo", ["--train.time_budget", typed])
        assert cfg.train.time_budget == typed and parse_duration(cfg.train.time_budget) == seconds
    with pytest.raises(ConfigError, match="train.time_budget .* and train.max_steps .* both set"):
        load_config("tiny", ["--train.time_budget", "10m", "--train.max_steps", "5"])
    with pytest.raises(ConfigError, match="set optim.warmup_steps >= 3"):
        load_config("tiny", ["--train.time_budget", "10m", "--optim.warmup_steps", "1"])


def test_a_budget_spent_during_the_timed_warmup_is_refused_at_once():
    budget = TimeBudget(5.0, text="5s", warmup_steps=30)
    budget.check_not_over(4.9, done=3, warmup_steps=30)  # still inside, and too few steps timed to say: go on
    with pytest.raises(ConfigError, match=r"^train.time_budget 5s is too short: 4 of the 30 timed warmup steps and "
                                          r"the first eval already took 5.1 s; raise the budget") as e:
        budget.check_not_over(5.1, done=4, warmup_steps=30)
    assert "\n" not in str(e.value)


def test_a_budget_the_rest_of_the_warmup_cannot_fit_is_refused_before_it_is_spent():
    """A 60 s budget whose steps take 2 s: 30 warmup steps and the final eval cannot fit. The run said so only
    after the timed warmup, 60 s later; now once five steps show that even the fastest of them is too slow."""
    budget = TimeBudget(60.0, text="60s", warmup_steps=30)
    budget.eval_done(3.0)
    for step, seconds in enumerate([5.0, 2.0, 2.1, 2.0, 2.2], start=1):
        budget.step_done(step, seconds)
    budget.check_not_over(15.0, done=4, warmup_steps=30)  # four steps: not yet judged
    with pytest.raises(BudgetTooShort, match=r"^train.time_budget 60s is too short: 5 of the 30 timed warmup steps and "
                                             r"the first eval already took 17.0 s, and the warmup's other steps "
                                             r"\(optim.warmup_steps 30, 2.00 s each at best\) and the final eval "
                                             r"need 55 s more; raise the budget"):
        budget.check_not_over(17.0, done=5, warmup_steps=30)
    fits = TimeBudget(60.0, text="60s", warmup_steps=30)  # 1 s steps: 17 + 26 + 3 fits
    fits.eval_done(3.0)
    for step, seconds in enumerate([5.0, 1.0, 1.1, 1.0, 1.2], start=1):
        fits.step_done(step, seconds)
    fits.check_not_over(17.0, done=5, warmup_steps=30)


def test_the_budget_clock_starts_when_the_command_did(tmp_path):
    """`kiln train` passes its start to train(): setup before step 1 counts against a budget. A process that
    started 100 s ago has no 12 s budget left, and says so before its first eval."""
    import time

    cfg = load_config("tiny", small_overrides(tmp_path, **{"train.time_budget": "12s", "optim.warmup_steps": 4}))
    with pytest.raises(ConfigError, match=r"^train.time_budget 12s is too short: setting the run up already took") as e:
        train(cfg, quiet=True, started=time.time() - 100)
    took = float(re.search(r"already took ([0-9.]+) s", str(e.value)).group(1))
    assert 100 <= took < 100 + 60  # the 100 s before, plus this process's setup
    assert not (tmp_path / "run").exists()  # the run folder it made is gone with it
    (tmp_path / "run").mkdir()  # a folder that held anything (here a hidden file) is left as it was
    (tmp_path / "run" / ".keep").write_text("mine")
    with pytest.raises(ConfigError, match=r"^train.time_budget 12s is too short"):
        train(cfg, quiet=True, started=time.time() - 100)
    assert (tmp_path / "run" / ".keep").read_text() == "mine" and (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("stage, row", [
    ("sft", {"messages": [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "3"}]}),
    ("dpo", {"prompt": "What is 1+2?", "chosen": "3", "rejected": "5 no"}),
    ("rlvr", {"prompt": "What is 1+2?", "answer": "3"}),
])
def test_post_training_budget_clocks_start_when_the_command_did(tmp_path, stage, row):
    """`kiln sft|dpo|rlvr` get the command's start from the CLI, as `kiln train` does: a command that started
    100 s ago has no 12 s budget left."""
    import time

    from kiln.posttrain import commands
    from test_sft import base_checkpoint, jsonl

    ckpt = base_checkpoint(tmp_path)
    data = jsonl(tmp_path / "data.jsonl", [row] * 16)
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--run.out_dir", str(tmp_path / stage), "--quiet",
            "--train.time_budget", "12s", "--optim.warmup_steps", "4",
            *(["--posttrain.max_new_tokens", "2"] if stage == "rlvr" else [])]
    with pytest.raises(ConfigError, match=r"^train.time_budget 12s is too short: setting the run up already took") as e:
        getattr(commands, stage)(argv, started=time.time() - 100)
    took = float(re.search(r"already took ([0-9.]+) s", str(e.value)).group(1))
    assert 100 <= took < 100 + 60


def test_fit_steps_counts_steps_evals_and_saves():
    # 100 s budget, 10 s used, margin 2 s, final eval 4 s + save 2 s: 82 s left for steps at 1 s each,
    # plus an eval (4 s) every 10 steps and a save (2 s) every 25
    costs = Costs(step=1.0, eval=4.0, save=2.0)
    n = fit_steps(100.0, elapsed=10.0, done=5, costs=costs, eval_every=10, save_every=25)

    def spent(n: int) -> float:
        evals = len([s for s in range(6, n) if s % 10 == 0])  # the last step's eval is the final one
        saves = len([s for s in range(6, n) if s % 25 == 0])
        return (n - 5) * 1.0 + 4.0 * evals + 2.0 * saves

    assert spent(n) <= 82.0 < spent(n + 1)
    assert fit_steps(10.0, elapsed=20.0, done=5, costs=costs, eval_every=10, save_every=25) == 5  # no time left


def test_the_step_time_is_the_later_half_of_the_warmup():
    """The first steps pay one-off costs (on demo, steps 1-10 ran at half the later speed): a warmup of 30
    is timed to its end and the plan uses the median of steps 16-30, not the slow start."""
    budget = TimeBudget(100.0, text="100s", warmup_steps=30)
    assert budget.measure_until == 30
    for step in range(1, 31):
        budget.step_done(step, 0.5 if step <= 12 else 0.125)  # 12 slow steps, then the steady speed
        assert budget.due(step, 0) == (step == 30)
    plan = _plan()
    n = budget.fix(plan, elapsed=8.0, done=30, save_seconds=0.0, save_every_minutes=0.0, warmup_steps=30)
    assert "125 ms/step" in plan.budget_source and not plan.provisional
    assert n == 30 + 720  # (100 s - 8 elapsed - 2 margin) / 0.125 s; no evals or saves due


def _plan() -> Plan:
    return Plan(n_params=1, tokens_per_step=1, accum_steps=1, total_steps=10**9, total_tokens=0, budget_source="",
                peak_lr=1e-3, log_every=10, eval_every=10**6, save_every=10**6, provisional=True)


def _wsd_budget(cfg: OptimConfig) -> TimeBudget:
    """A 100 s budget planned after 30 warmup steps of 0.125 s each (8 s elapsed): 750 steps."""
    budget = TimeBudget(100.0, text="100s", warmup_steps=30, length_free=functools.partial(length_free_steps, cfg=cfg))
    for step in range(1, 31):
        budget.step_done(step, 0.125)
    assert budget.fix(_plan(), elapsed=8.0, done=30, save_seconds=0.0, save_every_minutes=0.0, warmup_steps=30) == 750
    return budget


@pytest.mark.parametrize("later_step", [0.1, 0.5])
def test_a_wsd_run_replans_once_in_its_stable_phase_and_keeps_the_lr_of_every_step_taken(later_step):
    """The plan comes from 15 warmup steps; the re-plan, 3/4 of the way to the decay, from the mean of the
    later half of the 371 steps since. A faster machine gets more steps; a slower one fewer, but never so few that a step
    already taken would have been in the decay."""
    cfg = OptimConfig(schedule="wsd", decay_fraction=0.3, warmup_steps=30)
    budget = _wsd_budget(cfg)
    assert length_free_steps(750, cfg) == 525  # the decay: steps 525-749
    at = budget.schedule_replan(750)
    assert at == 30 + (525 - 30) * 3 // 4 == 401
    for step in range(31, 402):
        budget.step_done(step, later_step)
        assert budget.replan_due(step) == (step == 401)
    elapsed = 8.0 + 371 * later_step
    plan = _plan()
    n = budget.replan(plan, elapsed=elapsed, done=401, planned=750, save_every_minutes=0.0)
    assert "re-planned at step 401" in plan.budget_source and not budget.replan_due(402)
    if later_step == 0.1:  # (100 - 45.1 elapsed - 2 margin) / 0.1 s more
        mean = sum([0.1] * 186) / 186  # the later half's mean, summed as the budget sums it
        assert n == fit_steps(100.0, elapsed=elapsed, done=401, costs=Costs(mean, 0.0, 0.0), eval_every=10**6,
                              save_every=10**6) and 925 < n < 935
    else:  # 223.5 s elapsed: no time left, and the shortest run whose steps 0..400 are all stable is 573
        assert n == 573 and length_free_steps(573, cfg) == 401 > length_free_steps(572, cfg)
    assert all(lr_factor(s, total_steps=750, cfg=cfg) == lr_factor(s, total_steps=n, cfg=cfg) for s in range(401))


def test_a_replan_takes_the_later_half_of_the_steps_since_the_plan():
    """Steps that slow down as the run goes (a machine slowing, a zero-init head's own rows growing): the re-plan
    prices the rest of the run at the later half's mean step, not at the mean since the plan, which would
    overrun."""
    cfg = OptimConfig(schedule="wsd", decay_fraction=0.3, warmup_steps=30)
    budget = _wsd_budget(cfg)
    budget.schedule_replan(750)
    for step in range(31, 402):
        budget.step_done(step, 0.1 if step <= 215 else 0.14)  # steps 31-215 fast, 216-401 (the later 186) slow
    elapsed = 8.0 + 185 * 0.1 + 186 * 0.14
    plan = _plan()
    n = budget.replan(plan, elapsed=elapsed, done=401, planned=750, save_every_minutes=0.0)
    assert n == fit_steps(100.0, elapsed=elapsed, done=401, costs=Costs(sum([0.14] * 186) / 186, 0.0, 0.0),
                          eval_every=10**6, save_every=10**6)
    assert n < fit_steps(100.0, elapsed=elapsed, done=401, costs=Costs((185 * 0.1 + 186 * 0.14) / 371, 0.0, 0.0),
                         eval_every=10**6, save_every=10**6)
    assert "140 ms/step on average over its last 186 steps" in plan.budget_source


def test_a_wsd_run_replans_again_on_the_steps_since_the_last_plan_until_its_decay_is_near():
    """After the first re-plan (401, on a machine now at 0.1 s/step) the next one lies 3/4 of the way from
    401 to the new decay start and uses only the steps since 401: the machine slowed to 0.12 s/step there,
    so the run shrinks to what fits at that speed. Re-plans stop once the next would be under
    REPLAN_MIN_STEPS away; every step taken keeps its LR throughout."""
    cfg = OptimConfig(schedule="wsd", decay_fraction=0.3, warmup_steps=30)
    budget = _wsd_budget(cfg)
    budget.schedule_replan(750)
    for step in range(31, 402):
        budget.step_done(step, 0.1)
    elapsed, plans, plans_at, taken = 8.0 + 371 * 0.1, [750], [401], 401
    plan = _plan()
    n = budget.replan(plan, elapsed=elapsed, done=401, planned=750, save_every_minutes=0.0)
    assert "re-planned at step 401: 100 ms/step on average over its last 186 steps" in plan.budget_source
    plans.append(n)
    at = budget.schedule_replan(n, after=401)
    assert at == 401 + (length_free_steps(n, cfg) - 401) * 3 // 4 and at - 401 >= REPLAN_MIN_STEPS
    while at:
        for step in range(taken + 1, at + 1):
            budget.step_done(step, 0.12)
        elapsed += (at - taken) * 0.12
        taken = at
        plan = _plan()
        n = budget.replan(plan, elapsed=elapsed, done=at, planned=n, save_every_minutes=0.0)
        half = (at - plans_at[-1]) - (at - plans_at[-1]) // 2  # the later half of the steps since the last plan
        assert f"re-planned at step {at}: 120 ms/step on average over its last {half} steps" in plan.budget_source
        plans_at.append(at)
        assert n == max(fit_steps(100.0, elapsed=elapsed, done=at, costs=Costs(sum([0.12] * half) / half, 0.0, 0.0),
                                  eval_every=10**6, save_every=10**6), _shortest_length_free(at, cfg, n))
        plans.append(n)
        at = budget.schedule_replan(n, after=at)
    assert len(plans) >= 3 and plans[2] < plans[1]  # slower since the first re-plan: fewer steps
    final = plans[-1]
    assert length_free_steps(final, cfg) >= taken  # the last re-plan still came before the decay
    assert all(lr_factor(s, total_steps=p, cfg=cfg) == lr_factor(s, total_steps=final, cfg=cfg)
               for p in plans for s in range(min(taken, length_free_steps(p, cfg))))


def _shortest_length_free(done: int, cfg: OptimConfig, hi: int) -> int:
    return next(m for m in range(done, hi + 1) if length_free_steps(m, cfg) >= done)


def test_cosine_and_staged_runs_are_planned_once():
    cosine = TimeBudget(100.0, text="100s", warmup_steps=30,
                        length_free=functools.partial(length_free_steps, cfg=OptimConfig(schedule="cosine", warmup_steps=30)))
    assert cosine.schedule_replan(750) == 0 and not cosine.replan_due(401)
    assert TimeBudget(100.0, text="100s", warmup_steps=30).schedule_replan(750) == 0  # no length_free: data stages


@pytest.mark.slow
def test_time_budget_plans_replans_and_a_resumed_run_follows_the_plan(tmp_path):
    """kiln train --train.time_budget as a user types it, with demo's WSD schedule: the plan line, the steps
    fixed after the warmup and saved in every checkpoint, a stop before the re-plan and a resume that re-plans
    at the same step, and the same losses and LRs as a run of the final length without a budget (steps before
    the decay do not depend on the length)."""
    over = small_overrides(tmp_path, **{"train.time_budget": "16s", "optim.warmup_steps": 8, "train.save_every": 20,
                                        "train.eval_every": 20, "optim.schedule": "wsd", "optim.decay_fraction": 0.3,
                                        "train.stop_at_step": 9})
    first = run_cli("train", "tiny", *over)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "fit train.time_budget 16s (" in first.stdout and "ms/step" in first.stdout
    common = torch.load(ckpt_io.list_checkpoints(tmp_path / "run")[-1] / "state" / "common.pt", weights_only=False)
    planned = common["planned_steps"]
    assert planned > 9 and not common["plan_final"], first.stdout  # fixed after the 8 warmup steps, re-plan to come
    cfg = load_config("tiny", over)
    replan_at = TimeBudget(16.0, text="16s", warmup_steps=8,
                           length_free=functools.partial(length_free_steps, cfg=cfg.optim)).schedule_replan(planned)
    assert replan_at > 9, planned
    second = run_cli("train", "tiny", *[x for x in over if x not in ("--train.stop_at_step", "9")])
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"(planned after step {common['planned_at']} of the run, from its timed steps)" in second.stdout
    common = torch.load(ckpt_io.list_checkpoints(tmp_path / "run")[-1] / "state" / "common.pt", weights_only=False)
    final, steps = common["planned_steps"], sorted(train_records(tmp_path / "run"))
    # the run follows its plan; on a loaded machine it may run 10% over the budget and stop early, saying so
    overran = "went over its train.time_budget 16s by more than 10%" in second.stdout
    assert steps[-1] == final or (overran and steps[-1] < final), second.stdout[-2000:]
    replans = [int(m) for m in re.findall(r"re-planned at step (\d+): ", second.stdout)]
    replanned = bool(replans) and replans[0] == replan_at
    assert replanned or (overran and steps[-1] < replan_at), second.stdout[-3000:]
    assert common["plan_final"] or overran  # no re-plan left once the run ends
    assert common["planned_at"] == (replans[-1] if replans else 8)
    assert length_free_steps(final, cfg.optim) >= (replans[-1] if replans else 0)
    assert not (tmp_path / "run" / ".budget-probe").exists()  # the timed scratch checkpoint is gone
    if not overran:  # a longer budget does not reopen a finished run, and the hint says what does
        longer = [x if x != "16s" else "60s" for x in over if x not in ("--train.stop_at_step", "9")]
        third = run_cli("train", "tiny", *longer)
        assert third.returncode == 0 and f"nothing to train: it is complete at step {final}" in third.stdout
        assert "pass --train.time_budget '' --train.max_steps N" in third.stdout
        # the run's own time, as its last checkpoint saved it (not that plus this command's setup)
        assert f"done earlier: {final} steps, " in third.stdout and \
            f"tokens in {format_duration(common['elapsed'])}; checkpoint" in third.stdout, third.stdout[-500:]
    ref = tmp_path / "ref"
    ref.mkdir()
    ref_over = small_overrides(ref, **{"train.max_steps": final, "optim.warmup_steps": 8, "train.save_every": 20,
                                       "train.eval_every": 20, "optim.schedule": "wsd", "optim.decay_fraction": 0.3})
    train(load_config("tiny", ref_over), quiet=True)
    got, want = train_records(tmp_path / "run"), train_records(ref / "run")
    assert got == {k: v for k, v in want.items() if k <= steps[-1]}  # the same plan: the same loss at every step


def test_a_resumed_process_gets_its_share_of_the_budget_from_when_it_resumes():
    budget = TimeBudget(100.0, text="100s", warmup_steps=30)
    assert not budget.overrun(110.0) and budget.overrun(110.1)  # a fresh run: the budget plus 10%
    budget.resumed(elapsed=105.0, done=300, planned=400)  # over its budget already, a quarter of its steps left
    deadline = 105.0 + 1.1 * 25.0 + 10.0  # their share plus 10%, and 10% of the budget for the final eval and save
    assert not budget.overrun(deadline) and budget.overrun(deadline + 0.1)
    late = TimeBudget(60.0, text="60s", warmup_steps=8)  # resumed again and again: 3 of 273 steps left, 80 s spent
    late.resumed(elapsed=80.0, done=270, planned=273)  # (it got 0.7 s: one to nine steps per command, then a stop)
    assert not late.overrun(80.0 + 6.0) and late.overrun(80.0 + 6.0 + 1.1 * 60 * 3 / 273 + 0.1)
    early = TimeBudget(100.0, text="100s", warmup_steps=30)
    early.resumed(elapsed=20.0, done=300, planned=400)  # well inside: the run's own deadline is the later one
    assert not early.overrun(110.0) and early.overrun(110.1)


def test_a_run_over_its_budget_resumes_to_the_end_of_its_plan(tmp_path):
    """A budgeted run resumed when its clock is already past the budget (here: resumed with a budget its first
    process had used up; the plan saved in the checkpoint stays) trains the rest of its plan, rather than
    stopping after one step at every command."""
    over = small_overrides(tmp_path, **{"train.time_budget": "30s", "optim.warmup_steps": 8, "train.save_every": 100,
                                        "train.eval_every": 100, "train.stop_at_step": 9})  # 30 s: room on a loaded machine
    first = run_cli("train", "tiny", *over)
    assert first.returncode == 0, first.stderr[-3000:]
    common = torch.load(ckpt_io.list_checkpoints(tmp_path / "run")[-1] / "state" / "common.pt", weights_only=False)
    planned, spent = common["planned_steps"], common["elapsed"]
    short = f"{max(spent / 2, 0.5):.1f}s"  # this budget plus 10% is long gone
    resumed = [x for x in over if x not in ("--train.stop_at_step", "9")]
    second = run_cli("train", "tiny", *[short if x == "30s" else x for x in resumed])
    assert second.returncode == 0, second.stderr[-3000:]
    steps = sorted(train_records(tmp_path / "run"))
    # one step at a time before the fix; a loaded machine may still stop it, but only after several
    assert steps[-1] == planned or steps[-1] >= 9 + 3, second.stdout[-2000:]


def test_a_budget_too_short_is_one_line_and_saves_nothing(tmp_path):
    res = run_cli("train", "tiny", *small_overrides(tmp_path, **{"train.time_budget": "0.5s", "optim.warmup_steps": 4,
                                                                  "train.save_every": 100}))
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("kiln: error: train.time_budget 0.5s is too short")
    assert "setting the run up already took" in res.stderr  # before the first eval: no eval, no step was paid for
    assert "Traceback" not in res.stderr
    # the refused run leaves no folder: a later run there is a new run, not "re-logged after resume"
    assert not (tmp_path / "run").exists()


def test_a_warmup_the_budget_cannot_fit_is_refused_early_by_the_run_and_by_dry_run(tmp_path):
    """optim.warmup_steps 100000 in 60 s: --dry-run said the budget fits ~N steps (exit 0), and the run spent the
    whole budget on its timed warmup before it refused. Now --dry-run refuses, and the run does after five steps;
    the folder it made goes although it logged them, so a later run there does not resume their records."""
    over = small_overrides(tmp_path, **{"train.time_budget": "60s", "optim.warmup_steps": 100_000,
                                        "train.save_every": 100})
    dry = run_cli("train", "tiny", *over, "--dry-run")
    assert dry.returncode == 2 and "Traceback" not in dry.stderr, dry.stderr[-2000:]
    assert dry.stderr.strip().splitlines()[-1].startswith("kiln: error: train.time_budget 60s is too short: about ")
    assert "than its warmup (optim.warmup_steps 100000)" in dry.stderr
    assert re.search(r"a step takes [\d.]+ s here, and an eval about [\d.]+ s: the first, one every \d+ steps", dry.stderr)
    res = run_cli("train", "tiny", *over)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(
        "kiln: error: train.time_budget 60s is too short: 5 of the 30 timed warmup steps"), res.stderr
    assert "the warmup's other steps (optim.warmup_steps 100000" in res.stderr
    assert not (tmp_path / "run").exists()


def test_target_loss_stops_at_the_first_eval_that_reaches_it_and_reports_the_cost(tmp_path):
    over = small_overrides(tmp_path, **{"train.max_steps": 60, "train.eval_every": 5, "train.target_loss": 9.0,
                                        "run.cost_per_hour": 3.6, "train.log_every": 7})
    res = run_cli("train", "tiny", *over)
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    evals = [r for r in records if r["kind"] == "eval"]
    first = next(r for r in evals if r["eval_loss"] <= 9.0)
    assert evals[-1] is first and 0 < first["step"] < 60  # stopped right there
    target = [r for r in records if r["kind"] == "target"]
    assert len(target) == 1 and target[0]["step"] == first["step"] and target[0]["value"] == first["eval_loss"]
    assert target[0]["cost_usd"] == pytest.approx(target[0]["elapsed_sec"] / 1000)
    assert f"reached eval_loss {first['eval_loss']:.4f} (target 9) at step {first['step']}" in res.stdout
    assert ckpt_io.list_checkpoints(tmp_path / "run")[-1].name == f"step_{first['step']}"
    summary = run_cli("logs", "summary", str(tmp_path / "run"))
    assert summary.returncode == 0 and "target reached" in summary.stdout
    assert "(stopped at its target)" in summary.stdout and "ETA" not in summary.stdout  # finished, not half-way
    assert json.loads(summary.stdout.strip().splitlines()[-1])["target"]["step"] == first["step"]
    # the step that reached it has its train record, as a run's last step does (log_every 7 did not fall on it)
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == first["step"]
    assert json.loads(summary.stdout.strip().splitlines()[-1])["steps"] == first["step"]
    again = run_cli("train", "tiny", *over, "--train.sample_tokens", "4")  # the same command again: nothing left to do
    assert again.returncode == 0 and f"reached train.target_loss at step {first['step']}" in again.stdout
    assert "sample:" not in again.stdout  # a run with nothing left to train writes no sample
    assert "a lower train.target_loss (or 0: none) trains on" in again.stdout
    # a lower target trains on from the checkpoint (it used to say "nothing to train" whatever the target)
    goal = float(f"{first['eval_loss'] - 1e-4:.6f}")
    lower = run_cli("train", "tiny", *over, "--train.target_loss", str(goal))
    assert lower.returncode == 0, lower.stderr[-3000:]
    later = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval" and r["step"] > first["step"]]
    assert later and ckpt_io.list_checkpoints(tmp_path / "run")[-1].name == f"step_{later[-1]['step']}"
    # the summary speaks of the target the run has now, not of the one reached before it was lowered
    summary = json.loads(run_cli("logs", "summary", str(tmp_path / "run")).stdout.strip().splitlines()[-1])
    now = summary.get("target") or summary["target_not_reached"]
    assert now["target"] == goal and ("target" not in summary or summary["target"]["step"] > first["step"])


def test_a_target_not_reached_is_said_at_the_end_and_in_the_summary(tmp_path):
    over = small_overrides(tmp_path, **{"train.max_steps": 4, "train.eval_every": 2, "train.target_loss": 0.5})
    res = run_cli("train", "tiny", *over)
    assert res.returncode == 0, res.stderr[-3000:]
    final = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"][-1]
    assert f"train.target_loss 0.5 not reached in 4 steps: eval_loss {final['eval_loss']:.4f} at the final eval" \
        in res.stdout
    summary = run_cli("logs", "summary", str(tmp_path / "run"))
    assert summary.returncode == 0 and "target not reached" in summary.stdout
    record = json.loads(summary.stdout.strip().splitlines()[-1])["target_not_reached"]
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert record["target"] == 0.5 and record["best"] == min(evals)


def test_a_target_or_keep_best_metric_no_eval_has_is_one_line_before_anything_is_saved(tmp_path):
    """A task metric whose task is not in train.eval_tasks (or a typo) never stops the run nor keeps a
    checkpoint: the step-0 eval says so, before any step is trained or saved. An accuracy target above 1
    can never be reached: refused with the config."""
    res = run_cli("train", "tiny", *small_overrides(tmp_path, **{"train.max_steps": 6, "train.target_loss": 0.5,
                                                                 "train.target_metric": "eval/arc/acc_norm"}))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(
        "kiln: error: train.target_metric: this run's evals have no 'eval/arc/acc_norm' (they have: eval_loss/toyval, ")
    over = small_overrides(tmp_path, **{"train.max_steps": 6, "train.keep_best": 1,
                                        "train.keep_best_metric": "eval_loss/typo"})
    with pytest.raises(ConfigError, match=r"^train.keep_best_metric: this run's evals have no 'eval_loss/typo'"):
        train(load_config("tiny", over), quiet=True)
    assert ckpt_io.list_checkpoints(tmp_path / "run") == []
    with pytest.raises(ConfigError, match=r"train.target_loss 60 on eval/heldout-next/acc can never be reached"):
        load_config("tiny", ["--train.target_loss", "60", "--train.target_metric", "eval/heldout-next/acc"])


def test_heldout_next_items_are_fixed_and_the_true_sentence_is_one_of_four():
    texts = [" ".join(f"Document {d} says thing number {i} in a longer sentence." for i in range(12))
             for d in range(10)]
    a, b = heldout_next_items(texts, n=20, seed=0), heldout_next_items(texts, n=20, seed=0)
    assert [(x.context, x.choices, x.answer) for x in a] == [(x.context, x.choices, x.answer) for x in b]
    for it in a:
        assert len(it.choices) == 4 and it.delimiter == " "
        doc = it.context.split()[1]
        true = it.choices[it.answer]
        assert true.startswith(f"Document {doc} ")  # the true one continues the context's document
        assert all(not c.startswith(f"Document {doc} ") for j, c in enumerate(it.choices) if j != it.answer)
    assert len(load_tasks(["heldout-next"], limit=50)["heldout-next"]) == 50  # from the bundled held-out split


def test_eval_tasks_score_at_every_eval_and_keep_best_uses_them(tmp_path):
    arc = tmp_path / "arc.jsonl"
    arc.write_text("\n".join(json.dumps({"question": f"What is {i} plus one?", "choices": {
        "text": [str(i + 1), str(i + 5)], "label": ["A", "B"]}, "answerKey": "A"}) for i in range(6)) + "\n")
    over = small_overrides(tmp_path, **{"train.max_steps": 6, "train.eval_every": 3,
                                        "train.eval_tasks": f"heldout-next,{arc}", "train.eval_tasks_limit": 8,
                                        "train.keep_best": 1, "train.keep_best_metric": "eval/heldout-next/acc_norm",
                                        "train.keep_last": 1})
    train(load_config("tiny", over), quiet=True)
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in evals:
        for task in ("heldout-next", "arc"):
            assert 0.0 <= r[f"eval/{task}/acc"] <= 1.0 and 0.0 <= r[f"eval/{task}/acc_norm"] <= 1.0
    meta = [ckpt_io.read_meta(p) for p in ckpt_io.list_checkpoints(tmp_path / "run")]
    assert all(m["best_score"] == -next(r for r in evals if r["step"] == m["step"])["eval/heldout-next/acc_norm"]
               for m in meta if "best_score" in m)
    plot = run_cli("logs", "plot", str(tmp_path / "run"))
    assert plot.returncode == 0, plot.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(tmp_path / "run" / "plots" / "curves.png")[..., :3]  # 2 x 4 panels; [1, 1] is downstream acc_norm
    h, w = img.shape[0] // 2, img.shape[1] // 4
    panel = img[h:, w:2 * w]
    assert ((panel.max(axis=-1) - panel.min(axis=-1)) > 0.3).sum() > 200  # coloured curves of both tasks


def test_an_unknown_eval_task_is_one_line(tmp_path):
    res = run_cli("train", "tiny", *small_overrides(tmp_path, **{"train.max_steps": 2,
                                                                  "train.eval_tasks": "no/such/task.jsonl"}))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(
        "kiln: error: train.eval_tasks: no such task file 'no/such/task.jsonl'")
    assert not (tmp_path / "run").exists()  # checked before the run folder is made


def test_a_run_resumed_during_its_timed_warmup_plans_with_the_evals_cost(tmp_path):
    """A process that resumes before the plan runs no initial eval; the evals' cost comes from the checkpoint,
    so its plan still counts the periodic and final evals (it planned them at 0 s)."""
    over = small_overrides(tmp_path, **{"train.time_budget": "60s", "optim.warmup_steps": 4, "train.save_every": 100,
                                        "train.eval_every": 100, "train.eval_tokens": 4096})
    first = run_cli("train", "tiny", *over, "--train.stop_at_step", "2")
    assert first.returncode == 0 and "ms/step" not in first.stdout, first.stderr[-2000:]  # stopped before the plan
    # the same command would stop there again: the hint says what resumes
    assert "stopped by train.stop_at_step at step 2: saved" in first.stdout
    assert "run it again without train.stop_at_step (or with a later one) to resume" in first.stdout
    second = run_cli("train", "tiny", *over, "--train.stop_at_step", "5")  # planned after step 4
    assert second.returncode == 0, second.stderr[-3000:]
    (evals,) = re.findall(r"fit train\.time_budget 60s \(\d+ ms/step, eval ([0-9.]+) s", second.stdout)
    assert float(evals) > 0, second.stdout[-2000:]


def test_the_progress_lines_show_the_eta_the_logs_record(tmp_path):
    """One ETA: the plain progress lines printed the time since the process started over the steps done (its
    setup and first eval included), while metrics.jsonl and `kiln control list` used the last window's pace."""
    res = run_cli("train", "tiny", *small_overrides(tmp_path, **{"train.max_steps": 9, "train.eval_every": 100}))
    assert res.returncode == 0, res.stderr[-2000:]
    shown = dict(re.findall(r"^step +(\d+)/9 .* eta (\S+)$", res.stdout, flags=re.M))
    logged = {str(r["step"]): format_duration(r["eta_sec"]) for r in read_metrics(tmp_path / "run")
              if r["kind"] == "train"}
    assert shown == logged and len(shown) == 9, (shown, logged)


def test_a_budget_given_on_resume_past_the_timed_warmup_plans_with_the_runs_own_step_time(tmp_path):
    """A run trained without a budget, resumed with one: this process times no warmup step, and the plan took
    0 ms/step (hundreds of steps, then "went over its train.time_budget"). It now plans with the run's average
    so far, and ends within its budget."""
    over = small_overrides(tmp_path, **{"train.max_steps": 8, "optim.warmup_steps": 4})
    train(load_config("tiny", over), quiet=True)
    resumed = [*[x for x in over], "--train.time_budget", "30s"]
    i = resumed.index("--train.max_steps")
    del resumed[i:i + 2]
    res = run_kiln("train", "tiny", *resumed, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"(\d+) steps = [\d,]+ tokens fit train.time_budget 30s \((\d+) ms/step: the run's average over "
                  r"its 9 steps so far", res.stdout)  # planned after its first step here
    assert m and int(m.group(2)) > 0, res.stdout[-3000:]
    assert "went over its train.time_budget" not in res.stdout + res.stderr
    common = torch.load(ckpt_io.list_checkpoints(tmp_path / "run")[-1] / "state" / "common.pt", weights_only=False)
    assert common["planned_steps"] == int(m.group(1)) and common["elapsed"] <= 30 * 1.1
