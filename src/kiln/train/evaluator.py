"""Validation during training, at its own cadence: every `plan.eval_every` steps, plus once at step 0
(the loss at initialisation anchors every curve) and once at the end of the run.

On a plain layout the objective evaluates the model; a pipeline evaluates through its forward-only
schedule (every stage joins), per source. Either way the record is kiln.eval.loss.eval_record's:
eval_loss / eval_ppl per source and token-weighted over all of them, plus the downstream tasks of
`train.eval_tasks` (kiln.eval.suite: eval/<task>/acc and acc_norm).

An `Evaluation` also carries the run's two uses of it: `score` (train.keep_best_metric, lower is better)
and whether train.target_loss is reached (on train.target_metric).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from kiln.config import TrainConfig, higher_is_better
from kiln.errors import ConfigError
from kiln.eval.loss import eval_record
from kiln.eval.suite import score_tasks
from kiln.eval.tasks import MCItem
from kiln.train.engine import Engine
from kiln.train.metrics import MetricsLogger
from kiln.train.objective import Objective
from kiln.train.plan import Plan
from kiln.train.progress import Progress
from kiln.train.state import TrainState


@dataclass
class Evaluation:
    """One eval's record, its keep-best score (lower is better) and whether it reached the target."""

    record: dict[str, Any]
    score: float | None
    reached_target: bool
    seconds: float

    @property
    def loss(self) -> float | None:
        return self.record.get("eval_loss")


class Evaluator:
    """Runs and logs evals; `due(step)` says when a periodic one is."""

    def __init__(self, *, engine: Engine, objective: Objective, val_sets: dict[str, list[Any]], train: TrainConfig,
                 autocast: contextlib.AbstractContextManager, plan: Plan, tokenizer: Any,
                 tasks: dict[str, list[MCItem]], metrics: MetricsLogger | None, progress: Progress) -> None:
        self.engine, self.objective, self.val_sets, self.train, self.autocast = engine, objective, val_sets, train, autocast
        self.plan, self.tokenizer, self.tasks, self.metrics, self.progress = plan, tokenizer, tasks, metrics, progress

    @property
    def enabled(self) -> bool:
        return bool(self.val_sets or self.tasks)

    def due(self, step: int) -> bool:
        """A periodic eval after `step` (the last step's eval is the run's final one, run at the end)."""
        return step % self.plan.eval_every == 0 and step != self.plan.total_steps

    def run(self, state: TrainState) -> Evaluation | None:
        """Evaluate now (every rank), log the record (rank 0), note the keep-best score in `state.evals`;
        None without validation data or tasks."""
        if not self.enabled:
            return None
        t0 = time.perf_counter()
        record: dict[str, Any] = {"kind": "eval", "step": state.step, "tokens_seen": state.tokens_seen}
        record.update(self.evaluate())
        t = self.train
        _check_metrics(record, t)
        score = _score(record, t.keep_best_metric)
        if score is not None:
            state.evals.append(score)
        value = record.get(t.target_metric)
        reached = isinstance(value, int | float) and target_met(t, t.target_metric, float(value))
        if self.metrics is not None:
            self.metrics.log(record)
        self.progress.print(_line(record, several=len(self.val_sets) > 1))
        return Evaluation(record=record, score=score, reached_target=reached, seconds=time.perf_counter() - t0)

    def evaluate(self) -> dict[str, float]:
        """The objective's eval record (for a pipeline, per-source loss through the schedule) and the tasks."""
        engine = self.engine
        if engine.pipe is not None:
            return eval_record({name: engine.pipeline_eval(self.val_sets[name]) for name in sorted(self.val_sets)})
        record = self.objective.evaluate(engine.model, self.val_sets, device=engine.layout.device,
                                         autocast=self.autocast) if self.val_sets else {}
        if self.tasks:
            with self.autocast:
                record.update(score_tasks(engine.model, self.tokenizer, self.tasks, max_len=self.train.seq_len,
                                          batch_size=self.train.micro_batch_size))
        return record


def _check_metrics(record: dict[str, Any], t: TrainConfig) -> None:
    """train.target_metric and train.keep_best_metric must name keys this run's eval records have: a typo, or a
    task left out of train.eval_tasks, would otherwise never stop the run nor keep a checkpoint. Checked at the
    step-0 eval of a new run, before anything is trained or saved."""
    for key, metric, used in (("target_metric", t.target_metric, t.target_loss > 0),
                              ("keep_best_metric", t.keep_best_metric, t.keep_best > 0)):
        if used and not isinstance(record.get(metric), int | float):
            have = ", ".join(k for k, v in record.items() if k.startswith("eval") and isinstance(v, int | float))
            raise ConfigError(f"train.{key}: this run's evals have no {metric!r} (they have: {have}); a task's "
                              "metric needs the task in train.eval_tasks")


def target_met(t: TrainConfig, metric: str, value: float) -> bool:
    """Whether `metric` at `value` reaches train.target_loss on train.target_metric (never when it is off)."""
    if t.target_loss <= 0 or metric != t.target_metric:
        return False
    return value >= t.target_loss if higher_is_better(metric) else value <= t.target_loss


def _score(record: dict[str, Any], metric: str) -> float | None:
    """The record's `metric`, negated when higher is better (so lower always wins); None when absent."""
    value = record.get(metric)
    if not isinstance(value, int | float):
        return None
    return -float(value) if higher_is_better(metric) else float(value)


def _line(record: dict[str, Any], *, several: bool) -> str:
    parts = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in record.items() if k.startswith("eval_loss/"))
    tasks = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in record.items()
                     if k.startswith("eval/") and k.endswith("/acc_norm"))
    line = f"step {record['step']:>6}"
    if "eval_reward" in record:  # RLVR: its eval_loss is the negated mean reward, which reads as a loss of -0.0000
        line += f"  eval_reward {record['eval_reward']:.4f}"
    elif "eval_loss" in record:
        line += f"  eval_loss {record['eval_loss']:.4f}" + (f"  ppl {record['eval_ppl']:.1f}" if "eval_ppl" in record
                                                           else "") + (f"  ({parts})" if several else "")
    return line + (f"  acc_norm: {tasks}" if tasks else "")
