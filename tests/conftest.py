"""Shared fixtures. Tests run offline; HF caches point at a per-session temp dir."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing is written to the user's HOME: kiln's caches (converted tokenizers, datasets' Arrow files), its
# job registry and HF's caches live in one temp folder per test session (subprocesses inherit it).
_SCRATCH = tempfile.mkdtemp(prefix="kiln-tests-")
atexit.register(shutil.rmtree, _SCRATCH, True)
for _var, _sub in (("KILN_CACHE", "kiln-cache"), ("KILN_JOBS_DIR", "kiln-jobs"), ("HF_HOME", "hf-home")):
    os.environ.setdefault(_var, os.path.join(_SCRATCH, _sub))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def kiln_cmd(*args: str) -> list[str]:
    """Command line that runs the kiln CLI with this interpreter."""
    return [sys.executable, "-m", "kiln", *args]
