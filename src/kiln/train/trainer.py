"""Training on any layout: `setup` builds the run, `train_step` takes one optimizer step, and the
loop in `fit` reads top to bottom:

    for each optimizer step:
        requests <- job control, signals, the checkpoint clock
        train_step: lr <- schedule(step); forward + backward over the step's micro-batches
                    (loss / the step's global count); clip -> NaN guard -> spike guard -> optimizer step
        divergence guard; log, eval and checkpoint when each is due (each component owns its cadence)

The layout (single process, DDP, FSDP2, TP, PP and their combinations, from torchrun) lives in
kiln.train.engine; the objective (pretraining, SFT, DPO, ...) in kiln.train.objective; everything the
loop counts in kiln.train.state.TrainState, saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from kiln.config import Config, StageConfig, TrainConfig, parse_duration
from kiln.data.batchsource import BatchSource
from kiln.data.mixing import DataExhausted
from kiln.data.stages import StagedLoader, stage_starts
from kiln.data.stages import describe as describe_stages
from kiln.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_digest
from kiln.device import autocast_for, train_precision
from kiln.errors import ConfigError, DataError, KilnError
from kiln.eval.suite import load_tasks
from kiln.generate import generate_text
from kiln.optim import describe_schedule, length_free_steps, lr_factor, param_dtype
from kiln.parallel.mesh import Layout, init_layout, shutdown
from kiln.parallel.pipeline import microbatches
from kiln.paths import saved_dict
from kiln.runinfo import format_duration, run_info
from kiln.train import checkpoint as ckpt_io
from kiln.train.budget import BudgetTooShort, TimeBudget
from kiln.train.control import JobControl, Requests, Stop, lock_run_folder
from kiln.train.engine import Engine
from kiln.train.evaluator import Evaluation, Evaluator, target_met
from kiln.train.metrics import MetricsLogger, StepLog, read_metrics
from kiln.train.mirror import Mirror, mirror_for
from kiln.train.objective import Objective, RunSettings, unseen_smoothing_blocker
from kiln.train.plan import Plan, make_plan
from kiln.train.preflight import (
    check_resumable,
    check_resume_point,
    check_run_folder,
    check_sources,
    check_tokenizer,
    dry_run,
    pin_paths,
    prepare_out_dir,
    reshard_error,
    resume_notes,
    val_note,
)
from kiln.train.progress import Progress, StopOnSignal
from kiln.train.stability import DivergenceDetector, SpikeDetector
from kiln.train.state import TrainState, rng_state, seed_everything, set_rng_state


class DataRanDry(KilnError):
    """A training source ran dry under data.on_exhausted=stop, said on every rank at the same step."""


class TrainingDiverged(KilnError):
    """Loss or gradient norm became NaN/Inf, or the loss diverged; nothing poisoned was saved."""


@dataclass
class Run:
    """One training run's parts, built by `setup`; the loop reads and steps them."""

    cfg: Config
    layout: Layout
    plan: Plan
    engine: Engine
    loader: BatchSource | None  # None on pipeline ranks that read no data
    tokenizer: Tokenizer
    state: TrainState
    evaluator: Evaluator
    checkpointer: ckpt_io.Checkpointer
    log: StepLog
    progress: Progress
    metrics: MetricsLogger | None  # rank 0
    control: JobControl | None  # rank 0
    resumed_from: Path | None
    autocast: contextlib.AbstractContextManager
    budget: TimeBudget | None  # train.time_budget
    pending: dict[str, Any] | None = None  # the job-control request being carried out (acknowledged when done)
    fresh: bool = False  # started with --fresh: the command that resumes it is the same one without it
    last_eval: Evaluation | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.run.out_dir)

    @functools.cached_property
    def tokenizer_digest(self) -> str:
        """Recorded in every checkpoint's meta: inference refuses a tokenizer changed since (check_tokenizer_digest)."""
        return tokenizer_digest(self.tokenizer)

    def lr(self) -> float:
        """The learning rate of the next step (the schedule is a pure function of the step)."""
        p = self.plan
        return p.peak_lr * lr_factor(self.state.step, total_steps=p.total_steps, cfg=self.cfg.optim,
                                     tokens_per_step=p.tokens_per_step)

    def requests(self, signal: StopOnSignal) -> Requests:
        """This rank's requests for the coming step (job control and the clock are read on rank 0)."""
        request = self.control.poll() if self.control is not None else None
        if request:
            self.pending = request
        command = request["command"] if request else None
        return Requests(signal=signal.requested, save=command == "save", stop=command == "stop",
                        abort=command == "abort", clock_save=self.checkpointer.clock_due())

    def evaluate(self) -> Evaluation | None:
        """An eval now; a time budget learns what one costs."""
        evaluation = self.evaluator.run(self.state)
        if evaluation is not None:
            self.last_eval = evaluation
            if self.budget is not None:
                self.budget.eval_done(evaluation.seconds)
                self.state.eval_seconds = self.budget.eval_time  # saved: a resumed process plans with it too
        return evaluation

    def sample_due(self, step: int) -> bool:
        """A periodic sample after `step` (train.sample_every; the run's last step gets the final one)."""
        every = self.cfg.train.sample_every
        return every > 0 and step % every == 0 and step != self.plan.total_steps

    def sample(self, *, final: bool = False) -> str | None:
        """Print a continuation of train.sample_prompt by the model as it is now; None where none is drawn: on
        other ranks, with --quiet or train.sample_tokens 0, and in distributed runs (their model is sharded).
        Its own seeded generator: the training RNG does not move, so a run samples or not to the same losses."""
        t = self.cfg.train
        if not self.layout.is_main or self.progress.quiet or t.sample_tokens <= 0 or self.layout.distributed:
            return None
        model = self.engine.model
        model.eval()
        try:
            text = generate_text(model, self.tokenizer, t.sample_prompt, max_new_tokens=t.sample_tokens,
                                 temperature=0.8, top_k=50, top_p=1.0, seed=self.cfg.run.seed)
        finally:
            if not final:
                model.train()
        if final:
            print(f"\nsample: {t.sample_prompt}{text}\n")
        else:
            self.progress.print(f"sample at step {self.state.step}: {t.sample_prompt}{text}")
        return text

    def save(self, evaluation: Evaluation | None = None, *, wait: bool = False) -> Path:
        """Checkpoint the current state on every rank (a collective when distributed)."""
        return self.checkpointer.save(self.state.step, **self._save_parts(evaluation), wait=wait)

    def _save_parts(self, evaluation: Evaluation | None) -> dict[str, Any]:
        layout, engine, loader = self.layout, self.engine, self.loader
        reader = loader is not None and layout.tp_rank == 0 and (engine.pipe is None or engine.pipe.has_first)
        rank_state = {"rank": layout.rank, "world_size": layout.world_size, "dp_rank": layout.dp_rank,
                      "dp_size": layout.dp_size, "rng": rng_state(), "loader": loader.state_dict() if reader else None,
                      "optim_extra": engine.optimizer.extra_state(), "layout": layout.describe()}
        meta: dict[str, Any] = {"tokens_seen": self.state.tokens_seen, "layout": layout.describe(),
                                "tokenizer_digest": self.tokenizer_digest}
        if evaluation is not None and evaluation.loss is not None:
            meta["eval_loss"] = evaluation.loss
        if evaluation is not None and evaluation.score is not None:
            meta["best_score"] = evaluation.score
        state = ckpt_io.layout_state_dict(engine.parts, engine.optimizer.optims,
                                          tie_embeddings=self.cfg.model.tie_embeddings)
        if engine.ema is not None:  # `kiln average --weights ema` reads it; meta says it is there
            state["ema"], meta["ema_decay"] = engine.ema.state_dict(), engine.ema.decay
        common = {**self.state.state_dict(), "world_size": layout.world_size}
        if engine.ema is not None:
            common["ema_count"] = engine.ema.count
        return {"state": state, "cfg": self.cfg, "common": common, "rank_state": rank_state, "meta": meta}

    def budget_step(self, seconds: float) -> None:
        """train.time_budget: note the step's time; after the timed warmup steps, fix the plan; re-plan it
        where the schedule allows (kiln.train.budget). Its cost estimate for a checkpoint is a real
        one, written to a scratch folder and deleted. Every rank follows rank 0's plan."""
        budget, state, t = self.budget, self.state, self.cfg.train
        assert budget is not None
        budget.step_done(state.step, seconds)
        if not state.planned_steps:  # rank 0's clock and step times: every rank stops together or none does
            refused = None
            try:
                budget.check_not_over(state.elapsed(), done=state.step, warmup_steps=self.cfg.optim.warmup_steps)
            except BudgetTooShort as e:
                refused = str(e)
            if (refused := _agree(refused, self.layout)) is not None:
                raise BudgetTooShort(refused)
        if budget.due(state.step, state.planned_steps):
            self.checkpointer.wait()
            t0 = time.perf_counter()
            ckpt_io.probe_save(self.out / ".budget-probe", state.step, **self._save_parts(None),
                               rank=self.layout.rank, is_main=self.layout.is_main)
            n = budget.fix(self.plan, elapsed=state.elapsed(), done=state.step, save_seconds=time.perf_counter() - t0,
                           save_every_minutes=t.save_every_minutes, warmup_steps=self.cfg.optim.warmup_steps)
            n = _agree(n, self.layout)
        elif budget.replan_due(state.step):
            n = budget.replan(self.plan, elapsed=state.elapsed(), done=state.step, planned=state.planned_steps,
                              save_every_minutes=t.save_every_minutes)
            n = _agree(n, self.layout)
        else:
            return
        changed = n != state.planned_steps
        state.planned_at = state.step
        state.plan_final = budget.schedule_replan(n, after=state.step) == 0
        self._apply_plan(n)
        self.progress.print(f"  {n:,} steps = {self.plan.total_tokens:,} tokens fit {self.plan.budget_source}"
                            + ("" if changed else ": unchanged"))
        for line in _plan_lines(self.cfg, self.plan) if changed else ():  # the schedule, when it is new
            self.progress.print("  " + line)

    def _apply_plan(self, steps: int) -> None:
        """The run's length is now `steps` (a time budget's, fixed once): every component that counts to it."""
        self.state.planned_steps = steps
        self.plan.total_steps, self.plan.total_tokens = steps, steps * self.plan.tokens_per_step
        self.plan.provisional = False
        self.checkpointer.total_steps = steps
        self.progress.set_total(steps)
        if self.cfg.data.stages:  # fractions of the run move with its length, but not a stage begun
            _set_stages(self.plan, self.cfg.data.stages, self.state, self.loader)

    def already_done(self) -> str | None:
        """Why a resumed run has nothing left to train (None: it has)."""
        if self.resumed_from is None:
            return None
        if self.state.target_step:
            return f"it reached train.target_loss at step {self.state.target_step}"  # and still does (setup)
        if self.state.step >= self.plan.total_steps:
            return f"it is complete at step {self.state.step}"
        return None


