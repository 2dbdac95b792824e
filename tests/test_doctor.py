"""kiln doctor: passes on this machine, and each check can fail when its subject is broken."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest

import kiln.eval.loss
from kiln import doctor
from kiln.cli import main
from kiln.config import load_config


@pytest.fixture
def ctx(tmp_path):
    return doctor.Context(cfg=load_config("tiny"), device=doctor.torch.device("cpu"), out_dir=tmp_path / "out")


@pytest.mark.parametrize("preset", [[], ["demo"]])  # demo (make train's): its zero-init head passes no gradient at init
def test_doctor_passes_here_and_leaves_nothing_behind(tmp_path, capsys, preset):
    out = tmp_path / "a" / "b"
    assert main(["doctor", *preset, "--out-dir", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["fail"] == 0 and report["failed"] == []
    assert report["pass"] + report["warn"] + report["skip"] == len(doctor.CHECKS)
    table = "\n".join(lines[:-1])
    for name, _ in doctor.CHECKS:
        assert name in table
    for expected in ("ln V", "round trip exact", "changed all", "matches eager", "bundled: batch (1, ",
                     "documents per batch of 8 rows"):
        assert expected in table
    assert not (tmp_path / "a").exists()  # the writability probe removed the folders it made


def test_unwritable_out_dir_fails_with_exit_code_1(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(doctor, "CHECKS", [("out dir", doctor.check_out_dir), ("wandb", doctor.check_wandb)])
    assert main(["doctor", "--out-dir", str(blocker / "run")]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["failed"] == ["out dir"]


def test_model_and_optimizer_checks_catch_breakage(ctx, monkeypatch):
    assert doctor.check_model(ctx)[0] == "PASS"
    status, detail = doctor.check_optimizer(ctx, lr=0.0)  # a step that does nothing
    assert status == "FAIL" and "unchanged" in detail
    real = kiln.eval.loss.token_loss_sum
    monkeypatch.setattr(doctor, "token_loss_sum", lambda *a, **k: real(*a, **k) * float("nan"))
    status, detail = doctor.check_model(ctx)
    assert status == "FAIL" and "not finite" in detail


def test_tokenizer_data_and_disk_checks_catch_breakage(ctx, monkeypatch):
    assert doctor.check_data(ctx)[0] == "SKIP"  # needs the tokenizer first
    assert doctor.check_tokenizer(ctx)[0] == "PASS"
    assert doctor.check_data(ctx)[0] == "PASS"
    ctx.cfg.model.vocab_size = 1000  # smaller than the tokenizer's 32768 ids
    status, detail = doctor.check_tokenizer(ctx)
    assert status == "FAIL" and "model.vocab_size 1000" in detail
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * 2**30, 9 * 2**30, 2**30))
    status, detail = doctor.check_disk(ctx)
    assert status == "WARN" and "1.0 GiB free" in detail


def test_attention_check_compares_against_eager(ctx, monkeypatch):
    import kiln.model.attention as attention

    real = attention._eager
    monkeypatch.setattr(attention, "_flex", lambda q, k, v, mask: real(q, k, v, mask) + 1e-3)  # a subtly wrong kernel
    status, detail = doctor.check_flex(ctx)
    assert status == "WARN" and "max |flex - eager| = 1.0e-03" in detail  # the tiny preset trains with sdpa
    ctx.cfg.model.attention = "flex"
    assert doctor.check_flex(ctx)[0] == "FAIL"
    assert doctor.check_flash(ctx)[0] == "SKIP"  # CPU: not applicable...
    ctx.cfg.model.attention = "flash"
    status, detail = doctor.check_flash(ctx)
    assert status == "FAIL" and "asks for model.attention=flash" in detail  # ...unless the preset needs it


def test_device_check_uses_the_memory_estimate(ctx, monkeypatch):
    """dense-180m at 16 x 2048 needs ~50 GiB by kiln's own estimate (activations included): a 40 GiB machine
    gets a FAIL with the fix (it was a WARN without a reason), although its weights, gradients and AdamW state
    alone are ~3 GiB; within 10% of the memory is a WARN."""
    from kiln.estimate import estimate_memory

    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 40 * 2**30 // 4096}
    monkeypatch.setattr(doctor.os, "sysconf", lambda name: pages[name])
    ctx.cfg = load_config("dense-180m")
    need = estimate_memory(ctx.cfg, device="cpu").total
    assert need > 40 * 2**30 > 16 * 200e6
    status, detail = doctor.check_device(ctx)
    assert status == "FAIL" and f"training peak ~{need / 2**30:.1f} GiB" in detail
    assert detail.startswith(f"does not fit: the estimate is {need / (40 * 2**30):.1f}x this device's RAM; lower "
                             "train.micro_batch_size"), detail
    pages["SC_PHYS_PAGES"] = int(need * 1.05) // 4096
    status, detail = doctor.check_device(ctx)
    assert status == "WARN" and detail.startswith("within 10% of this device's RAM; lower"), detail
    ctx.cfg = load_config("tiny")
    assert doctor.check_device(ctx)[0] == "PASS"


@pytest.mark.parametrize("over", [[], ["--optim.name", "adafactor", "--optim.param_dtype", "bf16"],
                                  ["--optim.name", "muon", "--model.tie_embeddings", "false"],
                                  ["--train.ema_decay", "0.99"]])
def test_checkpoint_size_counts_parameters_and_optimizer_state(over):
    """The disk check's checkpoint size is the bytes of the real parameter and optimizer-state tensors, and of
    the weights' moving average where train.ema_decay keeps one."""
    from kiln.train.ema import WeightEMA
    from test_estimate import one_step, optimizer_state_bytes

    cfg = load_config("tiny", ["--model.vocab_size", "512", "--model.n_layers", "2", *over])
    model, opt = one_step(cfg)
    size = sum(p.numel() * p.element_size() for p in model.parameters()) + optimizer_state_bytes(opt)
    if cfg.train.ema_decay:
        ema = WeightEMA([model], decay=cfg.train.ema_decay, tie_embeddings=cfg.model.tie_embeddings)
        size += sum(t.numel() * t.element_size() for t in ema.state_dict().values())
    assert doctor.checkpoint_bytes(cfg) == size


