"""Validation during training, at its own cadence: every `plan.eval_every` steps, plus once at step 0
(the loss at initialisation anchors every curve) and once at the end of the run.

On a plain layout the objective evaluates the model; a pipeline evaluates through its forward-only
schedule (every stage joins), per source. Either way the record is kiln.eval.loss.eval_record's:
eval_loss / eval_ppl per source and token-weighted over all of them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from kiln.config import Config
from kiln.eval.loss import eval_record
from kiln.train.engine import Engine
from kiln.train.metrics import MetricsLogger
from kiln.train.objective import Objective
from kiln.train.progress import Progress
from kiln.train.state import TrainState


class Evaluator:
    """Runs and logs evals; `due(step)` says when a periodic one is."""

    def __init__(self, *, engine: Engine, objective: Objective, val_sets: dict[str, list[Any]], cfg: Config,
                 autocast: contextlib.AbstractContextManager, every: int, total_steps: int,
                 metrics: MetricsLogger | None, progress: Progress) -> None:
        self.engine, self.objective, self.val_sets, self.cfg, self.autocast = engine, objective, val_sets, cfg, autocast
        self.every, self.total_steps, self.metrics, self.progress = every, total_steps, metrics, progress

    def due(self, step: int) -> bool:
        """A periodic eval after `step` (the last step's eval is the run's final one, run at the end)."""
        return step % self.every == 0 and step != self.total_steps

    def run(self, state: TrainState) -> float | None:
        """Evaluate now (every rank), log the record (rank 0), note the loss in `state.evals`; the eval loss,
        or None without validation data."""
        if not self.val_sets:
            return None
        record: dict[str, Any] = {"kind": "eval", "step": state.step, "tokens_seen": state.tokens_seen}
        record.update(self.evaluate())
        state.evals.append(record["eval_loss"])
        if self.metrics is not None:
            self.metrics.log(record)
        parts = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in record.items() if k.startswith("eval_loss/"))
        self.progress.print(f"step {state.step:>6}  eval_loss {record['eval_loss']:.4f}"
                            + (f"  ppl {record['eval_ppl']:.1f}" if "eval_ppl" in record else "")
                            + (f"  ({parts})" if len(self.val_sets) > 1 else ""))
        return record["eval_loss"]

    def evaluate(self) -> dict[str, float]:
        """The objective's eval record; for a pipeline, per-source loss through the schedule."""
        engine = self.engine
        if engine.pipe is None:
            return self.objective.evaluate(engine.model, self.val_sets, cfg=self.cfg, device=engine.layout.device,
                                           autocast=self.autocast)
        return eval_record({name: engine.pipeline_eval(self.val_sets[name]) for name in sorted(self.val_sets)})
