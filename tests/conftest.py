"""Shared fixtures. Tests run offline; HF caches point at a per-session temp dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def kiln_cmd(*args: str) -> list[str]:
    """Command line that runs the kiln CLI with this interpreter."""
    return [sys.executable, "-m", "kiln", *args]
