"""Metric sinks (JSONL, TensorBoard, console) and run metadata.

metrics.jsonl holds one JSON object per line. Train records carry step, tokens_seen, loss, lr,
grad_norm, tokens_per_sec; eval records carry step, eval_loss, eval_ppl (plus per-source keys).
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


class MetricsLogger:
    """Appends records to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            except ImportError:  # tensorboard is a dependency; stay usable without it
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            kind = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, int | float) and v is not None:
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


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
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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
