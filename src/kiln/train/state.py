"""What the training loop counts, as one Stateful record saved in every checkpoint.

`TrainState` holds the counters, the eval history (keep_best), the stability detectors and the log
window (the losses of the steps since the last train record), so a resumed run logs the same records
as an uninterrupted one. The random number generators are per rank (`rng_state`), saved beside it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kiln.train.stability import DivergenceDetector, SpikeDetector


@dataclass
class TrainState:
    """Counters and detectors of one run. `elapsed()` is wall time across every process of the run."""

    divergence: DivergenceDetector
    spikes: SpikeDetector
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    evals: list[float] = field(default_factory=list)  # keep-best scores of the evals so far, the latest last
    planned_steps: int = 0  # train.time_budget: the steps fixed after the warmup (0: not fixed yet)
    planned_at: int = 0  # train.time_budget: the step after which planned_steps was (re-)planned
    plan_final: bool = False  # train.time_budget: planned_steps will not be re-planned (kiln.train.budget)
    eval_seconds: float = 0.0  # train.time_budget: the longest eval so far (a process resumed before the plan uses it)
    stage_starts: list[int] = field(default_factory=list)  # data.stages: the first steps the run follows
    target_step: int = 0  # train.target_loss: the step that reached it (0: not reached)
    target_metric: str = ""  # the metric that reached it, and its value there (a resumed run with a new target
    target_value: float | None = None  # trains on; None: a checkpoint from before they were saved)
    window: list[float] = field(default_factory=list)  # losses of the steps since the last train record
    elapsed_before: float = 0.0  # wall seconds of the earlier processes of a resumed run
    started: float = field(default_factory=time.time)  # this process's start

    def advance(self, *, tokens: int, loss: float) -> None:
        """One optimizer step was taken on `tokens` tokens with this (global mean) loss."""
        self.step += 1
        self.tokens_seen += tokens
        self.window.append(loss)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed(),
                "best_evals": list(self.evals), "window": list(self.window), "planned_steps": self.planned_steps,
                "planned_at": self.planned_at, "plan_final": self.plan_final, "eval_seconds": self.eval_seconds,
                "target_step": self.target_step, "stage_starts": list(self.stage_starts),
                "target_metric": self.target_metric, "target_value": self.target_value,
                "divergence": self.divergence.state_dict(), "spikes": self.spikes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed_before, self.started = float(state.get("elapsed", 0.0)), time.time()
        self.evals = list(state.get("best_evals", []))
        self.window = list(state.get("window", []))  # absent in checkpoints written before it was saved
        self.planned_steps, self.target_step = int(state.get("planned_steps", 0)), int(state.get("target_step", 0))
        self.target_metric, self.target_value = str(state.get("target_metric", "")), state.get("target_value")
        self.plan_final = bool(state.get("plan_final", True))  # checkpoints from before the re-plan: never re-planned
        self.planned_at = int(state.get("planned_at", 0))  # before re-plans were repeated: 0, the warmup's plan
        self.eval_seconds = float(state.get("eval_seconds", 0.0))
        self.stage_starts = [int(s) for s in state.get("stage_starts", [])]  # before 2026-12-07: not saved
        self.divergence.load_state_dict(state["divergence"])
        self.spikes.load_state_dict(state["spikes"])


def rng_state() -> dict[str, Any]:
    """This process's random number generators (python, numpy, torch, CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
