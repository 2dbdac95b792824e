"""The command line as a user types it: pipes into `head`, `~` in quoted paths, abbreviations and typos, help
that fits 80 columns."""

from __future__ import annotations

import subprocess

from conftest import kiln_cmd
from test_train import small_overrides


def test_training_piped_into_head_goes_on_to_its_checkpoint(tmp_path):
    """`kiln train ... | head -3`: the reader leaves after three lines; the run trains on (its output to
    os.devnull), saves its last checkpoint and exits 0, rather than stopping at the next print with nothing saved."""
    args = ["train", "tiny", *small_overrides(tmp_path), "--train.time_budget", "", "--train.max_steps", "12",
            "--train.log_every", "1", "--train.save_every", "100"]
    proc = subprocess.Popen(kiln_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert all(lines) and "Traceback" not in err, err
    assert (tmp_path / "run" / "checkpoints" / "step_12").is_dir()
    assert '"step": 12' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_usage_into_a_closed_pipe_is_quiet_and_bare_kiln_prints_it_to_stderr():
    """`kiln --help | head -1` and bare `kiln | head -1`: no BrokenPipe traceback. Bare `kiln` is a mistake: the
    usage goes to stderr (exit 2), so `kiln | head` shows nothing on stdout."""
    for args in (["--help"], ["-h"], []):
        proc = subprocess.Popen(kiln_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # before the interpreter has started: its first write meets a closed pipe
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == (2 if not args else 0), err
        assert "Traceback" not in err and "Exception ignored" not in err, err
    res = subprocess.run(kiln_cmd(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == "" and "kiln <command>" in res.stderr