@dataclass
class StepResult:
    """One optimizer step's global numbers and the requests every rank agreed on."""

    loss: float
    grad_norm: float
    extras: dict[str, float]
    spike: bool
    requests: Requests
    seconds: float  # the step's wall time (forward, backward, reductions, update)


def train(cfg: Config, *, objective: Objective | None = None, fresh: bool = False, quiet: bool = False,
          dry: bool = False, started: float | None = None) -> dict[str, Any]:
    """Run (or resume) training as configured: pretraining by default, or another `objective`
    (SFT, DPO, ...) through the same loop. Returns a summary of the final state. Under torchrun
    every process calls this; the layout comes from `parallel.*`. `started` (a time.time() value,
    default: now) is when this process's share of the run's wall clock began: `kiln train` passes the
    command's start, so a time budget counts the imports, data and model setup too."""
    pin_paths(cfg)  # relative to where the command ran: saved absolute
    if objective is None:  # pretraining reads cfg.data's sources (post-training reads its own)
        check_sources(cfg)
    out = Path(cfg.run.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.out_dir {out}: a file, not a folder; pass --run.out_dir DIR")
    layout = init_layout(cfg.parallel, cfg.model, cfg.run.device)
    new_folder = layout.is_main and not dry and not (out.exists() and any(out.iterdir()))  # nothing of the user's
    try:
        with contextlib.ExitStack() as closing:  # closes what setup opened (data workers, sinks), also on errors
            closing.callback(shutdown, layout)
            plan = make_plan(cfg.model, cfg.train, cfg.optim, dp_size=layout.dp_size,
                             pipeline_microbatches=microbatches(cfg.parallel) if layout.pp > 1 else 1,
                             stages=cfg.data.stages)
            if dry:
                return dry_run(cfg, plan, layout, fresh=fresh) if layout.is_main else {"dry_run": True}
            run = setup(cfg, layout, plan, objective or Objective(), fresh=fresh, quiet=quiet or not layout.is_main,
                        closing=closing, started=time.time() if started is None else started)
            return fit(run)
    except KilnError as e:  # refused (a budget too short, data that does not read, ...) before it saved, and
        if new_folder and not ckpt_io.list_checkpoints(out) and (isinstance(e, BudgetTooShort) or not any(  # before
                r.get("kind") == "train" for r in read_metrics(out))):  # it logged a step (else its metrics may say
            shutil.rmtree(out, ignore_errors=True)  # why): the folder it made goes, and a later run there starts clean
        raise


def exit_code(summary: dict[str, Any]) -> int:
    """The exit code of the command whose run ended with `summary` (train's return): Stop.exit_code."""
    return Stop(summary["stopped"]).exit_code if summary.get("stopped") else 0


def fit(run: Run) -> dict[str, Any]:
    """The training loop: step, guard, log, evaluate, checkpoint, until the plan's last step or a stop."""
    state, plan, checkpointer = run.state, run.plan, run.checkpointer
    if state.step == 0:
        if run.budget is not None:  # a budget the setup used up: said before the first eval, not after it
            run.budget.check_setup(_agree(state.elapsed(), run.layout))
        run.evaluate()  # the loss at initialisation anchors every curve
    done = run.already_done()
    if done is not None:
        if state.target_step:
            more = "a lower train.target_loss (or 0: none) trains on to the run's last step"
        elif run.budget is not None:
            more = ("its train.time_budget fixed these steps, and a new budget does not move them; to train further, "
                    "pass --train.time_budget '' --train.max_steps N")
        else:
            more = "raise train.max_steps / train.total_tokens to train further"
        run.progress.print(f"nothing to train: {done}; {more}, or pass --fresh to start over")
        return finish(run, None, complete=True)
    stopped: Stop | None = None  # why the run ended before its last step
    first, last = state.step, None  # last: the latest step's (lr, result)
    with StopOnSignal() as signal:
        while state.step < plan.total_steps:
            if 0 < run.cfg.train.stop_at_step <= state.step:
                stopped = Stop.AT_STEP
                break
            lr = run.lr()
            try:
                result = train_step(run, lr=lr, requests=run.requests(signal))
            except DataRanDry as e:
                run.progress.print(f"{e} at step {state.step} of {plan.total_steps} (data.on_exhausted=stop): the "
                                   "run ends there, its learning rate schedule unfinished (train.max_steps sets a "
                                   "schedule that ends with the data; data.on_exhausted=cycle repeats it)")
                if state.step == first:  # resumed where it ran dry: already evaluated and saved
                    return finish(run, Stop.DATA_RAN_DRY, complete=True)
                if state.window and last is not None:  # the last steps' train record, as a last step gets one
                    run.log.write(state, lr=last[0], grad_norm=last[1].grad_norm, extras=last[1].extras,
                                  spike=last[1].spike)
                stopped = Stop.DATA_RAN_DRY
                break
            last = (lr, result)
            state.advance(tokens=plan.tokens_per_step, loss=result.loss)
            checkpointer.poll()  # rank 0: a finished background write becomes step_<N>
            if run.cfg.train.divergence_threshold > 0 and state.divergence.update(state.step, result.loss):
                checkpointer.wait()  # complete it first, so a suspect one is set aside with the others
                _diverged(run.out, state.divergence, state.step, run.layout.is_main)
            if run.budget is not None:
                run.budget_step(result.seconds)  # times the warmup, fixes the steps that fit, may re-plan once
            run.log.step(state, lr=lr, grad_norm=result.grad_norm, extras=result.extras, spike=result.spike,
                         seconds=result.seconds)
            evaluation = run.evaluate() if run.evaluator.due(state.step) else None
            if run.sample_due(state.step):
                run.sample()
            if evaluation is not None and evaluation.reached_target:  # before any save: a resumed run knows
                t = run.cfg.train
                state.target_step, state.target_metric = state.step, t.target_metric
                state.target_value = float(evaluation.record[t.target_metric])
                if state.window:  # the run's last step: its train record, as the plan's last step gets one
                    run.log.write(state, lr=lr, grad_norm=result.grad_norm, extras=result.extras, spike=result.spike)
            requests = result.requests
            if signal.requested and not requests.signal and not run.layout.distributed:  # came during this step:
                requests = dataclasses.replace(requests, signal=True)  # one process needs no agreement to act on it
            if requests.abort:
                stopped = Stop.CONTROL_ABORT
                break
            if checkpointer.due(state.step, score=evaluation.score if evaluation else None, scores=state.evals,
                                requests=requests):
                saved = run.save(evaluation, wait=requests.save)  # an acknowledgement names a complete checkpoint
                if requests.save and run.control is not None:
                    run.control.ack(run.pending, step=state.step, checkpoint=str(saved))
            if state.target_step:
                stopped = Stop.TARGET
                break
            if requests.stop or requests.signal:  # saved at the end
                stopped = Stop.CONTROL_STOP if requests.stop else Stop.SIGNAL
                break
            if run.budget is not None and state.planned_steps and run.budget.overrun(state.elapsed()):
                stopped = Stop.BUDGET
                break
    return finish(run, stopped)


def train_step(run: Run, *, lr: float, requests: Requests) -> StepResult:
    """One optimizer step on every rank: forward + backward over the step's micro-batches, clip, the
    NaN and spike guards, the update. The step's one small all-reduce also agrees on `requests`."""
    engine, cfg = run.engine, run.cfg
    t0 = time.perf_counter()
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    micro = _next_micro(run)
    loss_sum, count, extras = engine.forward_backward(micro, run.autocast)
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    norm = float(engine.clip_grad_norm(max_norm))  # the pre-clip norm, global over shards and stages
    loss, extra_means, flags = engine.reduce(loss_sum, count, extras, requests.flags())
    if not (math.isfinite(loss) and math.isfinite(norm)):
        run.checkpointer.wait()  # a save still being written is of a good state: complete it
        last = ckpt_io.list_checkpoints(run.out)
        raise TrainingDiverged(
            f"step {run.state.step + 1}: loss={loss} grad_norm={norm}; the update was not applied and nothing was "
            f"saved (last good checkpoint: {last[-1] if last else 'none'}); lower optim.lr or raise "
            "optim.warmup_steps, then " + ("resume" if last else "run again with --fresh to start over"))
    spike = False
    if cfg.train.spike_z > 0:
        spike, z_loss, z_grad = run.state.spikes.check(loss, norm)
        if spike:
            run.progress.print(f"step {run.state.step + 1}: spike (loss {loss:.4f} z={z_loss:.1f}, grad norm "
                               f"{norm:.3g} z={z_grad:.1f})" + ("; update skipped" if cfg.train.skip_spikes else ""))
    if not (spike and cfg.train.skip_spikes):
        engine.step()
    engine.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, grad_norm=norm, extras=extra_means, spike=spike,
                      requests=Requests.from_flags(flags), seconds=time.perf_counter() - t0)


