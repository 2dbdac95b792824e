"""Trainer: exact resume, NaN guard, gradient accumulation, rotation (in-process, tiny shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.config import load_config
from kiln.train import checkpoint as ckpt_io
from kiln.train.metrics import read_metrics
from kiln.train.trainer import TrainingDiverged, train

WORDS = "the of and to in a is that for it as with was on be by at this had not are but from or have".split()


def write_corpus(path: Path, n_docs: int = 120, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            n = int(torch.randint(20, 120, (1,), generator=g))
            idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
            f.write(json.dumps({"text": f"Document {i}. " + " ".join(WORDS[j] for j in idx) + "."}) + "\n")
    return path


def small_overrides(tmp_path: Path, **extra: object) -> list[str]:
    train_file = write_corpus(tmp_path / "train.jsonl", seed=0)
    val_file = write_corpus(tmp_path / "val.jsonl", n_docs=20, seed=1)
    over = {
        "run.out_dir": str(tmp_path / "run"), "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
        "model.n_kv_heads": 1, "model.ffn_dim": 64, "train.seq_len": 32, "train.micro_batch_size": 2,
        "train.global_batch_size": 4, "train.log_every": 1, "train.eval_every": 3, "train.save_every": 3,
        "train.eval_tokens": 128, "train.sample_tokens": 0, "optim.warmup_steps": 2,
        "data.train": json.dumps([{"path": str(train_file), "name": "toy"}]),
        "data.val": json.dumps([{"path": str(val_file), "name": "toyval"}]),
    }
    over.update(extra)
    return [x for k, v in over.items() for x in (f"--{k}", str(v))]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r.get("kind") == "train"]


def test_resume_is_bitwise_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    full = load_config("tiny", small_overrides(a, **{"train.max_steps": 8}))
    train(full, quiet=True)
    half = load_config("tiny", small_overrides(b, **{"train.max_steps": 8, "train.stop_at_step": 4}))
    assert train(half, quiet=True)["stopped"] == "train.stop_at_step"
    assert [p.name for p in ckpt_io.list_checkpoints(b / "run")] == ["step_3", "step_4"]
    rest = load_config("tiny", small_overrides(b, **{"train.max_steps": 8}))
    summary = train(rest, quiet=True)  # resumes from step 4
    assert summary["step"] == 8 and summary["stopped"] is None
    la, lb = losses(a / "run"), losses(b / "run")
    assert [s for s, _ in lb] == list(range(1, 9))
    assert la == lb  # exact float equality, step by step
    wa = ckpt_io.read_model_state(a / "run")
    wb = ckpt_io.read_model_state(b / "run")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ev = [r for r in read_metrics(a / "run") if r.get("kind") == "eval"]
    assert ev[0]["step"] == 0 and ev[-1]["step"] == 8 and "eval_loss/toyval" in ev[-1]


def test_metrics_and_run_folder_layout(tmp_path):
    cfg = load_config("tiny", small_overrides(tmp_path, **{"train.max_steps": 7, "train.keep_last": 2,
                                                            "train.save_every": 2}))
    train(cfg, quiet=True)
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "run.json").exists() and (run / "tb").is_dir()
    recs = read_metrics(run)
    tr = [r for r in recs if r["kind"] == "train"]
    assert {"step", "tokens_seen", "loss", "lr", "grad_norm", "tokens_per_sec"} <= tr[0].keys()
    assert tr[-1]["tokens_seen"] == 7 * 4 * 32
    ev = [r for r in recs if r["kind"] == "eval"]
    assert {"step", "eval_loss", "eval_ppl"} <= ev[0].keys()
    # saves at 2, 4, 6 and the final 7; keep_last=2 leaves the two newest
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step_6", "step_7"]
    meta = json.loads((run / "checkpoints" / "step_7" / "meta.json").read_text())
    assert meta["step"] == 7 and meta["tokens_seen"] == 7 * 128


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Loss normalised by the step's token count: accumulation 2x2 equals one batch of 4."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    train(load_config("tiny", small_overrides(a, **{"train.max_steps": 3})), quiet=True)
    train(load_config("tiny", small_overrides(b, **{"train.max_steps": 3, "train.micro_batch_size": 4})), quiet=True)
    for (sa, la), (sb, lb) in zip(losses(a / "run"), losses(b / "run")):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5)


def test_nan_loss_aborts_without_saving(tmp_path, monkeypatch):
    cfg = load_config("tiny", small_overrides(tmp_path, **{"train.max_steps": 3}))
    train(cfg, quiet=True)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").rglob("*")}
    import kiln.train.objective as objective

    real = objective.token_loss_sum
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(objective, "token_loss_sum", poisoned)
    cfg = load_config("tiny", small_overrides(tmp_path, **{"train.max_steps": 10}))
    with pytest.raises(TrainingDiverged, match=r"step 5: loss=nan.*last good checkpoint: .*step_3"):
        train(cfg, quiet=True)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").rglob("*")}
    assert after == before  # nothing written, nothing removed


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    train(load_config("tiny", small_overrides(a, **{"train.max_steps": 3})), quiet=True)
    src = ckpt_io.resolve_checkpoint(a / "run")
    over = small_overrides(a, **{"train.max_steps": 2, "run.out_dir": str(tmp_path / "b"), "run.init_from": str(a / "run"),
                                 "train.eval_every": 100})
    train(load_config("tiny", over), quiet=True)
    first_eval = [r for r in read_metrics(tmp_path / "b") if r["kind"] == "eval"][0]
    last_eval_a = [r for r in read_metrics(a / "run") if r["kind"] == "eval"][-1]
    assert first_eval["step"] == 0 and first_eval["eval_loss"] == last_eval_a["eval_loss"]  # same weights
    assert ckpt_io.read_model_state(src).keys()  # the source run is untouched and loadable
    bad = small_overrides(a, **{"run.out_dir": str(tmp_path / "c"), "run.init_from": str(a / "run"), "model.d_model": 64})
    with pytest.raises(Exception, match="model.d_model"):
        train(load_config("tiny", bad), quiet=True)
