"""Preemption, job control and crash safety on live `kiln train` processes.

The reference is an uninterrupted in-process run of the same config: a run stopped by SIGTERM, by
`kiln control stop`, or killed with SIGKILL at random moments (also during saves) and resumed must
end with bit-identical weights and log the same loss at every step.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import run_kiln, start_kiln
from kiln.config import load_config
from kiln.train import checkpoint as ckpt_io
from kiln.train.metrics import read_metrics
from kiln.train.trainer import train
from test_train import small_overrides

STEPS = 40


def overrides(tmp: Path, **extra: object) -> list[str]:
    return small_overrides(tmp, **{"train.max_steps": STEPS, "train.save_every": 4, "train.eval_every": 1000,
                                   "train.keep_last": 2, **extra})


def last_per_step(run: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs again the steps a crash lost)."""
    out: dict[int, float] = {}
    for r in read_metrics(run):
        if r.get("kind") == "train":
            out[r["step"]] = r["loss"]
    return out


def start(tmp: Path, over: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    # the reference runs in this process: the same thread count keeps CPU reductions bit-identical
    env = {**os.environ, "KILN_JOBS_DIR": str(tmp / "jobs"), "OMP_NUM_THREADS": str(torch.get_num_threads()),
           **(env_extra or {})}
    return start_kiln("train", "tiny", *over, env=env)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()}")
        if max(last_per_step(run), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("ref")
    train(load_config("tiny", overrides(tmp)), quiet=True)
    return last_per_step(tmp / "run"), ckpt_io.read_model_state(tmp / "run")


def assert_same(run: Path, reference) -> None:
    losses, weights = reference
    assert last_per_step(run) == losses
    got = ckpt_io.read_model_state(run)
    assert ckpt_io.list_checkpoints(run)[-1].name == f"step_{STEPS}"
    assert all(torch.equal(got[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_sigterm_saves_and_the_resumed_run_matches(tmp_path, reference):
    over = overrides(tmp_path)
    proc = start(tmp_path, over)
    wait_for_step(tmp_path / "run", 10, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("received SIGTERM: saving at the end of this step (Ctrl-C (SIGINT) to abort without saving)") == 1
    stopped_at = int(ckpt_io.list_checkpoints(tmp_path / "run")[-1].name.split("_")[1])
    assert 10 <= stopped_at < STEPS
    train(load_config("tiny", over), quiet=True)
    assert_same(tmp_path / "run", reference)


@pytest.mark.slow
def test_job_control_save_stop_abort_on_a_live_run(tmp_path, reference):
    over = overrides(tmp_path, **{"train.save_every": 1000})
    env = {"KILN_JOBS_DIR": str(tmp_path / "jobs")}
    proc = start(tmp_path, over)
    run = tmp_path / "run"
    wait_for_step(run, 5, proc)

    def control(*args: str) -> subprocess.CompletedProcess:
        return run_kiln("control", *args, capture_output=True, text=True, timeout=180,
                        env={**os.environ, **env})

    listed = control("list")
    assert listed.returncode == 0 and str(run.resolve()) in listed.stdout.replace("\n", "")
    res = control("save", run.name)  # the run folder's name (its run.name is the preset's, tiny)
    assert res.returncode == 0, res.stderr
    saved = ckpt_io.list_checkpoints(run)
    assert saved, "save made a checkpoint while training goes on"
    assert f"saved {saved[-1]}" in res.stdout and "done at step" in res.stdout  # returns once it is written
    res = control("stop")  # no JOB: the one running job
    assert res.returncode == 0, res.stderr
    assert "stop: sent to " in res.stdout and f"({run.resolve()})" in res.stdout
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # saved, not finished: `kiln train && kiln export` stops here
    assert "stopped by kiln control stop" in out
    stopped = ckpt_io.list_checkpoints(run)[-1]
    assert int(stopped.name.split("_")[1]) < STEPS
    # abort: no new checkpoint, the previous ones stay
    proc = start(tmp_path, over)
    wait_for_step(run, int(stopped.name.split("_")[1]) + 2, proc)
    before = [p.name for p in ckpt_io.list_checkpoints(run)]
    assert control("abort", str(run)).returncode == 0
    proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == before
    assert control("list").stdout.strip() == "no running kiln jobs"
    bad = control("stop", "no-such-job")
    assert bad.returncode == 2 and "no running kiln job matches 'no-such-job'" in bad.stderr
    train(load_config("tiny", over), quiet=True)  # resumes from the stop
    assert_same(run, reference)


@pytest.mark.slow
def test_random_kill_9_also_during_saves_then_resume_is_bitwise(tmp_path, reference):
    over = overrides(tmp_path, **{"train.save_every": 2})
    run = tmp_path / "run"
    rng = random.Random(0)
    kills, in_save = 0, 0
    while kills < 4:
        done = ckpt_io.list_checkpoints(run)
        if done and done[-1].name == f"step_{STEPS}":
            break
        proc = start(tmp_path, over)
        reached = max(last_per_step(run), default=0) if run.exists() else 0
        try:
            wait_for_step(run, min(reached + rng.randint(1, 6), STEPS - 1), proc)
        except AssertionError:
            proc.kill()
            raise
        # land inside a save half the time: wait for a temp checkpoint folder to appear
        if kills % 2 == 0:
            deadline = time.time() + 10
            while time.time() < deadline and not list((run / "checkpoints").glob(".step_*.tmp")):
                time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        in_save += bool(list((run / "checkpoints").glob(".step_*.tmp")))
    assert in_save >= 1, "no kill landed inside a save"
    train(load_config("tiny", over), quiet=True)
    assert_same(run, reference)
    assert not list((run / "checkpoints").glob(".step_*"))  # temp folders from killed saves are gone


WALL_CLOCK = {"tokens_per_sec", "elapsed_sec", "eta_sec", "mfu", "peak_memory_bytes", "cost_usd", "tokens_per_usd",
              "eta_cost_usd"}


def records_per_step(run: Path) -> dict[tuple[str, int], dict]:
    """The last train and eval record of every step, without the wall-clock fields (a resumed run logs
    again the steps that a kill lost)."""
    out = {}
    for r in read_metrics(run):
        out[(r["kind"], r["step"])] = {k: v for k, v in r.items() if k not in WALL_CLOCK}
    return out


@pytest.mark.slow
def test_metrics_after_ten_random_kill_9_equal_the_uninterrupted_runs(tmp_path):
    """A train record is the mean over the steps since the previous one: with log_every 10 and
    save_every 5, a run killed after step 27 resumes at 25 and must still log the mean of 21-30 at
    step 30 (the window of losses is training state, saved in the checkpoint)."""
    extra = {"train.log_every": 10, "train.save_every": 5, "train.eval_every": 15}
    (tmp_path / "ref").mkdir()
    train(load_config("tiny", overrides(tmp_path / "ref", **extra)), quiet=True)
    reference = records_per_step(tmp_path / "ref" / "run")
    assert sorted(s for k, s in reference if k == "train") == [10, 20, 30, 40]
    over = overrides(tmp_path, **extra)
    run = tmp_path / "run"
    rng = random.Random(1)
    kills = 0
    while kills < 10:
        done = ckpt_io.list_checkpoints(run)
        if done and done[-1].name == f"step_{STEPS}":
            break
        proc = start(tmp_path, over)
        saved = int(done[-1].name.split("_")[1]) if done else 0
        try:  # kill between 1 and 9 steps after the checkpoint it resumed from: mid-window, or past a record
            target = min(saved + rng.randint(1, 9), STEPS - 1)
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                state = json.loads((run / "control" / "status.json").read_text()) \
                    if (run / "control" / "status.json").exists() else {}
                if state.get("step", 0) >= target or max(last_per_step(run), default=0) >= target:
                    break
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills += 1
    train(load_config("tiny", over), quiet=True)
    got = records_per_step(run)
    assert got == reference


def test_control_without_a_job_is_a_clear_error(tmp_path):
    env = {**os.environ, "KILN_JOBS_DIR": str(tmp_path / "jobs")}
    res = run_kiln("control", "save", "nothing-here", capture_output=True, text=True, timeout=120,
                   env=env)
    assert res.returncode == 2 and res.stderr.startswith("kiln: error: no running kiln job matches 'nothing-here'")
    res = run_kiln("control", "list", capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and "no running kiln jobs" in res.stdout
    res = run_kiln("control", "save", capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and res.stderr.strip() == "kiln: error: kiln control save: no running kiln jobs"


def test_abort_before_any_checkpoint_says_there_is_none(tmp_path):
    """It said "nothing saved (the last checkpoint stays); run the same command again to resume" of a run that
    had no checkpoint: a rerun starts over."""
    over = overrides(tmp_path, **{"train.save_every": 100_000, "train.max_steps": 100_000})  # still running
    proc = start(tmp_path, over)
    run = tmp_path / "run"
    wait_for_step(run, 2, proc)
    env = {**os.environ, "KILN_JOBS_DIR": str(tmp_path / "jobs")}
    assert run_kiln("control", "abort", str(run), capture_output=True, text=True, timeout=120, env=env).returncode == 0
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "stopped by kiln control abort at step " in out, out[-2000:]
    assert ": nothing saved (no checkpoint yet); run the same command again to start over" in out, out[-2000:]
    assert ckpt_io.list_checkpoints(run) == []


def test_a_second_process_on_a_run_folder_in_use_is_refused(tmp_path):
    """Two `kiln train` on one run folder both trained into it: metrics.jsonl held steps 0-38 then 0-17, and
    `kiln control stop` reached whichever process read the request first. The second is refused, --fresh too
    (it would have moved the live run's folder aside), and the first trains on."""
    over = overrides(tmp_path, **{"train.save_every": 100_000, "train.max_steps": 100_000})  # still running
    proc = start(tmp_path, over)
    run = tmp_path / "run"
    wait_for_step(run, 2, proc)
    env = {**os.environ, "KILN_JOBS_DIR": str(tmp_path / "jobs")}
    job = f"tiny-{proc.pid}"
    for extra in ([], ["--fresh"]):
        res = run_kiln("train", "tiny", *over, *extra, capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [
            f"kiln: error: {run} is in use by kiln job {job} (pid {proc.pid}); `kiln control stop {job}` ends it, "
            "or pass another --run.out_dir"], res.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("run")] == ["run"]
    step = max(last_per_step(run))
    wait_for_step(run, step + 2, proc)  # still training
    assert run_kiln("control", "stop", job, capture_output=True, text=True, timeout=120, env=env).returncode == 0
    proc.communicate(timeout=120)
    steps = [r["step"] for r in read_metrics(run) if r.get("kind") == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one writer


def test_a_signal_during_a_step_saves_at_the_end_of_that_step(tmp_path, monkeypatch, capsys):
    """"saving at the end of this step" ran one more step: the flag was read only before each step. (In-process:
    the signal is sent from inside step 5.)"""
    from kiln.train import trainer

    real = trainer.train_step

    def step_then_signal(run, **kw):
        result = real(run, **kw)
        if run.state.step == 4:  # step 5 is being taken
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    summary = train(load_config("tiny", overrides(tmp_path)), quiet=True)
    assert summary["stopped"] == "signal" and summary["step"] == 5, summary
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "run")][-1] == "step_5"
    assert "received SIGINT: saving at the end of this step" in capsys.readouterr().err
    # kiln logs summary says it stopped (it showed the run half-way with an ETA, as if it were running)
    from kiln.cli import main

    assert main(["logs", "summary", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == {"by": "signal", "last_checkpoint": "step_5"} and "eta_sec" not in summary
    text = " ".join(out.replace("\u2502", " ").split())  # the table's 80 columns wrap the row inside its cell
    assert "by signal; last checkpoint step_5; the same command resumes" in text
    # started with --fresh: "run the same command again" would have moved this run aside and started over
    summary = train(load_config("tiny", overrides(tmp_path)), quiet=True, fresh=True)
    assert summary["stopped"] == "signal" and summary["step"] == 5, summary
    assert "run the same command without --fresh to resume" in capsys.readouterr().out