def setup(cfg: Config, layout: Layout, plan: Plan, objective: Objective, *, fresh: bool, quiet: bool,
          closing: contextlib.ExitStack, started: float) -> Run:
    """Everything the loop needs, resumed from the latest checkpoint in run.out_dir unless `fresh`:
    validated before anything is written, then the model, data, state, sinks and components."""
    device, main, out = layout.device, layout.is_main, Path(cfg.run.out_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_tokenizer(tokenizer, cfg, where="config", main=layout.is_main)
    check_run_folder(out)  # before a mirror's checkpoint is fetched into it
    locked, refused = main and out.is_dir(), None
    if locked:  # a run folder another process trains in is neither resumed, set aside, nor written
        try:
            closing.enter_context(lock_run_folder(out))
        except KilnError as e:
            refused = str(e)
    if (refused := _agree(refused, layout)) is not None:  # every rank stops with rank 0's line
        raise KilnError(refused)
    mirror = mirror_for(cfg.train.checkpoint_url)
    resume_from, init_from = _choose_start(cfg, out, mirror, layout, tokenizer, fresh=fresh)
    if cfg.train.eval_tasks and layout.pp > 1:
        raise ConfigError("train.eval_tasks scores whole sequences on one model; a pipeline (parallel.pp > 1) splits "
                          "it: evaluate the checkpoints with `kiln eval --task mc` instead, or drop train.eval_tasks")
    tasks = load_tasks(cfg.train.eval_tasks, limit=cfg.train.eval_tasks_limit, seed=cfg.run.seed)  # before any write
    if main:
        prepare_out_dir(out, fresh=fresh)
        if not locked or fresh:  # a new folder (or --fresh's, the old one moved aside with its lock)
            closing.enter_context(lock_run_folder(out))
    if layout.distributed:
        dist.barrier()

    seed_everything(cfg.run.seed)
    objective.configure(RunSettings.of(cfg))
    engine = Engine(model=cfg.model, optim=cfg.optim, train=cfg.train, parallel=cfg.parallel, doc_mask=cfg.data.doc_mask,
                    layout=layout, objective=objective, seed=cfg.run.seed, accum_steps=plan.accum_steps)
    if init_from is not None:  # start from another run's weights (fine-tuning, continued pretraining)
        _load_weights(engine, init_from, tie=cfg.model.tie_embeddings, optimizer=False)
    if engine.pipe is None:
        objective.setup(engine.model, device=device)
    loader = objective.train_data(tokenizer, rank=layout.dp_rank, world_size=layout.dp_size) \
        if engine.reads_data else None
    if loader is not None:
        closing.callback(loader.close)
    val_sets = objective.val_data(tokenizer)  # small; every pipeline stage joins the same eval steps
    _check_evals(cfg.train, has_evals=bool(val_sets or tasks))
    state = TrainState(divergence=DivergenceDetector(threshold=cfg.train.divergence_threshold),
                       spikes=SpikeDetector(z_threshold=cfg.train.spike_z or 6.0))
    if resume_from is not None:
        common, ranks = _load_weights(engine, resume_from, tie=cfg.model.tie_embeddings, optimizer=True)
        state.load_state_dict(common)
        _retarget(state, cfg.train)
        _restore_rank_state(ranks, layout, loader, engine, seed=cfg.run.seed, step=state.step)
    if cfg.data.stages:
        moved = _set_stages(plan, cfg.data.stages, state, loader)
        for note in moved if main and resume_from is not None and not plan.provisional else ():
            print(note, file=sys.stderr)
    state.started = started  # this process's wall clock: its setup counts (elapsed_before: earlier processes)

    info = run_info(device)
    metrics = control = None
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(saved_dict(cfg), sort_keys=False))
        (out / "run.json").write_text(json.dumps({**info, "layout": layout.describe()}, indent=2))
        metrics = MetricsLogger(out, cfg=cfg, purge_step=state.step)
        control = JobControl(out, name=cfg.run.name)
        closing.callback(metrics.close)  # also on errors; both closes are idempotent
        closing.callback(control.close, "failed")

    def after_save(path: Path) -> None:  # rank 0, once a checkpoint is complete
        ckpt_io.rotate(out / "checkpoints", keep_last=cfg.train.keep_last, keep_best=cfg.train.keep_best)
        if mirror is not None:
            mirror.upload(path)
            mirror.retain(keep_last=cfg.train.keep_last, keep_best=cfg.train.keep_best)

    t = cfg.train
    checkpointer = ckpt_io.Checkpointer(
        out / "checkpoints", rank=layout.rank, is_main=main, asynchronous=t.async_checkpoint, on_saved=after_save,
        save_every=plan.save_every, save_every_minutes=t.save_every_minutes, keep_best=t.keep_best,
        total_steps=plan.total_steps, saved_at=state.step if resume_from is not None else -1)
    closing.callback(checkpointer.close)  # an error exit still completes a background write
    progress = Progress(None if plan.provisional else plan.total_steps, start=state.step, quiet=quiet)
    log = StepLog(plan, device=device, n_devices=layout.world_size, model=cfg.model, seq_len=t.seq_len,
                  precision=train_precision(t.dtype, param_dtype(cfg.optim), device),
                  cost_per_hour=cfg.run.cost_per_hour, progress=progress, metrics=metrics, control=control)
    autocast = autocast_for(t.dtype, device)
    evaluator = Evaluator(engine=engine, objective=objective, val_sets=val_sets, train=cfg.train, autocast=autocast,
                          plan=plan, tokenizer=tokenizer, tasks=tasks, metrics=metrics, progress=progress)
    # data stages span fractions of the run: a re-plan would move a stage already begun
    length_free = None if cfg.data.stages else functools.partial(length_free_steps, cfg=cfg.optim)
    budget = TimeBudget(parse_duration(t.time_budget), text=t.time_budget, warmup_steps=cfg.optim.warmup_steps,
                        length_free=length_free) if t.time_budget else None
    run = Run(cfg=cfg, layout=layout, plan=plan, engine=engine, loader=loader, tokenizer=tokenizer, state=state,
              evaluator=evaluator, checkpointer=checkpointer, log=log, progress=progress, metrics=metrics,
              control=control, resumed_from=resume_from, autocast=autocast, budget=budget, fresh=fresh)
    if budget is not None:
        _restore_budget(run, budget)
    _announce(run, info, init_from)
    engine.train()
    return run


