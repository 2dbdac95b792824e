"""Metric sinks (JSONL, TensorBoard, console) and run metadata.

metrics.jsonl holds one JSON object per line. Train records carry step, tokens_seen, loss, lr,
grad_norm, tokens_per_sec; eval records carry step, eval_loss, eval_ppl (plus per-source keys).
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch


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
            from kiln.train.sinks import wandb_sink

            sink = wandb_sink(cfg, run_dir)
            if sink is not None:
                self._sinks.append(sink)

    def log(self, record: dict[str, Any]) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(record) + "\n")
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
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        for sink in self._sinks:
            sink.close()


class StepMonitor:
    """Per-step bookkeeping for train records: windowed loss and tokens/s, MFU, memory, progress,
    ETA and cost (seed 002's cost tracker), plus the wall-clock save timer."""

    def __init__(self, cfg: Any, layout: Any, plan: Any, *, elapsed_before: float = 0.0) -> None:
        from kiln import perf

        self.cfg, self.layout, self.plan = cfg, layout, plan
        self.t0, self.elapsed_before = time.time(), elapsed_before
        self.last_save = time.time()
        self._window: list[float] = []
        self._t_window = time.time()
        peak = perf.device_peak(layout.device, precision=perf.train_precision(cfg, layout.device))
        self.peak_flops = peak.peak_flops
        self.flops_per_token = perf.flops_per_token(cfg.model, seq_len=cfg.train.seq_len).total

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t0

    def saved(self) -> None:
        self.last_save = time.time()

    def time_to_save(self) -> bool:
        m = self.cfg.train.save_every_minutes
        return m > 0 and time.time() - self.last_save >= 60 * m

    def step(self, step: int, *, loss: float, lr: float, grad_norm: float, tokens_seen: int,
             extras: dict[str, float], spike: bool = False) -> dict[str, Any]:
        """Record this step; returns the train record over the window since the last logged step."""
        from kiln import perf

        self._window.append(loss)
        now = time.time()
        dt = max(now - self._t_window, 1e-9)
        tok_s = len(self._window) * self.plan.tokens_per_step / dt
        remaining = self.plan.total_steps - step
        record: dict[str, Any] = {
            "kind": "train", "step": step, "tokens_seen": tokens_seen, "loss": sum(self._window) / len(self._window),
            "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tok_s, "elapsed_sec": self.elapsed(),
            "progress": step / self.plan.total_steps, "eta_sec": remaining * dt / len(self._window),
        }
        u = perf.mfu(tokens_per_sec=tok_s, flops_per_token=self.flops_per_token, peak_flops=self.peak_flops,
                     n_devices=self.layout.world_size)
        if u is not None:
            record["mfu"] = u
        if self.layout.device.type == "cuda":
            record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.layout.device)
        if self.cfg.run.cost_per_hour > 0:
            usd = self.elapsed() / 3600 * self.cfg.run.cost_per_hour
            record["cost_usd"] = usd
            record["tokens_per_usd"] = tokens_seen / max(usd, 1e-9)
            record["eta_cost_usd"] = record["eta_sec"] / 3600 * self.cfg.run.cost_per_hour
        if spike:
            record["spike"] = True
        record.update(extras)
        if step % self.plan.log_every == 0 or step == self.plan.total_steps:
            self._window, self._t_window = [], now
        return record


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (a torn last line from a crash is skipped)."""
    out = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def git_sha() -> str | None:
    """kiln's commit, with "+dirty" when its checkout has uncommitted changes (kiln.perf.git_describe)."""
    from kiln.perf import git_describe

    return git_describe()


def run_info(device: torch.device) -> dict[str, Any]:
    """Versions, git SHA and device, logged at the start of every run."""
    import datasets
    import tokenizers
    import transformers

    from kiln import __version__

    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kiln": __version__, "git_sha": git_sha(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "datasets": datasets.__version__, "tokenizers": tokenizers.__version__,
        "device": str(device), "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
