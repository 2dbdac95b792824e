"""Shared fixtures. Tests run offline; HF caches point at a per-session temp dir."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from kilnproc import kiln_cmd, run_kiln, start_kiln  # noqa: F401  (the tests' way to run `kiln ARGS`)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing is written to the user's HOME: kiln's caches (converted tokenizers, datasets' Arrow files), its
# job registry and HF's caches live in one temp folder per test session (subprocesses inherit it).
_SCRATCH = tempfile.mkdtemp(prefix="kiln-tests-")
atexit.register(shutil.rmtree, _SCRATCH, True)
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # `make test` runs the suite in parallel workers (pytest-xdist)
for _var, _sub in (("KILN_CACHE", "kiln-cache"), ("KILN_JOBS_DIR", "kiln-jobs"), ("HF_HOME", "hf-home")):
    if _WORKER:  # one scratch per worker: a worker's job registry must not list the other's live runs
        os.environ[_var] = os.path.join(_SCRATCH, _sub)
    else:
        os.environ.setdefault(_var, os.path.join(_SCRATCH, _sub))
if _WORKER:  # the workers share the cores; subprocesses inherit the count (bitwise tests compare like with like)
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

ROOT = Path(__file__).resolve().parents[1]

# torch's inductor builds its C++ kernels with the torch install path unquoted on the g++ command line
# (torch 2.13): under a path with a space the CPU compile fails, outside kiln's control.
needs_inductor_cpu = pytest.mark.skipif(
    " " in str(Path(torch.__file__).parent),
    reason="torch inductor's C++ build cannot handle a space in the torch install path (g++ -L unquoted)")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