def _choose_start(cfg: Config, out: Path, mirror: Mirror | None, layout: Layout, tokenizer: Tokenizer, *,
                  fresh: bool) -> tuple[Path | None, Path | None]:
    """(the checkpoint this run resumes, the one whose weights start it), at most one of them, each checked
    against the config before anything is written."""
    resume_from = _agree(_latest_checkpoint(out, mirror, fresh=fresh, main=layout.is_main), layout)  # verified
    if resume_from is not None:
        check_resume_point(resume_from, cfg, tokenizer=tokenizer)
        return resume_from, None
    if not cfg.run.init_from:
        return None, None
    init_from = ckpt_io.resolve_checkpoint(cfg.run.init_from)
    check_resumable(ckpt_io.read_config(init_from), cfg, init_from, tokenizer=tokenizer, init_from=True)
    return None, init_from


def _restore_budget(run: Run, budget: TimeBudget) -> None:
    """A time budget as the run's earlier processes left it: the evals' cost so far, and the steps it fixed
    (with the re-plan still to come, at the same step) once the warmup was timed."""
    state, plan = run.state, run.plan
    budget.eval_time = state.eval_seconds  # a resumed process runs no initial eval: the evals so far say the cost
    if not state.planned_steps:
        return
    run._apply_plan(state.planned_steps)
    if not state.plan_final:  # killed before a re-plan: it comes at the same step
        budget.schedule_replan(state.planned_steps, after=state.planned_at)
    budget.resumed(elapsed=state.elapsed(), done=state.step, planned=state.planned_steps)
    plan.budget_source = f"train.time_budget {run.cfg.train.time_budget} (" + (
        f"planned after step {state.planned_at} of the run, from its timed steps)" if state.planned_at else
        "planned earlier in the run)")


