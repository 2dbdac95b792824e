"""Staged data mixtures (`data.stages`): the training mix changes at set points of the run.

Mid-training is standard practice: OLMo 2 and SmolLM2 anneal on a higher-quality mix while the
learning rate decays. A stage names where it starts, as a fraction of the run (0 <= start < 1) or a
token count (start >= 1), and its own `train` sources and weights:

    data:
      stages:
        - {name: web, start: 0, train: [{path: web/*.jsonl}]}
        - {name: anneal, start: 0.8, train: [{path: web/*.jsonl, weight: 0.5}, {path: textbooks/, weight: 0.5}]}

The trainer turns the starts into optimizer steps (kiln.train.plan: `Plan.stages`) and the loader
switches at the first micro-batch of a stage's first step, so a stage is exact in steps and tokens.
Each stage reads its sources with its own loader (text or prepared shards, as data.format says),
seeded by the run's seed and the stage's index: a source in two stages is drawn afresh in the second.

State: the current stage, the micro-batches delivered, and the state of every stage that has started
(a stage's loader is built when it starts, and closed when the next one starts). A resumed run
restores the current stage's loader exactly; text stages need the same data-parallel layout, prepared
shards reshard. Each stage's description (name, start, sources) is saved too: a resume refuses a change
to a stage the run has already started, and says so when a stage it has not reached changed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from kiln.config import DataConfig, StageConfig, to_dict
from kiln.data.batchsource import BatchSource
from kiln.errors import DataError

STAGE_SEED = 1_000_003  # stage i's loaders use seed + i x STAGE_SEED


def stage_starts(stages: list[StageConfig], *, total_steps: int, tokens_per_step: int) -> list[int]:
    """Each stage's first optimizer step (0-based: the step that starts it is the first trained on it)."""
    out = []
    for s in stages:
        step = round(s.start * total_steps) if s.start < 1 else math.ceil(s.start / tokens_per_step)
        out.append(min(max(step, 0), total_steps))
    return out


def stage_at(starts: list[int], step: int) -> int:
    """The stage of 0-based optimizer step `step`."""
    return max(i for i, s in enumerate(starts) if s <= step)


def describe(stages: list[StageConfig], starts: list[int], *, tokens_per_step: int) -> list[str]:
    """One printout line per stage: where it starts and what it reads."""
    lines = []
    for i, (s, step) in enumerate(zip(stages, starts)):
        end = starts[i + 1] if i + 1 < len(starts) else None
        span = f"steps {step:,}-{end - 1:,}" if end is not None else f"steps {step:,}-end"
        mix = ", ".join(f"{src.name or src.path} x{src.weight:g}" for src in s.train)
        lines.append(f"data stage {i} {s.name or i}: {span} (from {step * tokens_per_step:,} tokens): {mix}")
    return lines


class StagedLoader(BatchSource):
    """The training batch source for `data.stages`; Stateful (see the module docstring)."""

    reshards = True  # where the current stage's loader does (prepared shards); else one line says why not

    def __init__(self, data: DataConfig, build: Callable[[DataConfig, int], Any]) -> None:
        """`build(data_of_one_stage, seed_offset)` makes one stage's loader (kiln.data.factory)."""
        self.data, self.build = data, build
        self.stages = list(data.stages)
        self.micro_starts: list[int] | None = None  # micro-batches per rank before each stage
        self.stage, self.delivered = 0, 0
        self.states: list[Any] = [None] * len(self.stages)
        self._loader: Any = None

    def set_starts(self, step_starts: list[int], *, accum_steps: int) -> None:
        """The stages' first steps (Plan.stages) and the micro-batches per step on this rank."""
        self.micro_starts = [s * accum_steps for s in step_starts]

    def _stage_data(self, i: int) -> DataConfig:
        return dataclasses.replace(self.data, train=list(self.stages[i].train), stages=[])

    def _enter(self, i: int, state: Any = None) -> None:
        if self._loader is not None:
            self.states[self.stage] = self._loader.state_dict()
            self._loader.close()
        self.stage, self._loader = i, self.build(self._stage_data(i), i * STAGE_SEED)
        if state is not None:
            self._loader.load_state_dict(state)

    def next_batch(self) -> Any:
        if self.micro_starts is None:
            raise AssertionError("StagedLoader.set_starts() was not called")
        target = max(i for i, s in enumerate(self.micro_starts) if s <= self.delivered)
        if self._loader is None or target != self.stage:
            self._enter(target, self.states[target])
        self.delivered += 1
        return self._loader.next_batch()

    def state_dict(self) -> dict[str, Any]:
        states = list(self.states)
        if self._loader is not None:
            states[self.stage] = self._loader.state_dict()
        return {"kind": "stages", "stage": self.stage, "delivered": self.delivered, "states": states,
                "specs": [to_dict(s) for s in self.stages]}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        if isinstance(state, list):
            state = state[0]
        self._restore(state, lambda sub: self._enter(state["stage"], sub))

    def load_resharded_state(self, states: list[dict[str, Any]]) -> None:
        """Every saved rank's state (another data-parallel size): the current stage's loader reshards."""
        first = states[0]
        if {(s["stage"], s["delivered"]) for s in states} != {(first["stage"], first["delivered"])}:
            raise DataError("the saved ranks are at different data stages; resume from another checkpoint")

        def enter(_: Any) -> None:
            self._enter(first["stage"])
            if not self._loader.reshards:  # prepared shards only
                raise DataError("data stage sources are text: their position resumes only on the same "
                                "data-parallel size; resume with the saved layout, or prepare the stages' "
                                "sources (kiln data prepare) and train them with data.format=shards")
            self._loader.load_resharded_state([s["states"][first["stage"]] for s in states])

        self._restore(first, enter)

    def _restore(self, state: dict[str, Any], enter: Callable[[Any], None]) -> None:
        if state.get("kind") != "stages":
            raise DataError("the checkpoint's data position is for data.train, and this run has data.stages; "
                            "resume without data.stages, or pass --fresh")
        saved, now = state["specs"], [to_dict(s) for s in self.stages]
        current = int(state["stage"])
        for i in range(min(current + 1, len(saved))):
            if i >= len(now) or saved[i] != now[i]:
                raise DataError(f"data.stages[{i}] ({saved[i].get('name') or i}) changed after the run started it; a "
                                "started stage must stay as it was: restore it (or pass --fresh), and change only "
                                "stages the run has not reached")
        self.changed_future = [i for i in range(current + 1, max(len(saved), len(now)))
                               if i >= len(saved) or i >= len(now) or saved[i] != now[i]]
        self.delivered = int(state["delivered"])
        self.states = (list(state["states"]) + [None] * len(self.stages))[:len(self.stages)]
        enter(self.states[current])

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()
            self._loader = None
