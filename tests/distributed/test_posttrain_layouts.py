"""`torchrun -m kiln sft` and `torchrun -m kiln dpo` against the same command in one process.

Post-training shares pretraining's engine, so it runs under the data-parallel layouts: rank r of W
takes conversations (SFT rows, DPO pairs) r, r+W, ... of each global batch, and every micro-batch's
summed loss is divided by the whole step's count. A distributed run must therefore log the
single-process losses (fp32; the sums run in another order, so within 1e-5 relative as in
test_train_layouts.py). DPO's frozen reference is a whole model on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.train.metrics import read_metrics
from test_dpo import pairs_data
from test_sft import addition_chats, base_checkpoint

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def run_kiln(stage: str, nproc: int, ckpt: Path, data: Path, out: Path, *extra: str) -> None:
    launcher = [sys.executable, "-m", "kiln"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "kiln"]
    over = {"run.out_dir": out, "run.device": "cpu", "train.max_steps": STEPS, "train.micro_batch_size": 1,
            "train.global_batch_size": 4, "train.log_every": 1, "train.eval_every": 1000, "train.save_every": 2,
            "optim.lr": 1e-2, "optim.warmup_steps": 0, "optim.schedule": "constant"}
    cmd = [*launcher, stage, "--checkpoint", str(ckpt), "--data", str(data), "--quiet",
           *(x for k, v in over.items() for x in (f"--{k}", str(v))), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]


def train_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if r.get("kind") == "train"}


def assert_close(ref: Path, run: Path, keys: tuple[str, ...]) -> None:
    a, b = train_records(ref), train_records(run)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (sorted(a), sorted(b))
    for step in a:
        for k in keys:
            x, y = a[step][k], b[step][k]
            assert abs(x - y) <= 1e-5 * abs(x) + 1e-7, (k, step, x, y)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("posttrain")
    ckpt = base_checkpoint(tmp)
    chats, pairs = tmp / "chats.jsonl", tmp / "pairs.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in addition_chats(40)))
    pairs.write_text("".join(json.dumps(p) + "\n" for p in pairs_data(40)))
    return ckpt, chats, pairs


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_sft_fsdp_matches_one_process(base, tmp_path):
    ckpt, chats, _ = base
    run_kiln("sft", 1, ckpt, chats, tmp_path / "one")
    run_kiln("sft", 2, ckpt, chats, tmp_path / "fsdp", "--parallel.dp_shard", "2")
    assert_close(tmp_path / "one", tmp_path / "fsdp", ("loss", "grad_norm"))
    # and the 2-rank run resumes in one process from its step-2 checkpoint to the same losses
    resumed = tmp_path / "resumed"
    run_kiln("sft", 2, ckpt, chats, resumed, "--parallel.dp_shard", "2", "--train.stop_at_step", "2")
    run_kiln("sft", 1, ckpt, chats, resumed)
    assert_close(tmp_path / "one", resumed, ("loss",))


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_dpo_ddp_matches_one_process(base, tmp_path):
    ckpt, _, pairs = base
    run_kiln("dpo", 1, ckpt, pairs, tmp_path / "one")
    run_kiln("dpo", 2, ckpt, pairs, tmp_path / "ddp", "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1")
    recs = train_records(tmp_path / "one")
    assert any(k.startswith("dpo") or "margin" in k for k in recs[1]), recs[1].keys()
    keys = ("loss", *(k for k in recs[1] if "margin" in k or "accuracy" in k))
    assert_close(tmp_path / "one", tmp_path / "ddp", keys)