def _check_evals(t: TrainConfig, *, has_evals: bool) -> None:
    """train.target_loss and train.keep_best read the evals: a run without any (a post-training stage without
    --val-data, no train.eval_tasks) would never stop at its target nor keep a checkpoint."""
    used = [k for k, on in (("train.target_loss", t.target_loss > 0), ("train.keep_best", t.keep_best > 0)) if on]
    if used and not has_evals:
        raise ConfigError(f"{used[0]} needs evals, and this run has none: give it validation data (kiln sft / dpo / "
                          "rlvr: --val-data; kiln train: data.val) or train.eval_tasks, or drop it")


def _set_stages(plan: Plan, stages: list[StageConfig], state: TrainState, loader: BatchSource | None) -> list[str]:
    """Place the data stages on the plan's steps, keeping where the run's begun stages began (TrainState saves
    them); a note for each stage that is not where this config alone would put it."""
    plan.set_stages(stages, step=state.step, started=state.stage_starts)
    free = stage_starts(stages, total_steps=plan.total_steps, tokens_per_step=plan.tokens_per_step)
    state.stage_starts = list(plan.stage_starts)
    if isinstance(loader, StagedLoader):
        loader.set_starts(plan.stage_starts, accum_steps=plan.accum_steps)
    return [f"note: data stage {i} ({plan.stage_names[i]}) {'began' if at < state.step else 'begins'} at step {at} "
            f"(data.stages[{i}].start {stages[i].start:g} of {plan.total_steps:,} steps is step {want}): a resumed run "
            "keeps the batches it drew" for i, (at, want) in enumerate(zip(plan.stage_starts, free)) if at != want]


