"""Stability guards and checkpoint policy through the real trainer (tiny shapes, in-process)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kiln.config import load_config
from kiln.train import checkpoint as ckpt_io
from kiln.train.metrics import read_metrics
from kiln.train.stability import DivergenceDetector, SpikeDetector
from kiln.train.trainer import TrainingDiverged, train
from test_train import losses, small_overrides


def test_divergence_detector_closed_form():
    d = DivergenceDetector(fast_decay=0.5, slow_decay=0.9, threshold=1.0, warmup=2)
    assert not any(d.update(s, 5.0) for s in range(1, 6))  # flat loss: fast == slow
    assert d.gap == 0.0
    assert not d.update(6, 6.0)  # fast 5.5, slow 5.1: gap 0.4
    assert d.onset is None
    assert not d.update(7, 7.0)  # fast 6.25, slow 5.29: gap 0.96 > 0.5 starts an excursion
    assert d.onset == 7
    assert d.update(8, 8.0)  # fast 7.125, slow 5.561: gap 1.564 > 1.0
    state = d.state_dict()
    e = DivergenceDetector()
    e.load_state_dict(state)
    assert e.update(9, 8.0) == d.update(9, 8.0) and e.fast == d.fast and e.slow == d.slow


def test_spike_detector_flags_outliers_and_keeps_them_out_of_the_statistics():
    s = SpikeDetector(z_threshold=4.0, decay=0.9, warmup=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        loss = 3.0 + 0.05 * torch.randn((), generator=g).item()
        assert not s.check(loss, 1.0 + 0.01 * torch.randn((), generator=g).item())[0]
    mean_before = s.loss.mean
    spike, z_loss, _ = s.check(5.0, 1.0)
    assert spike and z_loss > 4.0 and s.loss.mean == mean_before  # not absorbed into the running mean
    assert s.check(1.0, 50.0)[0]  # a gradient-norm spike alone counts
    fresh = SpikeDetector(z_threshold=4.0, decay=0.9, warmup=5)
    fresh.load_state_dict(s.state_dict())
    assert fresh.check(3.0, 1.0) == s.check(3.0, 1.0)


@pytest.mark.slow
def test_injected_blow_up_aborts_and_keeps_the_last_good_checkpoint(tmp_path):
    base = {"train.max_steps": 200, "train.save_every": 10, "train.eval_every": 1000, "train.keep_last": 2}
    train(load_config("tiny", small_overrides(tmp_path, **base, **{"train.stop_at_step": 30})), quiet=True)
    good = ckpt_io.list_checkpoints(tmp_path / "run")[-1]
    assert good.name == "step_30"
    blown = small_overrides(tmp_path, **base, **{"optim.lr": load_config("tiny").optim.lr * 1000})  # lr x1000
    with pytest.raises(TrainingDiverged, match=r"loss diverged.*last good checkpoint: .*step_30") as e:
        train(load_config("tiny", blown), quiet=True)
    step = int(str(e.value).split(":")[0].split()[-1])
    assert 30 < step <= 80, f"fired at step {step}"  # within 50 steps of the blow-up
    assert "\n" not in str(e.value)
    assert ckpt_io.list_checkpoints(tmp_path / "run")[-1] == good
    state = ckpt_io.read_model_state(good)  # loadable, finite
    assert all(torch.isfinite(v).all() for v in state.values())


def test_checkpoints_saved_after_the_onset_are_set_aside(tmp_path):
    """With frequent saves, the checkpoints of the diverging steps are renamed *.suspect."""
    base = {"train.max_steps": 200, "train.save_every": 1, "train.eval_every": 1000, "train.keep_last": 3,
            "train.divergence_threshold": 3.0}
    train(load_config("tiny", small_overrides(tmp_path, **base, **{"train.stop_at_step": 25})), quiet=True)
    with pytest.raises(TrainingDiverged, match=r"set aside \d+ checkpoint.*last good checkpoint: .*step_25"):
        train(load_config("tiny", small_overrides(tmp_path, **{**base, "optim.lr": 5.0})), quiet=True)
    suspect = sorted((tmp_path / "run" / "checkpoints").glob("*.suspect"))
    # step_26 holds the first update made with the blown-up LR, though its own logged loss looked fine
    assert suspect and all(int(p.name.split("_")[1].split(".")[0]) >= 26 for p in suspect)
    assert ckpt_io.list_checkpoints(tmp_path / "run")[-1].name == "step_25"


def test_skip_spikes_does_not_apply_the_update(tmp_path, monkeypatch):
    import kiln.train.engine as engine
    import kiln.train.objective as objective

    real_loss, real_step = objective.token_loss_sum, engine.Optimizers.step
    calls = {"loss": 0, "step": 0}

    def spiky(model, batch, **kw):  # both micro-batches of step 26 are wild outliers
        calls["loss"] += 1
        out = real_loss(model, batch, **kw)
        return out * 50 if calls["loss"] in (51, 52) else out

    def counted(self):
        calls["step"] += 1
        real_step(self)

    monkeypatch.setattr(objective, "token_loss_sum", spiky)
    monkeypatch.setattr(engine.Optimizers, "step", counted)
    over = {"train.max_steps": 30, "train.spike_z": 6.0, "train.skip_spikes": True, "train.divergence_threshold": 0}
    train(load_config("tiny", small_overrides(tmp_path, **over)), quiet=True)
    recs = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in recs if r.get("spike")] == [26]
    assert calls["step"] == 29  # 30 steps, one update skipped
    assert math.isfinite(recs[-1]["loss"])


def test_rotation_keeps_last_n_and_best_k(tmp_path):
    run = tmp_path / "ck"
    import shutil

    for step, loss in [(1, 5.0), (2, 3.0), (3, 4.0), (4, 2.5), (5, 6.0), (6, 7.0), (7, None), (8, 8.0)]:
        d = run / f"step_{step}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step, **({"eval_loss": loss} if loss else {})}))
    (run / ".step_9.tmp").mkdir()
    deleted = ckpt_io.rotate(run, keep_last=2, keep_best=2)
    assert sorted(p.name for p in ckpt_io.list_checkpoints(run)) == ["step_2", "step_4", "step_7", "step_8"]
    assert sorted(p.name for p in deleted) == ["step_1", "step_3", "step_5", "step_6"]
    assert not (run / ".step_9.tmp").exists()
    shutil.rmtree(run)


def test_keep_best_through_training(tmp_path):
    over = {"train.max_steps": 12, "train.save_every": 100, "train.eval_every": 2, "train.keep_last": 1,
            "train.keep_best": 2}
    train(load_config("tiny", small_overrides(tmp_path, **over)), quiet=True)
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"}
    kept = [p.name for p in ckpt_io.list_checkpoints(tmp_path / "run")]
    best = sorted((loss, s) for s, loss in evals.items() if s not in (0,))[:2]
    assert set(kept) == {f"step_{s}" for _, s in best} | {"step_12"}
    for p in ckpt_io.list_checkpoints(tmp_path / "run"):
        assert ckpt_io.read_meta(p)["eval_loss"] == pytest.approx(evals[int(p.name.split("_")[1])])


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    over = small_overrides(tmp_path, **{"optim.schedule": "infinite", "optim.lr_scaling": "sqrt", "optim.lr": 1e-4})
    summary = train(load_config("tiny", over), dry=True)
    out = capsys.readouterr().out
    assert summary["dry_run"] and summary["peak_lr"] == pytest.approx(1e-4 * math.sqrt(4))
    for needle in ("parameters", "tokens/step", "steps", "lr schedule infinite", "model:"):
        assert needle in out
    assert "(global batch 4 x 32, 2 micro-batches of 2 per rank)" in out
    train(load_config("tiny", [*over, "--train.micro_batch_size", "4"]), dry=True)
    assert "(global batch 4 x 32, 1 micro-batch of 4 per rank)" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_cost_eta_and_progress_fields(tmp_path):
    train(load_config("tiny", small_overrides(tmp_path, **{"train.max_steps": 4, "run.cost_per_hour": 3.6})),
          quiet=True)
    recs = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    last = recs[-1]
    assert last["progress"] == 1.0 and last["eta_sec"] == 0.0
    assert last["cost_usd"] == pytest.approx(last["elapsed_sec"] / 1000, rel=0.05)
    assert last["tokens_per_usd"] == pytest.approx(last["tokens_seen"] / last["cost_usd"], rel=1e-6)
    assert "mfu" not in last  # no honest peak on CPU
    assert recs[0]["progress"] == 0.25 and recs[0]["eta_sec"] > 0


def test_progress_shows_a_dash_until_the_first_train_record(capsys):
    """The bar read "loss nan  lr 0.00e+00  0 tok/s" for the steps before the first train record (and again
    after a resume), which reads as a diverged run."""
    from kiln.train.progress import Progress

    p = Progress(None)  # not a terminal here: plain lines, written when fields change
    p.update(1)
    assert p.fields == {"loss": "-", "lr": "-", "tok_s": "-", "eta": "?"} and capsys.readouterr().out == ""
    p.update(10, loss=3.14159, lr=4e-3, tok_s=12345.6, eta="1m02s")
    assert capsys.readouterr().out.split() == ["step", "10/?", "loss", "3.1416", "lr", "4.00e-03", "12,346",
                                               "tok/s", "eta", "1m02s"]


@pytest.mark.parametrize("name", ["adafactor", pytest.param("muon", marks=pytest.mark.slow)])
def test_bf16_stochastic_rounding_resumes_bitwise(tmp_path, name):
    """The rounding generators live outside the layout-independent optimizer state; they travel in
    the per-rank state, so a resumed bf16 run rounds exactly as the uninterrupted one."""
    x = {"optim.name": name, "optim.param_dtype": "bf16", "train.max_steps": 6, "optim.lr": 3e-3}
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    train(load_config("tiny", small_overrides(a, **x)), quiet=True)
    train(load_config("tiny", small_overrides(b, **x, **{"train.stop_at_step": 3})), quiet=True)
    train(load_config("tiny", small_overrides(b, **x)), quiet=True)
    assert losses(a / "run") == losses(b / "run")
    wa, wb = ckpt_io.read_model_state(a / "run"), ckpt_io.read_model_state(b / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoints_mirror_to_an_fsspec_url_and_resume_from_it(tmp_path):
    """A run mirrors its checkpoints (retention included); on a fresh disk it resumes from the mirror, whose
    retention then counts the mirror's own checkpoints, not the fewer on the new disk."""
    import shutil

    url = (tmp_path / "bucket" / "run1").as_uri()  # file:// here; s3:// or gs:// with their backends
    over = {"train.max_steps": 8, "train.save_every": 2, "train.keep_last": 3, "train.checkpoint_url": url}
    ref = tmp_path / "ref"
    ref.mkdir()
    train(load_config("tiny", small_overrides(ref, **{"train.max_steps": 8})), quiet=True)
    train(load_config("tiny", small_overrides(tmp_path, **over, **{"train.stop_at_step": 5})), quiet=True)
    remote = tmp_path / "bucket" / "run1"
    local = [p.name for p in ckpt_io.list_checkpoints(tmp_path / "run")]
    assert sorted(p.name for p in remote.iterdir()) == sorted(local) == ["step_2", "step_4", "step_5"]
    assert all((remote / n / "meta.json").exists() for n in local)
    shutil.rmtree(tmp_path / "run")  # the machine's disk is gone
    train(load_config("tiny", small_overrides(tmp_path, **over, **{"train.stop_at_step": 6})), quiet=True)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "run")] == ["step_5", "step_6"]
    assert sorted(p.name for p in remote.iterdir()) == ["step_4", "step_5", "step_6"]  # not the local two only
    summary = train(load_config("tiny", small_overrides(tmp_path, **over)), quiet=True)
    assert summary["step"] == 8
    wa, wb = ckpt_io.read_model_state(ref / "run"), ckpt_io.read_model_state(tmp_path / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # resumed exactly from the mirrored step_5
    assert losses(tmp_path / "run") == [x for x in losses(ref / "run") if x[0] > 5]
    assert sorted(p.name for p in remote.iterdir()) == ["step_5", "step_6", "step_8"]
    bad = small_overrides(tmp_path, **{"train.checkpoint_url": "nosuchproto://x/y", "run.out_dir": str(tmp_path / "z")})
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="train.checkpoint_url nosuchproto://x/y"):
        train(load_config("tiny", bad), quiet=True)


