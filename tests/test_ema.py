"""train.ema_decay: the weights' moving average kept during training, saved, resumed, and made a checkpoint
by `kiln average --weights ema`."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import run_kiln
from kiln.config import load_config
from kiln.model import build_model
from kiln.train import checkpoint as ckpt_io
from kiln.train.ema import WeightEMA
from kiln.train.trainer import train
from test_train import small_overrides

DECAY = 0.8


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_kiln(*args, capture_output=True, text=True, timeout=600)


def ramp(n: int, decay: float = DECAY) -> float:
    """The decay of the update that takes in the (n+1)-th weights: the mean of the weights so far until the
    average holds about 1 / (1 - decay) of them (kiln.train.ema)."""
    return min(decay, n / (n + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_average_is_the_mean_then_moves_toward_new_weights_geometrically(dtype):
    cfg = load_config("tiny", ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
                               "--model.n_kv_heads", "1", "--model.ffn_dim", "64", "--model.vocab_size", "64"]).model
    model = build_model(cfg, seed=0).to(dtype)
    ema = WeightEMA([model], decay=0.9, tie_embeddings=cfg.tie_embeddings)
    w0 = {k: v.float().clone() for k, v in model.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())  # fp32 even for bf16 weights
    with torch.no_grad():
        for p in model.parameters():  # the weights jump once and stay
            p.add_(1.0)
    w1 = {k: v.float() for k, v in model.state_dict().items()}
    ema.update()  # a fresh average: the initialisation is no part of it
    for k, avg in ema.state_dict().items():
        torch.testing.assert_close(avg, w1[k], rtol=0, atol=0)
    with torch.no_grad():
        for p, w in zip(model.parameters(), w0.values(), strict=True):
            p.copy_(w)
    ema.reset()  # loaded weights count once: w0, then w1 twenty times
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(20):
        ema.update()
    keep = 1.0  # w0's share: 1/2 x 2/3 x ... while the ramp is below 0.9, then 0.9 per step
    for n in range(1, 21):
        keep *= ramp(n, 0.9)
    assert keep == pytest.approx(0.1 * 0.9**11)  # the mean of 10 weights after 9 updates, then 11 geometric steps
    for k, avg in ema.state_dict().items():
        torch.testing.assert_close(avg, w1[k] + keep * (w0[k] - w1[k]), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 uninterrupted steps with the average, a checkpoint after each step."""
    tmp = tmp_path_factory.mktemp("ema-ref")
    train(load_config("tiny", small_overrides(tmp, **{"train.max_steps": 8, "train.save_every": 1,
                                                      "train.keep_last": 0, "train.ema_decay": DECAY})), quiet=True)
    return tmp / "run"


def test_each_step_takes_the_new_weights_into_the_average(reference):
    ckpts = ckpt_io.list_checkpoints(reference)
    assert [c.name for c in ckpts] == [f"step_{i}" for i in range(1, 9)]
    assert ckpt_io.read_meta(ckpts[-1])["ema_decay"] == DECAY
    first, w1 = ckpt_io.read_model_state(ckpts[0], weights="ema"), ckpt_io.read_model_state(ckpts[0])
    assert all(torch.equal(first[k], w1[k]) for k in w1)  # step 1's weights replace the initialisation
    for n, (before, after) in enumerate(zip(ckpts, ckpts[1:]), start=1):
        prev, new = ckpt_io.read_model_state(before, weights="ema"), ckpt_io.read_model_state(after, weights="ema")
        w, d = ckpt_io.read_model_state(after), ramp(n)
        for k in w:
            torch.testing.assert_close(new[k], d * prev[k] + (1 - d) * w[k], rtol=1e-5, atol=1e-6)
    # the average lags the weights: it is not a copy of them
    last_w, last_avg = ckpt_io.read_model_state(ckpts[-1]), ckpt_io.read_model_state(ckpts[-1], weights="ema")
    assert any(not torch.allclose(last_w[k], last_avg[k]) for k in last_w)


