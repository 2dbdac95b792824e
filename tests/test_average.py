"""`kiln average`: uniform and EMA averages of a run's checkpoints, as a checkpoint every command takes."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from conftest import run_kiln
from kiln.config import load_config
from kiln.train import checkpoint as ckpt_io
from kiln.train.trainer import train
from test_train import small_overrides


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_kiln(*args, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("avg")
    train(load_config("tiny", small_overrides(tmp, **{"train.max_steps": 8, "train.save_every": 2,
                                                      "train.keep_last": 0, "optim.schedule": "constant"})), quiet=True)
    return tmp / "run"


def test_uniform_average_of_the_last_three_through_the_cli(run, tmp_path):
    ckpts = ckpt_io.list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step_2", "step_4", "step_6", "step_8"]
    res = run_cli("average", str(run), "--last", "3", "--out", str(tmp_path / "avg"))
    assert res.returncode == 0, res.stderr
    assert "averaged 3 checkpoints (uniform)" in res.stdout
    got = ckpt_io.read_model_state(tmp_path / "avg")
    states = [ckpt_io.read_model_state(c) for c in ckpts[1:]]
    for k in got:
        want = torch.stack([s[k] for s in states]).mean(0)
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7)
    meta = ckpt_io.read_meta(ckpt_io.resolve_checkpoint(tmp_path / "avg"))
    assert meta["step"] == 8 and meta["method"] == "uniform" and len(meta["averaged_from"]) == 3
    assert meta["tokenizer_digest"] == ckpt_io.read_meta(ckpts[-1])["tokenizer_digest"]  # checked at inference
    # a normal checkpoint: generate, eval and export take it
    gen = run_cli("generate", "--checkpoint", str(tmp_path / "avg"), "--prompt", "The", "--max-new-tokens", "4",
                  "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    exp = run_cli("export", "--checkpoint", str(tmp_path / "avg"), "--out", str(tmp_path / "hf"))
    assert exp.returncode == 0, exp.stderr
    # not a run to resume: it was "corrupt or unreadable ... move this one aside", of a good checkpoint
    res = run_cli("train", "tiny", *small_overrides(tmp_path, **{"train.max_steps": 12, "run.out_dir": tmp_path / "avg"}))
    avg_ckpt = ckpt_io.resolve_checkpoint(tmp_path / "avg")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"kiln: error: {avg_ckpt}: a weights-only checkpoint (kiln average / kiln import), with no optimizer or data "
        f"state to resume; start a new run from it: --run.init_from {avg_ckpt} --run.out_dir NEW_DIR"], res.stderr
    assert ckpt_io.list_checkpoints(tmp_path / "avg") == [avg_ckpt]
    # not a training run either: `kiln logs compare RUN AVG` said "not a run folder", of what the docs call one
    res = run_cli("logs", "compare", str(run), str(tmp_path / "avg"), "--out", str(tmp_path / "cmp.png"))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"kiln: error: {tmp_path / 'avg'}: a checkpoint without training metrics (kiln average and kiln import write "
        f"such folders); score it with kiln eval --checkpoint {tmp_path / 'avg'}"], res.stderr


@pytest.mark.parametrize("copied", [False, True])
def test_ema_average_weights_later_checkpoints_more(run, tmp_path, copied):
    """Given in any order, and as copies under other names (sorted by the step in their meta.json: the names
    were parsed as step_<N>, a ValueError traceback for a copy)."""
    ckpts = ckpt_io.list_checkpoints(run)
    given = ckpts[::-1]
    if copied:
        given = [tmp_path / f"copy-{i}" for i in range(len(ckpts))]
        for c, dst in zip(ckpts[::-1], given):
            shutil.copytree(c, dst)
    res = run_cli("average", *map(str, given), "--ema", "0.5", "--out", str(tmp_path / "ema"))
    assert res.returncode == 0, res.stderr
    got = ckpt_io.read_model_state(tmp_path / "ema")
    states = [ckpt_io.read_model_state(c) for c in ckpts]
    weights = [0.5 ** (len(states) - 1 - i) for i in range(len(states))]  # bias-corrected: the newest weighs most
    assert weights == [0.125, 0.25, 0.5, 1.0]
    for k in got:
        want = sum(w * s[k] for w, s in zip(weights, states)) / sum(weights)
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7)


def test_different_architectures_one_checkpoint_or_a_used_folder_are_one_line(run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    train(load_config("tiny", small_overrides(other, **{"train.max_steps": 2, "model.d_model": 64})), quiet=True)
    res = run_cli("average", str(run), str(other / "run"), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "model.d_model is 64 in one and 32 in the other" in res.stderr  # in step order
    assert "Traceback" not in res.stderr and not (tmp_path / "x").exists()
    res = run_cli("average", str(run), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "needs at least two checkpoints" in res.stderr
    res = run_cli("average", str(run), "--last", "2", "--out", str(run))
    assert res.returncode == 2 and "already holds checkpoints" in res.stderr
    inside = ckpt_io.list_checkpoints(run)[-1]
    res = run_cli("average", str(run), "--last", "2", "--out", str(inside))  # the folder rotation would remove
    assert res.returncode == 2 and f"lies inside the checkpoint {inside}" in res.stderr
    assert not (inside / "checkpoints").exists()
    res = run_cli("average", str(run), "--last", "0", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "--last: the number of checkpoints" in res.stderr and "must be at least 1" in res.stderr
    (tmp_path / "afile").write_text("mine")  # it said "cannot write the checkpoint ... Free space ... to resume"
    res = run_cli("average", str(run), "--last", "2", "--out", str(tmp_path / "afile"))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"kiln: error: --out {tmp_path / 'afile'}: a file, not a folder; pass a new --out folder"], res.stderr
    assert (tmp_path / "afile").read_text() == "mine"
    below = tmp_path / "afile" / "avg"  # a folder that cannot be made: it advised freeing space and resuming
    res = run_cli("average", str(run), "--last", "2", "--out", str(below))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"kiln: error: --out {below}: cannot create the folder (Not a directory); pass a writable --out"], res.stderr
    for ema in ("0", "1", "-0.5"):  # --ema 0 was the uniform mean, where D = 0 weighs the newest alone
        res = run_cli("average", str(run), "--last", "2", "--ema", ema, "--out", str(tmp_path / "e"))
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [
            f"kiln: error: --ema: the decay must be within (0, 1), got {ema}; leave --ema out for the uniform mean"]
    assert not (tmp_path / "e").exists()


def test_last_k_beyond_the_run_averages_what_it_has_and_says_so(run, tmp_path):
    """`--last 99` of a run with 4 checkpoints: a younger run than planned is no error, but the average of 4
    is not silently passed off as one of 99."""
    res = run_cli("average", str(run), "--last", "99", "--out", str(tmp_path / "avg"))
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines() == [f"note: --last 99: the run {run} has 4 checkpoints; averaging all 4"]
    assert "averaged 4 checkpoints (uniform)" in res.stdout
