"""`torchrun -m kiln train` on prepared shards against the single-process run, and resume across layouts.

Prepared shards give every layout the same global batches (a seeded permutation of blocks, each
data-parallel rank taking its positions of each global batch), so a distributed run must log the
single-process losses (within 1e-5 relative, fp32; the sums run in another order, see
test_layouts.py), and a run saved on one layout and resumed on another must continue with the
uninterrupted run's losses and data position. Every run keeps a moving average of its weights
(train.ema_decay), sharded like them; it must end as the single-process run's does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.config import load_config
from kiln.train import checkpoint as ckpt_io
from kiln.train.metrics import read_metrics
from kiln.train.trainer import train
from kilnproc import run_kiln

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
# Through the CLI: one schedule of each kind (one stage per rank; looped, several stages per rank; V-shaped,
# whose eval kiln runs through its own forward-only schedule). tests/distributed/test_layouts.py matches
# every schedule in kiln.parallel.pipeline.SCHEDULES against one process, all in one torchrun.
CLI_SCHEDULES = ("1F1B", "Interleaved1F1B", "DualPipeV")
WORDS = "the of and to in a is that for it as with was on be by at this had not are but from or have".split()


def write_corpus(path: Path, n_docs: int, seed: int) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
            f.write(json.dumps({"text": f"Document {i}. {words}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("shards")
    for name, n, seed in (("train", 300, 0), ("val", 30, 1)):
        src = write_corpus(tmp / f"{name}.jsonl", n, seed)
        res = run_kiln("data", "prepare", "--source", str(src), "--out", str(tmp / name), "--workers", "1", "--quiet",
                       text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    return tmp / "train", tmp / "val"


def overrides(shards: tuple[Path, Path], out: Path, **extra: object) -> list[str]:
    train_dir, val_dir = shards
    # fp32: these compare summation orders at 1e-5; auto would be bf16 on bf16 CPUs (FSDP: bf16 parameters)
    over = {"run.out_dir": str(out), "run.device": "cpu", "train.dtype": "fp32", "model.d_model": 32, "model.n_layers": 4,
            "model.n_heads": 4, "model.n_kv_heads": 2, "model.ffn_dim": 64, "train.seq_len": 32,
            "train.micro_batch_size": 1, "train.global_batch_size": 8, "train.max_steps": STEPS,
            "train.log_every": 1, "train.eval_every": 3, "train.save_every": 3, "train.eval_tokens": 256,
            "train.sample_tokens": 0, "optim.warmup_steps": 2, "optim.lr": 3e-3, "train.ema_decay": 0.5,
            "data.shards": str(train_dir),
            "data.val": json.dumps([{"path": str(val_dir), "name": "val"}]), **extra}
    return [x for k, v in over.items() for x in (f"--{k}", str(v))]


def torchrun(nproc: int, over: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "kiln",
           "train", "tiny", "--quiet", *over]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    assert "Slicing a flattened dim" not in res.stderr  # kiln.parallel.mesh keeps the flattened dp mesh


def records(run: Path, kind: str, key: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in read_metrics(run):
        if r.get("kind") == kind:
            out[r["step"]] = r[key]
    return out


def assert_close(a: dict[int, float], b: dict[int, float], what: str) -> None:
    assert a.keys() == b.keys(), (what, a.keys(), b.keys())
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (what, k, a[k], b[k])


def assert_same_average(a: Path, b: Path, what: str) -> None:
    """The final checkpoints' moving averages of the weights agree: another layout's sums differ by up to ~3e-6
    after the 6 steps, within the tolerance; the average's distance from the weights themselves is ~100x that."""
    want, got = ckpt_io.read_model_state(a, weights="ema"), ckpt_io.read_model_state(b, weights="ema")
    assert want.keys() == got.keys(), what
    weights = ckpt_io.read_model_state(a)
    assert max(float((want[k] - weights[k]).abs().max()) for k in want) > 1e-4, what  # ~1e-3 measured
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    train(load_config("tiny", overrides(shards, out)), quiet=True)
    return out


# 7 eval rows: a pipeline step of 1F1B takes 2, of the looped and V schedules 4; the last step's rows are padded
SHORT_EVAL = {"train.eval_tokens": 7 * 32}