def test_optimizer_check_steps_the_preset_parameter_dtype(ctx, monkeypatch):
    """A bf16 preset's optimizer check runs on bf16 parameters, so stochastic rounding is exercised."""
    import kiln.optim.rounding as rounding

    calls = []
    real = rounding.stochastic_round_
    monkeypatch.setattr(rounding, "stochastic_round_", lambda *a, **k: calls.append(1) or real(*a, **k))
    ctx.cfg = load_config("tiny", ["--optim.name", "adafactor", "--optim.param_dtype", "bf16"])
    assert doctor.check_model(ctx)[0] == "PASS"
    status, detail = doctor.check_optimizer(ctx)
    assert status == "PASS" and "bfloat16 parameters (stochastic rounding)" in detail, detail
    assert calls and all(p.dtype == doctor.torch.bfloat16 for p in ctx.model.parameters())


def test_diversity_check_warns_when_batches_come_from_few_documents(ctx):
    """The tiny preset's loader (row shuffle on) passes; rows in stream order (the loader before
    data.row_shuffle) fill a batch from one or two documents and WARN."""
    assert doctor.check_diversity(ctx)[0] == "SKIP"  # needs the tokenizer first
    assert doctor.check_tokenizer(ctx)[0] == "PASS"
    status, detail = doctor.check_diversity(ctx)
    assert status == "PASS" and "documents per batch of 8 rows" in detail, detail
    ctx.cfg = load_config("tiny", ["--data.row_shuffle", "0"])
    status, detail = doctor.check_diversity(ctx)
    assert status == "WARN" and "raise data.row_shuffle" in detail, detail


@pytest.mark.parametrize("flag, value, needle", [("--parallel.tp", "3", "parallel.tp=3 must divide model.n_heads=4"),
                                                 ("--parallel.pp", "8", "only model.n_layers=4; lower parallel.pp")])
def test_a_layout_training_refuses_fails_the_parallel_check(tmp_path, capsys, monkeypatch, flag, value, needle):
    """`kiln doctor tiny --parallel.tp 3` (4 heads) or `--parallel.pp 8` (4 layers): FAIL with training's line."""
    fast = [c for c in doctor.CHECKS if c[0] in ("versions", "parallel layout", "device")]  # the others are slow
    monkeypatch.setattr(doctor, "CHECKS", fast)
    assert main(["doctor", "tiny", flag, value]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["failed"] == ["parallel layout"]
    ctx = doctor.Context(cfg=load_config("tiny", [flag, value]), device=doctor.torch.device("cpu"), out_dir=tmp_path)
    status, detail = doctor.check_parallel(ctx)
    assert status == "FAIL" and needle in detail
    assert main(["doctor", "tiny", flag, "1"]) == 0


@pytest.mark.parametrize("flag, value, needle", [
    ("--model.attention", "flex", "model.attention=flex has no backward on CPU"),
    ("--train.loss_impl", "liger", "train.loss_impl=liger needs liger-kernel and a CUDA device"),
    ("--train.checkpoint_url", "nosuchproto://b/x", "train.checkpoint_url nosuchproto://b/x"),
    ("--run.init_from", "/nope", "run.init_from: /nope: no such checkpoint or run folder"),
    ("--train.eval_tasks", "nosuch.jsonl", "nosuch.jsonl"),
])
def test_what_the_run_would_refuse_at_setup_fails_doctor_and_the_dry_run(tmp_path, capsys, flag, value, needle):
    """kiln doctor said PASS to all of these, and --dry-run exited 0 for the last four; `kiln train` refused each
    at setup. Both now say the run's own line."""
    ctx = doctor.Context(cfg=load_config("tiny", [flag, value]), device=doctor.torch.device("cpu"),
                         out_dir=tmp_path / "out")
    assert doctor.check_tokenizer(ctx)[0] == "PASS"
    status, detail = doctor.check_setup(ctx)
    assert status == "FAIL" and detail.startswith("`kiln train` would stop: ") and needle in detail, detail
    assert main(["train", "tiny", flag, value, "--run.out_dir", str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln: error: ") and needle in err[0], err
    assert not (tmp_path / "run").exists()


def test_doctor_says_a_finished_run_has_nothing_to_train(tmp_path):
    """It said "writable: ... (resumes from step_4)" where `kiln train` has nothing to train."""
    from kiln.train.trainer import train
    from test_train import small_overrides

    over = small_overrides(tmp_path, **{"train.max_steps": 4, "train.save_every": 4, "train.eval_every": 100})
    train(load_config("tiny", over), quiet=True)
    cfg = load_config("tiny", over)
    status, detail = doctor.check_out_dir(doctor.Context(cfg=cfg, device=doctor.torch.device("cpu"),
                                                         out_dir=tmp_path / "run"))
    assert status == "WARN" and "complete at step_4, so `kiln train` has nothing to train" in detail, detail
    cfg = load_config("tiny", [*over, "--train.max_steps", "6"])
    assert doctor.check_out_dir(doctor.Context(cfg=cfg, device=doctor.torch.device("cpu"),
                                               out_dir=tmp_path / "run"))[0] == "PASS"