def _retarget(state: TrainState, t: TrainConfig) -> None:
    """A resumed run that reached its train.target_loss trains on when this command's target (or metric) is
    one the reached value does not meet: a lower target, another metric, or none."""
    if not state.target_step:
        return
    met = t.target_loss > 0 if state.target_value is None else target_met(t, state.target_metric, state.target_value)
    if not met:
        state.target_step, state.target_metric, state.target_value = 0, "", None


def _next_micro(run: Run) -> list[Any]:
    """The step's micro-batches on this rank's device. A source that runs dry under data.on_exhausted=stop is
    DataRanDry on every rank at once (one small collective per step, only with that setting under torchrun), so
    every rank ends with the final eval and checkpoint instead of waiting on the others."""
    dry = ""
    try:
        micro = [run.loader.next_batch().to(run.layout.device) for _ in range(run.plan.accum_steps)] \
            if run.loader else []
    except DataExhausted as e:
        micro, dry = [], str(e)
    if run.layout.distributed and run.cfg.data.on_exhausted == "stop":
        said: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(said, dry)
        dry = next((f"rank {r}: {d}" for r, d in enumerate(said) if d), "")
    if dry:
        raise DataRanDry(dry)
    return micro


def finish(run: Run, stop: Stop | None, *, complete: bool = False) -> dict[str, Any]:
    """The end of the run: the final eval and checkpoint (unless aborted, or `complete` already: a
    resumed run with nothing left to train), the summary, a sample. A stop that `finishes` (the target, the
    data running dry) ends the run as its last step does; the target's eval is the final one."""
    state, main, checkpointer = run.state, run.layout.is_main, run.checkpointer
    checkpointer.wait()
    early = stop if stop is not None and not stop.finishes else None  # ended before its end
    final = run.last_eval if stop is Stop.TARGET else None
    if state.step > 0 and early is None and stop is not Stop.TARGET and not complete:
        final = run.evaluate()
    last = ckpt_io.list_checkpoints(run.out)
    path = last[-1] if last and checkpointer.saved_at == state.step else None
    if state.step > 0 and (stop is None or stop.saves) and checkpointer.saved_at != state.step:
        path = run.save(final, wait=True)
    run.progress.close()
    summary: dict[str, Any] = {"step": state.step, "tokens_seen": state.tokens_seen,
                               "final_eval_loss": final.loss if final else None,
                               "stopped": early.value if early else None, "checkpoint": str(path) if path else None,
                               # a resumed run with nothing left: the run's own time, not this command's too
                               "elapsed": format_duration(state.elapsed_before if complete else state.elapsed())}
    if stop is Stop.TARGET:
        summary["target"] = _target_record(run, final)
    if run.control is not None:
        if stop in (Stop.CONTROL_STOP, Stop.CONTROL_ABORT):
            run.control.ack(run.pending, step=state.step, checkpoint=str(path) if path else None)
        run.control.close(str(stop) if stop is not None and stop is not Stop.TARGET else "finished")
    if early is not None:
        if main:
            saved = path is not None or bool(ckpt_io.list_checkpoints(run.out))
            what = f"saved {path}" if path else ("nothing saved (the last checkpoint stays)" if saved else
                                                 "nothing saved (no checkpoint yet)")
            why = (f"the run went over its train.time_budget {run.cfg.train.time_budget} by more than 10%"
                   if early is Stop.BUDGET else f"stopped by {early}")
            again = ("run it again without train.stop_at_step (or with a later one) to resume"
                     if early is Stop.AT_STEP else
                     ("run the same command without --fresh to resume" if run.fresh else
                      "run the same command again to resume") if saved else "run the same command again to start over")
            print(f"{why} at step {state.step}: {what}; {again}")
        return summary
    cfg = run.cfg
    if not complete:
        text = run.sample(final=True)
        if text is not None:
            summary["sample"] = text
    if main:
        if stop is Stop.TARGET:
            tr = summary["target"]
            print(f"reached {tr['metric']} {tr['value']:.4f} (target {tr['target']:g}) at step {state.step}: "
                  f"{format_duration(tr['elapsed_sec'])}, {state.tokens_seen:,} tokens"  # as the done line writes time
                  + (f", ${tr['cost_usd']:.2f}" if "cost_usd" in tr else ""))
        elif cfg.train.target_loss > 0 and not complete:
            t = cfg.train
            value = final.record.get(t.target_metric) if final is not None else None
            last = f": {t.target_metric} {value:.4f} at the final eval" if isinstance(value, int | float) else ""
            print(f"train.target_loss {t.target_loss:g} not reached in {state.step} steps{last}")
        done = "done earlier" if complete else "done"  # a resumed run with nothing left: the run's time, not now
        print(f"{done}: {state.step} steps, {state.tokens_seen:,} tokens in {summary['elapsed']}; checkpoint {path}")
    return summary