@pytest.fixture(scope="module")
def short_eval_reference(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref-short-eval") / "run"
    train(load_config("tiny", overrides(shards, out, **SHORT_EVAL)), quiet=True)
    return out


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--parallel.dp_shard", "2"], ["--parallel.tp", "2"]], ids=["fsdp", "tp"])
def test_torchrun_kiln_train_matches_one_process(shards, reference, tmp_path, layout):
    torchrun(2, overrides(shards, tmp_path / "run") + layout)
    assert_close(records(reference, "train", "loss"), records(tmp_path / "run", "train", "loss"), "train loss")
    assert_close(records(reference, "eval", "eval_loss"), records(tmp_path / "run", "eval", "eval_loss"), "eval")
    assert_same_average(reference, tmp_path / "run", "average")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("schedule", CLI_SCHEDULES)
def test_pipeline_schedules_train_evaluate_save_and_resume(shards, reference, short_eval_reference, tmp_path,
                                                           schedule):
    """`torchrun -m kiln train --parallel.pp 2 --parallel.pp_schedule S` as a user runs it: the step-0
    and step-3 evals, the step-3 checkpoint, then a resume in one process to the end; losses and eval
    losses equal the single-process run's (the V schedules' own eval() fails in torch 2.13: kiln
    evaluates every schedule through a forward-only schedule of the same stages). The eval rows do not
    fill the last pipeline step: every row still counts (the rows left over were skipped, and an eval set
    smaller than one step scored a loss of 0)."""
    run = tmp_path / "run"
    torchrun(2, overrides(shards, run, **{"train.stop_at_step": 3}, **SHORT_EVAL)
             + ["--parallel.pp", "2", "--parallel.pp_schedule", schedule])
    assert sorted(records(run, "eval", "eval_loss")) == [0, 3]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_3"]
    train(load_config("tiny", overrides(shards, run, **SHORT_EVAL)), quiet=True)  # resumes at step 3 in one process
    assert_close(records(reference, "train", "loss"), records(run, "train", "loss"), f"{schedule} train loss")
    assert_close(records(short_eval_reference, "eval", "eval_loss"), records(run, "eval", "eval_loss"),
                 f"{schedule} eval")
    assert_same_average(reference, run, f"{schedule} average")


@pytest.mark.dist
@pytest.mark.slow
def test_resume_across_layouts(shards, reference, tmp_path):
    """fsdp on 2 ranks -> 1 process; and 1 process -> tp on 2 ranks: the uninterrupted run's losses."""
    a = tmp_path / "a"
    torchrun(2, overrides(shards, a, **{"train.stop_at_step": 3}) + ["--parallel.dp_shard", "2"])
    train(load_config("tiny", overrides(shards, a)), quiet=True)  # resumes at step 3 in one process
    assert_close(records(reference, "train", "loss"), records(a, "train", "loss"), "fsdp -> 1")
    assert_same_average(reference, a, "fsdp -> 1 average")
    b = tmp_path / "b"
    train(load_config("tiny", overrides(shards, b, **{"train.stop_at_step": 3})), quiet=True)
    torchrun(2, overrides(shards, b) + ["--parallel.tp", "2"])
    assert_close(records(reference, "train", "loss"), records(b, "train", "loss"), "1 -> tp")
    assert_same_average(reference, b, "1 -> tp average")


@pytest.mark.dist
@pytest.mark.slow
def test_async_checkpoints_under_fsdp_resume_exactly(shards, reference, tmp_path):
    """train.async_checkpoint on 2 FSDP ranks (DCP writes over its own gloo group in a background
    thread while training's collectives go on): the step-3 checkpoint resumes in one process to the
    uninterrupted run's losses, and no temp folder is left."""
    a = tmp_path / "a"
    torchrun(2, overrides(shards, a, **{"train.stop_at_step": 5, "train.async_checkpoint": True})
             + ["--parallel.dp_shard", "2"])
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step_3", "step_5"]
    import shutil

    shutil.rmtree(a / "checkpoints" / "step_5")  # resume from the one written in the background
    train(load_config("tiny", overrides(shards, a)), quiet=True)
    assert_close(records(reference, "train", "loss"), records(a, "train", "loss"), "async fsdp -> 1")


@pytest.mark.dist
@pytest.mark.slow
def test_a_damaged_checkpoint_under_fsdp_is_set_aside_by_rank_0(shards, reference, tmp_path):
    """Two FSDP ranks each checksum their own shard as they write it; rank 0 lists both in meta.json.
    A resume on two ranks finds step_5 damaged (rank 1's shard truncated): rank 0 alone renames it
    step_5.corrupt, both ranks resume from step_3 and end with the uninterrupted run's losses."""
    from kiln.train import checkpoint as ckpt_io
    from kiln.train import storage

    a = tmp_path / "a"
    fsdp = ["--parallel.dp_shard", "2"]
    torchrun(2, overrides(shards, a, **{"train.stop_at_step": 5}) + fsdp)
    step5 = a / "checkpoints" / "step_5"
    files = ckpt_io.read_meta(step5)["files"]
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "state/rank_0.pt", "state/rank_1.pt"} <= files.keys()
    assert storage.verify(step5) is True and not list(step5.rglob("*.sums.json"))
    shard = step5 / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    torchrun(2, overrides(shards, a) + fsdp)
    assert (a / "checkpoints" / "step_5.corrupt").is_dir()
    assert_close(records(reference, "train", "loss"), records(a, "train", "loss"), "set aside, fsdp -> fsdp")