def test_full_disk_during_a_save_is_one_line_and_loses_no_checkpoint(tmp_path, monkeypatch):
    import errno
    import hashlib

    from kiln.errors import CheckpointError
    from kiln.train import checkpoint as ck

    over = {"train.save_every": 2, "train.keep_last": 2}
    train(load_config("tiny", small_overrides(tmp_path, **over, **{"train.max_steps": 4})), quiet=True)
    ckpts = tmp_path / "run" / "checkpoints"

    def digest() -> dict[str, str]:
        return {str(p.relative_to(ckpts)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(ckpts.rglob("*")) if p.is_file()}

    before = digest()
    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.dcp, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint \(the disk is full\); earlier "
                                              r"checkpoints are untouched") as e:
        train(load_config("tiny", small_overrides(tmp_path, **over, **{"train.max_steps": 8})), quiet=True)
    assert "\n" not in str(e.value)
    assert digest() == before and not list(ckpts.glob(".step_*"))
    monkeypatch.undo()
    assert train(load_config("tiny", small_overrides(tmp_path, **over, **{"train.max_steps": 8})),
                 quiet=True)["step"] == 8  # space freed: the same command resumes


def test_dry_run_of_a_time_budget_with_a_zero_init_head_says_the_estimate_runs_high(tmp_path, capsys):
    """demo's dry run timed 3 synthetic steps, whose head rows are nearly all shared, and printed ~1,600 steps for a
    300 s budget where the run fits 1,000-1,150: the estimate says why a zero-init untied head's run takes fewer."""
    over = small_overrides(tmp_path, **{"train.time_budget": "60s", "optim.warmup_steps": 4,
                                        "model.init_zero_out": True, "model.tie_embeddings": False})
    train(load_config("tiny", over), dry=True)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("steps "))
    assert "this estimate times 3 steps on synthetic batches here" in line and line.endswith("so expect fewer)")
    train(load_config("tiny", over[:-2] + ["--model.tie_embeddings", "true"]), dry=True)  # tied: no shared rows
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("steps "))
    assert "expect fewer" not in line
    assert not (tmp_path / "run").exists()


def test_a_divergence_before_any_checkpoint_says_to_start_over(tmp_path):
    """"last good checkpoint: none ... run again to resume from it" pointed at nothing, and a plain rerun started
    over in place with its records appended to the diverged run's: it now says --fresh."""
    from kiln.train.trainer import _diverged

    detector = DivergenceDetector(threshold=1.0)
    for step, loss in enumerate([3.0] * 5 + [9.0] * 5, start=1):
        detector.update(step, loss)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(TrainingDiverged, match=r"; no good checkpoint\. Lower optim\.lr .* run again with --fresh"):
        _diverged(tmp_path, detector, 10, True)