def _target_record(run: Run, evaluation: Evaluation | None) -> dict[str, Any]:
    """What reaching train.target_loss cost: logged as a "target" record and returned in the summary."""
    t, state, elapsed = run.cfg.train, run.state, run.state.elapsed()
    record: dict[str, Any] = {"kind": "target", "step": state.step, "tokens_seen": state.tokens_seen,
                              "metric": t.target_metric, "target": t.target_loss,
                              "value": evaluation.record.get(t.target_metric) if evaluation else None,
                              "elapsed_sec": elapsed}
    if run.cfg.run.cost_per_hour > 0:
        record["cost_usd"] = elapsed / 3600 * run.cfg.run.cost_per_hour
    if run.metrics is not None:
        run.metrics.log(record)
    return record


# ---- setup helpers ------------------------------------------------------------------------------


def _latest_checkpoint(out: Path, mirror: Mirror | None, *, fresh: bool, main: bool) -> Path | None:
    """The checkpoint to resume from (rank 0's view): the newest intact one in out (damaged newer ones are set
    aside as step_N.corrupt), else the mirror's on a fresh disk."""
    if fresh:
        return None
    if not main:
        return None  # rank 0 decides (and sets damaged checkpoints aside); the choice is broadcast
    existing = ckpt_io.list_checkpoints(out)
    if not existing and mirror is not None:
        downloaded = mirror.download_latest(out / "checkpoints")
        existing = [downloaded] if downloaded is not None else []
    return ckpt_io.latest_intact(out, is_main=main) if existing else None


