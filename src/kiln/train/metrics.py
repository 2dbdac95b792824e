"""Metric sinks (JSONL, TensorBoard, console) and run metadata.

metrics.jsonl holds one JSON object per line. Train records carry step, tokens_seen, loss, lr,
grad_norm, tokens_per_sec; eval records carry step, eval_loss, eval_ppl (plus per-source keys).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from kiln.config import ModelConfig
from kiln.device import Precision
from kiln.perf import device_peak, flops_per_token, mfu
from kiln.runinfo import format_duration
from kiln.train.control import JobControl
from kiln.train.plan import Plan
from kiln.train.progress import Progress
from kiln.train.sinks import wandb_sink
from kiln.train.state import TrainState


class MetricsLogger:
    """Appends records to metrics.jsonl and mirrors scalars to TensorBoard (and W&B when configured).

    On resume, a line torn by a crash is closed first (so the next record is not glued to it), and
    TensorBoard events after the resumed step are purged (the steps are about to be logged again).
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, cfg: Any = None, purge_step: int | None = None
                 ) -> None:
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, 2)
                torn = fh.read(1) != b"\n"
            if torn:
                with open(self.path, "a") as fh:
                    fh.write("\n")
        self._fh = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step or None)
            except ImportError:  # tensorboard is a dependency; stay usable without it
                self._tb = None
        self._sinks: list[Any] = []
        if cfg is not None:
            sink = wandb_sink(cfg, run_dir)
            if sink is not None:
                self._sinks.append(sink)

    def log(self, record: dict[str, Any]) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self._fh.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: the write names no file; the error line should
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        if self._tb is not None:
            step = record.get("step", 0)
            kind = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
        for sink in self._sinks:
            sink.log(record)

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._fh.closed:
            return
        try:
            self._fh.close()
        except OSError as e:  # the line a failed write left in the buffer, on a disk that is still full
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        if self._tb is not None:
            self._tb.close()
        for sink in self._sinks:
            sink.close()


class StepLog:
    """Train records at their cadence (every plan.log_every steps and the last): the mean loss over
    the steps since the previous record (TrainState.window, so a resumed run logs what an
    uninterrupted one does), lr, grad norm, tokens/s, MFU, memory, progress, ETA and cost; written to
    the metrics sinks (rank 0), the progress bar and the job-control status.

    Wall-clock fields (tokens_per_sec, eta_sec, elapsed_sec, cost) count only this process's steps.
    tokens_per_sec is the training steps' own throughput (their seconds, as train_step timed them); the ETA
    is the pace of this process's steps so far, evals and checkpoints included, so it says when the run will end
    (a window's pace jumped after each eval: one eval's time counted as every window's)."""

    def __init__(self, plan: Plan, *, device: torch.device, n_devices: int, model: ModelConfig, seq_len: int,
                 precision: Precision, cost_per_hour: float, progress: Progress, metrics: MetricsLogger | None,
                 control: JobControl | None) -> None:
        self.plan, self.device, self.n_devices, self.cost_per_hour = plan, device, n_devices, cost_per_hour
        self.progress, self.metrics, self.control = progress, metrics, control
        self.peak_flops = device_peak(device, precision=precision).peak_flops
        self.flops_per_token = flops_per_token(model, seq_len=seq_len).total
        self._timed, self._t_window = 0, time.time()  # steps of this process since the last record, and when
        self._step_seconds = 0.0  # those steps' own seconds (no evals, no checkpoints)
        self._first: float | None = None  # when this process's first step began
        self._done = 0  # steps of this process

    def due(self, step: int) -> bool:
        return step % self.plan.log_every == 0 or step == self.plan.total_steps

    def step(self, state: TrainState, *, lr: float, grad_norm: float, extras: dict[str, float],
             seconds: float, spike: bool = False) -> None:
        """After `state.advance`: write the record when one is due, else move the progress bar. `seconds`: the
        step's own time (train_step's)."""
        self._timed += 1
        self._step_seconds += seconds
        self._done += 1
        if self._first is None:
            self._first = time.time() - seconds
        if not self.due(state.step):
            self.progress.update(state.step)
            if self._done == 1 and self.control is not None:  # `kiln control list` shows the step before a record
                self.control.status(step=state.step, total_steps=self._total())
            return
        self.write(state, lr=lr, grad_norm=grad_norm, extras=extras, spike=spike)

    def write(self, state: TrainState, *, lr: float, grad_norm: float, extras: dict[str, float],
              spike: bool = False) -> None:
        """The train record of the steps since the last one, now (step() at its cadence; the loop at a step
        that ends the run before the plan's last, such as reaching train.target_loss)."""
        record = self.record(state, lr=lr, grad_norm=grad_norm, extras=extras, spike=spike)
        state.window.clear()
        self._timed, self._t_window, self._step_seconds = 0, time.time(), 0.0
        if self.metrics is not None:
            self.metrics.log(record)
        eta = format_duration(record["eta_sec"]) if record["eta_sec"] is not None else "?"
        self.progress.update(state.step, loss=record["loss"], lr=lr, tok_s=record["tokens_per_sec"], eta=eta)
        if self.control is not None:
            self.control.status(step=state.step, total_steps=self._total(), loss=record["loss"],
                                tokens_per_sec=record["tokens_per_sec"], eta=eta)

    def _total(self) -> int | None:
        """The planned steps, or None while a time budget has not fixed them."""
        return None if self.plan.provisional else self.plan.total_steps

    def _pace(self, window: float) -> float:
        """Wall seconds per step of this process so far (its evals and saves spread over its steps)."""
        if self._first is None or not self._done:
            return window
        return (time.time() - self._first) / self._done

    def record(self, state: TrainState, *, lr: float, grad_norm: float, extras: dict[str, float],
               spike: bool = False) -> dict[str, Any]:
        """The train record of the window ending at `state.step`."""
        dt = max(time.time() - self._t_window, 1e-9)
        timed = max(self._timed, 1)
        tok_s = timed * self.plan.tokens_per_step / max(self._step_seconds, 1e-9)
        elapsed = state.elapsed()
        record: dict[str, Any] = {
            "kind": "train", "step": state.step, "tokens_seen": state.tokens_seen,
            "loss": sum(state.window) / max(len(state.window), 1), "lr": lr, "grad_norm": grad_norm,
            "tokens_per_sec": tok_s, "elapsed_sec": elapsed, "progress": state.step / self.plan.total_steps,
            "eta_sec": (self.plan.total_steps - state.step) * self._pace(dt / timed),
        }
        if self.plan.provisional:  # a time budget not fixed yet: no length to measure progress against
            record["progress"] = record["eta_sec"] = None
        stage = self.plan.stage_of(state.step - 1)  # data.stages: the stage the window's last step read
        if stage is not None:
            record["data_stage"] = stage
        u = mfu(tokens_per_sec=tok_s, flops_per_token=self.flops_per_token, peak_flops=self.peak_flops,
                n_devices=self.n_devices)
        if u is not None:
            record["mfu"] = u
        if self.device.type == "cuda":
            record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.cost_per_hour > 0:
            usd = elapsed / 3600 * self.cost_per_hour
            record["cost_usd"] = usd
            record["tokens_per_usd"] = state.tokens_seen / max(usd, 1e-9)
            if record["eta_sec"] is not None:
                record["eta_cost_usd"] = record["eta_sec"] / 3600 * self.cost_per_hour
        if spike:
            record["spike"] = True
        record.update(extras)
        return record


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl: its JSON objects (a torn last line from a crash, or any line that
    is not an object, is skipped)."""
    out = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
