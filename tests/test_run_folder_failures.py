"""Real failures around a run folder and kiln's cache, through `kiln train` as a user types it: a read-only
mount, a full device, a name at the filesystem's length limit, a `checkpoints` that is a file. Each is one line
naming the path, exit 2, and nothing lost. (Full disks during a checkpoint: tests/test_checkpoint_integrity.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_kiln
from kiln.train.metrics import MetricsLogger
from test_cli import assert_user_error, tree_digest
from test_train import small_overrides


def kiln(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_kiln(*args, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def mount_tmpfs(where: Path, *options: str) -> Path:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=64m", *options]), "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    return where


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield lambda where, *options: made.append(mount_tmpfs(where, *options)) or where
    for m in reversed(made):
        subprocess.run(["umount", "-l", str(m)], check=False)


def test_a_run_folder_on_a_read_only_mount_is_one_line_and_untouched(tmp_path, mounts):
    """A finished run on a mount made read-only (a dataset volume, a snapshot): resuming it, or asking for
    more steps, was a traceback from opening the run folder's lock file."""
    disk = mounts(tmp_path / "disk")
    over = small_overrides(tmp_path, **{"run.out_dir": disk / "run", "train.max_steps": 3})
    assert kiln("train", "tiny", *over, "--quiet").returncode == 0
    before = tree_digest(disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    for steps in ("3", "6"):
        res = kiln("train", "tiny", *over, "--train.max_steps", steps, "--quiet")
        assert_user_error(res, f"run.out_dir {disk / 'run'}: not writable (Read-only file system)")
    assert tree_digest(disk / "run") == before


def test_a_read_only_cache_is_named_with_its_fix(tmp_path, mounts):
    """KILN_CACHE on a read-only mount: the tokenizer Mistral v3 is converted into once cannot be written. A jobs
    registry that cannot be written costs only `kiln control`'s reach: the run trains, and says so."""
    cache = mounts(tmp_path / "cache", "ro")
    over = small_overrides(tmp_path, **{"train.max_steps": 1})
    res = kiln("train", "tiny", *over, "--quiet", env={"KILN_CACHE": str(cache)})
    assert_user_error(res, f"{cache / 'tokenizers'} is not writable (Read-only file system); set KILN_CACHE to a "
                           "writable folder")
    assert not (tmp_path / "run").exists()
    jobs = tmp_path / "jobs"
    jobs.write_text("a file, not a folder")
    res = kiln("train", "tiny", *over, "--quiet", env={"KILN_JOBS_DIR": str(jobs)})
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"note: kiln control will not find this run: {jobs} is not writable" in res.stderr, res.stderr
    assert '"state": "finished"' in (tmp_path / "run" / "control" / "status.json").read_text()


def test_a_full_device_under_the_metrics_file_names_it(tmp_path):
    """A write that fails on a full device names no file; the error line said "a file". metrics.jsonl is here a
    link to /dev/full, where every write fails with ENOSPC as on a full disk."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")
    logger = MetricsLogger(run, tensorboard=False)
    with pytest.raises(OSError) as e:
        logger.log({"step": 1, "loss": 1.0})
    assert e.value.filename == str(run / "metrics.jsonl")
    res = kiln("train", "tiny", *small_overrides(tmp_path, **{"train.max_steps": 2}), "--quiet")
    assert_user_error(res, f"{run / 'metrics.jsonl'}: the disk is full (No space left on device)")


def test_fresh_on_a_name_at_the_length_limit_and_a_checkpoints_file_are_one_line(tmp_path):
    """--fresh moves the run aside as NAME.old-DATE, which a 250-character NAME cannot take; a `checkpoints`
    that is a file was found only at the first save, after every step had trained."""
    long = tmp_path / ("L" * 250)
    long.mkdir()
    (long / "metrics.jsonl").write_text("")
    res = kiln("train", "tiny", *small_overrides(tmp_path, **{"run.out_dir": long, "train.max_steps": 1}), "--fresh")
    assert_user_error(res, f"--fresh: cannot move {long} aside", "(File name too long)", "move or rename it yourself")
    assert (long / "metrics.jsonl").exists()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "checkpoints").write_text("mine")
    res = kiln("train", "tiny", *small_overrides(tmp_path, **{"run.out_dir": odd, "train.max_steps": 1}))
    assert_user_error(res, f"run.out_dir {odd}: its checkpoints is a file, not a folder")
    assert not (odd / "metrics.jsonl").exists() and (odd / "checkpoints").read_text() == "mine"