def _load_weights(engine: Engine, ckpt: Path, *, tie: bool, optimizer: bool
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load a checkpoint's weights (and optimizer state) into the engine's parts on any layout. A resumed run
    (`optimizer`) also resumes the weights' moving average where the checkpoint has one; otherwise the average
    starts at the loaded weights."""
    state = ckpt_io.layout_state_dict(engine.parts, engine.optimizer.optims, tie_embeddings=tie, optimizer=optimizer)
    resume_ema = engine.ema is not None and optimizer and ckpt_io.holds_average(ckpt)
    if resume_ema:
        state["ema"] = engine.ema.state_dict()  # loaded in place
    common, ranks = ckpt_io.load_training(ckpt, state=state)
    ckpt_io.load_layout_state_dict(engine.parts, engine.optimizer.optims, state, tie_embeddings=tie,
                                   optimizer=optimizer)
    if engine.ema is not None and not resume_ema:
        engine.ema.reset()
    elif resume_ema:  # checkpoints from before the count: the plain moving average they kept
        engine.ema.count = int(common.get("ema_count", 1 << 40))
    return common, ranks


def _agree(value: Any, layout: Layout) -> Any:
    """Rank 0's value on every rank (decisions that read the file system or the clock)."""
    if not layout.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _announce(run: Run, info: dict[str, Any], init_from: Path | None) -> None:
    cfg, plan, p = run.cfg, run.plan, run.progress
    p.print(f"kiln train {cfg.run.name}: {plan.n_params / 1e6:.2f}M parameters on {run.layout.device} "
            f"({run.layout.describe()}; torch {info['torch']}, git {info['git_sha']})")
    length = (f"the steps that fit {plan.budget_source.replace(' (fixed after the warmup)', '')}, fixed after "
              f"timing the first {run.budget.measure_until} steps" if plan.provisional and run.budget is not None
              else f"{plan.total_steps:,} steps = {plan.total_tokens:,} tokens from {plan.budget_source}")
    p.print(f"  {plan.tokens_per_step:,} tokens/step (global batch {cfg.train.global_batch_size} x "
            f"{cfg.train.seq_len}, {plan.accum_steps} micro-batch{'es' if plan.accum_steps > 1 else ''} per rank), "
            f"{length}")
    if not plan.provisional:  # a time budget's schedule is printed once its length is fixed
        for line in _plan_lines(cfg, plan):
            p.print("  " + line)
    if cfg.train.unseen_smoothing and (blocker := unseen_smoothing_blocker(cfg)):
        p.print(f"  train.unseen_smoothing {cfg.train.unseen_smoothing:g} does nothing here: {blocker}")
    changed = run.loader.changed_future if run.loader is not None else ()
    if changed:
        p.print(f"  data.stages {', '.join(str(i) for i in changed)} changed since the last checkpoint; the run has "
                "not reached them: the new definition applies")
    p.print(f"  run folder {run.out}" + (f"; resumed from {run.resumed_from.name}" if run.resumed_from else "")
            + (f"; weights from {init_from}" if init_from else ""))
    resumed = run.resumed_from is not None and run.already_done() is None  # else "nothing to train" says it all
    if note := val_note(cfg):  # part of the banner, as the dry run prints it
        p.print(f"  {note}")
    notes = resume_notes(ckpt_io.read_config(run.resumed_from), cfg, run.resumed_from) if resumed else []
    for note in notes if run.layout.is_main else ():  # once the checkpoint has loaded: a refused resume stays one line
        print(note, file=sys.stderr)


def _plan_lines(cfg: Config, plan: Plan) -> list[str]:
    """The LR schedule and the data stages of a fixed plan, a line each."""
    return [*describe_schedule(plan.total_steps, cfg.optim, plan.tokens_per_step, peak_lr=plan.peak_lr),
            *describe_stages(cfg.data.stages, plan.stage_starts, tokens_per_step=plan.tokens_per_step)]


def _restore_rank_state(ranks: list[dict[str, Any]], layout: Layout, loader: BatchSource | None, engine: Engine, *,
                        seed: int, step: int) -> None:
    """RNG and data position for this rank from the saved rank states (any earlier layout)."""
    mine = next((r for r in ranks if r.get("rank") == layout.rank and r.get("layout") == layout.describe()), None)
    if mine is not None and mine.get("rng") is not None:
        set_rng_state(mine["rng"])
        engine.optimizer.load_extra_state(mine.get("optim_extra") or [])
    else:  # another layout: a fresh, deterministic stream per rank
        torch.manual_seed(seed + 7919 * step + layout.rank)
    if loader is None:
        return
    saved = {r["dp_rank"]: r["loader"] for r in ranks if r.get("loader") is not None}
    if not saved:
        return  # a weights-only checkpoint
    if not isinstance(loader, StagedLoader) and any(isinstance(s, dict) and s.get("kind") == "stages"
                                                     for s in saved.values()):
        raise DataError("the checkpoint's data position is for data.stages, and this run has none; resume with "
                        "the same data.stages, or pass --fresh")
    old_dp = ranks[0].get("dp_size", 1) if ranks else 1
    if old_dp == layout.dp_size:
        loader.load_state_dict(saved[layout.dp_rank])
        return
    if not loader.reshards:
        raise reshard_error(old_dp, layout.dp_size)
    loader.load_resharded_state([saved[i] for i in sorted(saved)])


def _diverged(out: Path, detector: DivergenceDetector, step: int, main: bool) -> None:
    """Set aside checkpoints written since the excursion began, then abort with the last good one named."""
    onset = detector.onset if detector.onset is not None else step
    # step_N holds the weights after update N, whose loss is first seen at step N + 1: the update that
    # produced the onset's loss is onset - 1, so that checkpoint and later ones are suspect
    suspect = [p for p in ckpt_io.list_checkpoints(out) if ckpt_io.checkpoint_step(p) >= onset - 1]
    if main:
        for p in suspect:
            p.rename(p.with_name(p.name + ".suspect"))
    good = [p for p in ckpt_io.list_checkpoints(out) if p not in suspect]
    raise TrainingDiverged(
        f"step {step}: the loss diverged (fast EMA {detector.fast:.3f} > slow EMA {detector.slow:.3f} + "
        f"{detector.threshold:g}, rising since step {onset}); stopped without saving"
        + (f", set aside {len(suspect)} checkpoint(s) as *.suspect" if suspect else "")
        + (f"; last good checkpoint: {good[-1]}. Lower optim.lr (or raise optim.warmup_steps) and run again to "
           "resume from it" if good else "; no good checkpoint. Lower optim.lr (or raise optim.warmup_steps) and "
           "run again with --fresh to start over"))

