"""Facts about a run and its code: kiln's git commit, library versions and device, durations."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from kiln import __version__


def git_describe(path: str | Path | None = None) -> str | None:
    """The short commit of the checkout holding `path` (default: kiln's own source), with "+dirty" when
    the working tree differs from it (modified, staged or untracked files, as `git status` lists
    them); None outside a git checkout. Benchmarks record it so a number names the code it measured.
    A copy of the tree without .git (a lent GPU machine) takes it from KILN_GIT_SHA when set."""
    fallback = os.environ.get("KILN_GIT_SHA") or None

    cwd = Path(path) if path is not None else Path(__file__).parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=cwd)
        if sha.returncode != 0 or not sha.stdout.strip():
            return fallback
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=30,
                                cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return fallback
    # bench/RESULTS.md is where benchmarks write their numbers: an earlier benchmark's fresh table
    # there does not change the code being measured
    changed = [ln for ln in status.stdout.splitlines() if not ln.endswith("bench/RESULTS.md")]
    dirty = status.returncode != 0 or bool(changed)
    return sha.stdout.strip() + ("+dirty" if dirty else "")


def git_sha() -> str | None:
    """kiln's commit, with "+dirty" when its checkout has uncommitted changes."""
    return git_describe()


def _version(package: str) -> str | None:
    """An installed package's version from its metadata: importing transformers only to read __version__
    cost ~0.5 s at the start of every run, and pretraining never needs it."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_info(device: torch.device) -> dict[str, Any]:
    """Versions, git SHA and device, logged at the start of every run."""
    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kiln": __version__, "git_sha": git_sha(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": _version("transformers"),
        "datasets": _version("datasets"), "tokenizers": _version("tokenizers"),
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