def test_a_run_stopped_and_resumed_on_the_command_line_keeps_the_same_average(reference, tmp_path):
    over = small_overrides(tmp_path, **{"train.max_steps": 8, "train.save_every": 1, "train.keep_last": 0,
                                        "train.ema_decay": DECAY})
    first = run_cli("train", "tiny", *over, "--train.stop_at_step", "4")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli("train", "tiny", *over)
    assert second.returncode == 0, second.stderr[-2000:]
    run = tmp_path / "run"
    want, got = ckpt_io.read_model_state(reference, weights="ema"), ckpt_io.read_model_state(run, weights="ema")
    assert all(torch.equal(got[k], want[k]) for k in want)

    # the average as a checkpoint of its own, which eval and export take
    res = run_cli("average", str(run), "--weights", "ema", "--out", str(tmp_path / "avg"))
    assert res.returncode == 0, res.stderr
    assert "wrote the moving average of" in res.stdout
    avg = ckpt_io.read_model_state(tmp_path / "avg")
    assert all(torch.equal(avg[k], want[k]) for k in want)
    assert ckpt_io.read_meta(ckpt_io.resolve_checkpoint(tmp_path / "avg"))["weights"] == "ema"
    ev = run_cli("eval", "--checkpoint", str(tmp_path / "avg"), "--data", str(tmp_path / "val.jsonl"))
    assert ev.returncode == 0, ev.stderr
    assert '"bits_per_byte"' in ev.stdout


def test_a_run_started_from_another_averages_from_its_weights(reference, tmp_path):
    """--run.init_from: the average starts at the loaded weights, not at the random initialisation."""
    start = ckpt_io.list_checkpoints(reference)[-1]
    train(load_config("tiny", small_overrides(tmp_path, **{"train.max_steps": 1, "train.ema_decay": DECAY,
                                                           "run.init_from": str(start)})), quiet=True)
    w0, w1 = ckpt_io.read_model_state(start), ckpt_io.read_model_state(tmp_path / "run")
    got = ckpt_io.read_model_state(tmp_path / "run", weights="ema")
    for k in w0:  # the loaded weights count once: the mean of the two
        torch.testing.assert_close(got[k], ramp(1) * w0[k] + (1 - ramp(1)) * w1[k], rtol=1e-5, atol=1e-6)


def test_a_run_resumed_with_the_average_turned_on_averages_from_its_resumed_weights(tmp_path):
    """A checkpoint written without the average, resumed with --train.ema_decay: the average starts at the
    resumed weights (not at the initialisation, not zeros), and the resumed training is the same as without it."""
    runs = {}
    for name, extra in (("with", {"train.ema_decay": DECAY}), ("without", {})):
        (tmp_path / name).mkdir()
        for steps, more in ((2, {}), (3, extra)):  # 2 steps without the average, then one more step
            train(load_config("tiny", small_overrides(tmp_path / name, **{"train.max_steps": steps, "train.save_every": 1,
                                                                          "train.keep_last": 0, **more})), quiet=True)
        runs[name] = ckpt_io.list_checkpoints(tmp_path / name / "run")
    start, last = runs["with"][-2:]
    assert (start.name, last.name) == ("step_2", "step_3")
    assert not ckpt_io.holds_average(start) and ckpt_io.holds_average(last)
    w2, w3 = ckpt_io.read_model_state(start), ckpt_io.read_model_state(last)
    got = ckpt_io.read_model_state(last, weights="ema")
    for k in w2:
        torch.testing.assert_close(got[k], ramp(1) * w2[k] + (1 - ramp(1)) * w3[k], rtol=1e-5, atol=1e-6)
    ref = ckpt_io.read_model_state(runs["without"][-1])
    assert all(torch.equal(ref[k], w3[k]) for k in w3)


def test_bad_input_gets_one_line(reference, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    train(load_config("tiny", small_overrides(plain, **{"train.max_steps": 2})), quiet=True)
    res = run_cli("average", str(plain / "run"), "--weights", "ema", "--out", str(tmp_path / "avg"))
    assert res.returncode != 0
    assert "holds no moving average of the weights; train with --train.ema_decay" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "avg").exists()
    res = run_cli("train", "tiny", "--train.ema_decay", "1", "--run.out_dir", str(tmp_path / "x"))
    assert res.returncode != 0 and res.stderr.strip() == (
        "kiln: error: command line: train.ema_decay: must be within [0, 1) (0: off; 0.999 averages about the last "
        "1000 steps), got 1.0")
    assert not (tmp_path / "x").exists()