@pytest.mark.dist
@pytest.mark.slow
def test_a_time_budget_under_torchrun_plans_once_for_every_rank(shards, tmp_path):
    """`torchrun -m kiln train --train.time_budget 25s` on 2 ranks (DDP; the clock counts the start-up): the
    warmup's clock checks, the plan and its re-plans are rank 0's on every rank (a disagreement would hang a
    collective or end the ranks at different steps); the run ends at its planned step with one checkpoint
    holding the plan."""
    import torch

    from kiln.train import checkpoint as ckpt_io

    run = tmp_path / "run"
    torchrun(2, overrides(shards, run, **{"train.max_steps": 0, "train.time_budget": "25s", "optim.warmup_steps": 4,
                                          "optim.schedule": "wsd", "optim.decay_fraction": 0.3,
                                          "train.save_every": 1000, "train.eval_every": 1000})
             + ["--parallel.dp_replicate", "2"])
    common = torch.load(ckpt_io.list_checkpoints(run)[-1] / "state" / "common.pt", weights_only=False)
    steps = sorted(records(run, "train", "loss"))
    assert common["planned_steps"] > 4 and common["plan_final"]
    assert steps[-1] == common["planned_steps"] == common["step"]


@pytest.mark.dist
@pytest.mark.slow
def test_killing_the_launcher_saves_and_the_same_command_resumes(shards, tmp_path):
    """torchrun starts its workers in sessions of their own: a kill -9 of the launcher's process group left them
    training, holding the run folder (a second launch then printed the refusal on rank 0 and a gloo traceback on
    rank 1). The workers now get SIGTERM when the launcher goes, save at the end of the step and exit; a second
    launch while one trains is one line; the same command resumes."""
    import fcntl
    import signal
    import time

    run = tmp_path / "run"
    over = overrides(shards, run, **{"train.max_steps": 100_000, "train.save_every": 100_000,
                                     "train.eval_every": 100_000, "parallel.dp_shard": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kiln", "train",
           "tiny", "--quiet", *over]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while max(records(run, "train", "loss"), default=0) < 3:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        errors = [ln for ln in (second.stdout + second.stderr).splitlines() if "kiln: error:" in ln]
        assert second.returncode != 0 and len(errors) == 1 and " is in use by kiln job " in errors[0], \
            second.stderr[-3000:]
        source = str(ROOT / "src" / "kiln")  # torchrun reports its failed workers; no frame is kiln's (rank 1's)
        assert not [ln for ln in second.stderr.splitlines() if 'File "' in ln and source in ln], second.stderr[-3000:]
        assert "Connection closed by peer" not in second.stderr, second.stderr[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its group; its workers are in sessions of their own
        proc.wait()
        log.close()
    deadline = time.time() + 120
    with open(run / ".kiln-lock") as lock:  # the workers are gone once the run folder's lock is free
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() < deadline, "the workers outlived their launcher"
                time.sleep(0.2)
    last = max(records(run, "train", "loss"))
    assert ckpt_io.list_checkpoints(run)[-1].name == f"step_{last}"  # saved at the step it stopped on
    torchrun(2, [*over, "--train.max_steps", str(last + 2)])
    assert max(records(run, "train", "loss")) == last + 2
