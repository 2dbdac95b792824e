"""Trainer: exact resume, NaN guard, gradient accumulation, rotation (in-process, tiny shapes)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.config import ModelConfig, load_config
from kiln.data.tokenizer import load_tokenizer
from kiln.device import train_precision
from kiln.errors import CheckpointError
from kiln.train import checkpoint as ckpt_io
from kiln.train.metrics import MetricsLogger, StepLog, read_metrics
from kiln.train.plan import Plan
from kiln.train.progress import Progress
from kiln.train.stability import DivergenceDetector, SpikeDetector
from kiln.train.state import TrainState
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
    # before the first save there is nothing to resume: say how to start over ("then resume" restarted in place,
    # its records appended to the diverged run's)
    calls["n"] = 0
    (tmp_path / "new").mkdir()
    first = load_config("tiny", small_overrides(tmp_path / "new", **{"train.max_steps": 10}))
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint: none\); .* then run again with --fresh"):
        train(first, quiet=True)


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    train(load_config("tiny", small_overrides(a, **{"train.max_steps": 3})), quiet=True)
    src = ckpt_io.resolve_checkpoint(a / "run")
    before = ckpt_io.read_model_state(src)
    # a copy of the tokenizer in a folder (as `kiln import` and `kiln export` write one) gives the same ids, and
    # the init keys only say how fresh weights would be drawn: neither stops a run starting from these weights
    load_tokenizer("mistral-v3").save_hf(tmp_path / "tok")
    over = small_overrides(a, **{"train.max_steps": 2, "run.out_dir": str(tmp_path / "b"), "run.init_from": str(a / "run"),
                                 "train.eval_every": 100, "data.tokenizer": str(tmp_path / "tok"),
                                 "model.init_zero_out": True, "model.init_std": 0.01})
    train(load_config("tiny", over), quiet=True)
    first_eval = [r for r in read_metrics(tmp_path / "b") if r["kind"] == "eval"][0]
    last_eval_a = [r for r in read_metrics(a / "run") if r["kind"] == "eval"][-1]
    assert first_eval["step"] == 0 and first_eval["eval_loss"] == last_eval_a["eval_loss"]  # same weights
    after = ckpt_io.read_model_state(src)  # the source run is untouched and loadable
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    bad = small_overrides(a, **{"run.out_dir": str(tmp_path / "c"), "run.init_from": str(a / "run"), "model.d_model": 64})
    with pytest.raises(CheckpointError, match="model.d_model=32 but the config says 64; run.init_from takes weights "
                                              "of the same architecture"):
        train(load_config("tiny", bad), quiet=True)
    load_tokenizer("mistral-v1").save_hf(tmp_path / "tok-v1")
    other = small_overrides(a, **{"run.out_dir": str(tmp_path / "d"), "run.init_from": str(a / "run"),
                                  "data.tokenizer": str(tmp_path / "tok-v1")})
    with pytest.raises(CheckpointError, match="trained with tokenizer 'mistral-v3'"):
        train(load_config("tiny", other), quiet=True)


def _checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: weights and optimizer state (DCP), per-rank and global state files."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(ckpt / "dcp")), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    flat = {f"dcp/{k}": v for k, v in sd.items()}
    for f in sorted((ckpt / "state").glob("*.pt")):
        flat[f"state/{f.name}"] = torch.load(f, weights_only=False)
    return flat


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):  # numpy's RNG state
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b or (a != a and b != b)  # NaN == NaN here


def test_async_checkpoints_hold_the_same_state_and_resume_exactly(tmp_path, monkeypatch):
    """train.async_checkpoint: the state is copied when the save starts and written in the background
    while training goes on, so each checkpoint must be the synchronous one, byte for byte in content
    (weights, optimizer, RNG, data position, counters); a run stopped and resumed from them matches.
    The writer is slowed down so that later steps really run while it writes."""
    import time

    from torch.distributed.checkpoint import filesystem

    write = filesystem.FileSystemWriter.write_data

    def slow_write(self, plan, planner):
        time.sleep(0.5)
        return write(self, plan, planner)

    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", slow_write)
    a, b = tmp_path / "a", tmp_path / "b"  # one corpus (its path is part of the data position), two runs
    keep = {"train.max_steps": 8, "train.save_every": 2, "train.keep_last": 0}
    train(load_config("tiny", small_overrides(tmp_path, **keep, **{"run.out_dir": a / "run"})), quiet=True)
    asyn = {**keep, "run.out_dir": b / "run", "train.async_checkpoint": True}
    train(load_config("tiny", small_overrides(tmp_path, **asyn, **{"train.stop_at_step": 5})), quiet=True)
    names = [p.name for p in ckpt_io.list_checkpoints(b / "run")]
    assert names == ["step_2", "step_4", "step_5"] and not list((b / "run" / "checkpoints").glob(".step_*"))
    for name in names[:2]:
        want, got = (_checkpoint_tensors(run / "run" / "checkpoints" / name) for run in (a, b))
        for part in (want, got):  # wall-clock fields differ between any two runs
            part["state/common.pt"].pop("elapsed")
        assert want.keys() == got.keys() and all(_same(want[k], got[k]) for k in want), name
    train(load_config("tiny", small_overrides(tmp_path, **asyn)), quiet=True)
    assert losses(a / "run") == losses(b / "run")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_full_disk_inside_dcps_writer_is_one_line(tmp_path, monkeypatch, asynchronous):
    """ENOSPC raised where DCP writes files (its writer, in the background thread when asynchronous)
    reaches the user as the one-line CheckpointError, not as DCP's CheckpointException traceback;
    earlier checkpoints stay and no temp folder is left."""
    import errno

    from torch.distributed.checkpoint import filesystem

    from kiln.errors import CheckpointError

    over = {"train.save_every": 2, "train.async_checkpoint": asynchronous}
    train(load_config("tiny", small_overrides(tmp_path, **over, **{"train.max_steps": 2})), quiet=True)

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint \(the disk is full\)") as e:
        train(load_config("tiny", small_overrides(tmp_path, **over, **{"train.max_steps": 6})), quiet=True)
    assert "\n" not in str(e.value)
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "run")] == ["step_2"]
    assert not list(ckpts.glob(".step_*"))


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_clip_grad_norm_clips_above_the_limit_and_leaves_gradients_within_it(scale):
    """Engine.clip_grad_norm returns the pre-clip norm; above the limit the gradients are scaled to it, within it
    they keep their exact values (on CPU the scaling pass by min(1, max/norm) = 1 is skipped)."""
    from kiln.parallel.mesh import init_layout
    from kiln.train.engine import Engine
    from kiln.train.objective import Objective, RunSettings

    cfg = load_config("tiny", ["--model.vocab_size", "64", "--model.n_layers", "1", "--train.dtype", "fp32"])
    objective = Objective()
    objective.configure(RunSettings.of(cfg))
    engine = Engine(model=cfg.model, optim=cfg.optim, train=cfg.train, parallel=cfg.parallel,
                    doc_mask=cfg.data.doc_mask, layout=init_layout(cfg.parallel, cfg.model, "cpu"),
                    objective=objective, seed=0, accum_steps=1)
    g = torch.Generator().manual_seed(0)
    params = engine.params()
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    norm0 = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    for p in params:
        p.grad *= scale / norm0
    before = [p.grad.clone() for p in params]
    total = engine.clip_grad_norm(1.0)
    assert float(total) == pytest.approx(scale, rel=1e-5)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    if scale <= 1.0:
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    else:
        assert float(after) == pytest.approx(1.0, rel=1e-5)
        assert all(torch.allclose(p.grad, b / scale, rtol=1e-5, atol=0) for p, b in zip(params, before))


def test_a_batch_the_ranks_cannot_split_names_the_micro_batch_that_keeps_it():
    """`torchrun --nproc_per_node 2 -m kiln train demo --parallel.dp_shard 2`: demo's global batch 8 of micro-batches
    of 8 cannot be split over 2 ranks; the line says which micro-batch keeps the global batch."""
    from kiln.errors import ConfigError
    from kiln.train.plan import make_plan

    cfg = load_config("demo")
    with pytest.raises(ConfigError, match=r"\(8 x 2\); set --train.micro_batch_size 4 \(the same global batch\)$"):
        make_plan(cfg.model, cfg.train, cfg.optim, dp_size=2)
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 6, 4
    with pytest.raises(ConfigError, match=r"\(4 x 4\); set --train.global_batch_size 16 or a multiple of it$"):
        make_plan(cfg.model, cfg.train, cfg.optim, dp_size=4)
    cfg.train.micro_batch_size = 2
    assert make_plan(cfg.model, cfg.train, cfg.optim, dp_size=3).accum_steps == 1  # 6 = 2 x 3


def test_a_batch_the_pipeline_cannot_split_says_the_default_and_names_a_fix():
    """`torchrun --nproc_per_node 2 -m kiln train tiny --parallel.pp 2`: pp_microbatches was never set, yet the
    line said "adjust one of them"; it says what the default is and which micro-batch size splits the batch."""
    from kiln.errors import ConfigError
    from kiln.parallel.pipeline import microbatches
    from kiln.train.plan import make_plan

    cfg = load_config("tiny", ["--parallel.pp", "2", "--parallel.pp_schedule", "Interleaved1F1B"])
    n = microbatches(cfg.parallel)
    assert n == 4  # one per stage: 2 ranks x 2 stages
    default = "(parallel.pp_microbatches; its default, 0, is one per pipeline stage)"
    with pytest.raises(ConfigError) as e:
        make_plan(cfg.model, cfg.train, cfg.optim, pipeline_microbatches=n)
    assert str(e.value) == ("train.global_batch_size=8 gives 1 micro-batch of 8 per data-parallel rank, not a multiple "
                            f"of the pipeline's 4 microbatches per step {default}; set --train.micro_batch_size 2 (the "
                            "same global batch)")
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 2, 1  # no smaller micro-batch splits 2 into 4
    with pytest.raises(ConfigError, match=r"gives 2 micro-batches of 1 per data-parallel rank, .*; set "
                                          r"--train.global_batch_size 4 or a multiple of it$"):
        make_plan(cfg.model, cfg.train, cfg.optim, pipeline_microbatches=n)
    cfg.train.global_batch_size = 4
    assert make_plan(cfg.model, cfg.train, cfg.optim, pipeline_microbatches=n).accum_steps == 4


def test_a_data_position_saved_on_one_rank_says_rank():
    from kiln.train.preflight import reshard_error

    assert "saved with 1 data-parallel rank and this run has 2;" in str(reshard_error(1, 2))
    assert "saved with 2 data-parallel ranks and this run has 1;" in str(reshard_error(2, 1))


def _step_log(total: int, log_every: int, *, metrics=None, control=None) -> tuple[StepLog, TrainState]:
    """A StepLog for a plan of `total` steps of 1000 tokens, and a fresh TrainState."""
    plan = Plan(n_params=1, tokens_per_step=1000, accum_steps=1, total_steps=total, total_tokens=1000 * total,
                budget_source="", peak_lr=1e-3, log_every=log_every, eval_every=10**6, save_every=10**6)
    cpu = torch.device("cpu")
    log = StepLog(plan, device=cpu, n_devices=1, model=ModelConfig(), seq_len=16,
                  precision=train_precision("fp32", torch.float32, cpu), cost_per_hour=0.0,
                  progress=Progress(total, quiet=True), metrics=metrics, control=control)
    return log, TrainState(divergence=DivergenceDetector(threshold=1.0), spikes=SpikeDetector(z_threshold=6.0))


def _steps(log: StepLog, state: TrainState, n: int, *, pause: float, seconds: float) -> None:
    """`n` logged steps of `seconds` each, the second followed by `pause` seconds of wall time (an eval, a save)."""
    for i in range(n):
        state.advance(tokens=1000, loss=1.0)
        if i == 1:
            time.sleep(pause)
        log.step(state, lr=1e-3, grad_norm=1.0, extras={}, seconds=seconds)


def test_tokens_per_sec_is_the_steps_own_throughput_and_the_eta_counts_the_evals(tmp_path):
    """A window of 4 logged steps with a 0.3 s pause (an eval, a checkpoint) inside it: tokens/s is the steps'
    own (4 x 1000 tokens over their 4 x 0.01 s), not the window's wall time; the ETA, which says when the run
    ends, still counts the pause."""
    log, state = _step_log(8, 4, metrics=MetricsLogger(tmp_path, tensorboard=False))
    _steps(log, state, 4, pause=0.3, seconds=0.01)
    (rec,) = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert rec["tokens_per_sec"] == pytest.approx(4000 / 0.04)
    assert rec["eta_sec"] >= 4 * 0.3 / 4  # the remaining 4 steps at the window's wall time per step


def test_a_runs_saved_config_resumes_it_from_another_folder(tmp_path):
    """A run started with relative paths (its data, its run.out_dir) saved them relative: `kiln train
    RUN/config.yaml` from another folder started a new run under that folder, and could not find the data.
    The saved config names them absolute now; the resume from elsewhere logs what the uninterrupted run logs,
    and the original command, relative paths and all, still resumes too."""
    from conftest import run_kiln

    def setup(folder: Path) -> list[str]:
        folder.mkdir()
        write_corpus(folder / "train.jsonl", seed=0)
        write_corpus(folder / "val.jsonl", n_docs=20, seed=1)
        over = small_overrides(folder, **{"train.max_steps": 6, "train.eval_every": 100, "train.save_every": 1})
        over[over.index("--run.out_dir") + 1] = "run"
        over[over.index("--data.train") + 1] = json.dumps([{"path": "train.jsonl", "name": "toy"}])
        over[over.index("--data.val") + 1] = json.dumps([{"path": "val.jsonl", "name": "toyval"}])
        return over

    def kiln(*args: str, cwd: Path) -> None:
        res = run_kiln("train", *args, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]

    a, ref, elsewhere = tmp_path / "a", tmp_path / "ref", tmp_path / "elsewhere"
    kiln("tiny", *setup(ref), cwd=ref)
    over = setup(a)
    kiln("tiny", *over, "--train.stop_at_step", "2", cwd=a)
    elsewhere.mkdir()
    kiln(str(a / "run" / "config.yaml"), "--train.stop_at_step", "4", cwd=elsewhere)
    assert list(elsewhere.iterdir()) == []  # no new run folder here
    kiln("tiny", *over, cwd=a)  # the original command, as typed in its own folder
    assert losses(a / "run") == losses(ref / "run") and len(losses(ref / "run")) == 6
    saved = (a / "run" / "config.yaml").read_text()
    assert f"out_dir: {a / 'run'}" in saved and f"path: {a / 'train.jsonl'}" in saved


def _saved_group_settings(ckpt: Path, tmp_path: Path) -> dict[str, object]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "dcp", tmp_path / "flat.pt")
    optim = torch.load(tmp_path / "flat.pt", weights_only=False)["optim"]
    prefix = "param_groups.layers.0.attn.wq.weight."
    return {k[len(prefix):]: v for k, v in optim.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_resume_trains_with_the_optimizer_settings_it_is_given_and_says_so(tmp_path, capsys, name):
    """Resuming with another optim.weight_decay / betas / eps (or Muon's momentum) kept the checkpoint's values
    while config.yaml recorded the new ones. The optimizer now takes its settings from the config (its moments
    and step counts from the checkpoint), and the run says what changed."""
    over = small_overrides(tmp_path, **{"train.max_steps": 4, "train.save_every": 2, "optim.name": name})
    train(load_config("tiny", [*over, "--train.stop_at_step", "2"]), quiet=True)
    new = {"optim.weight_decay": "0.7", "optim.betas": "[0.5, 0.6]", "optim.eps": "0.001",
           "optim.muon_momentum": "0.8"}
    capsys.readouterr()
    train(load_config("tiny", [*over, *(x for kv in new.items() for x in ("--" + kv[0], kv[1]))]))
    out = capsys.readouterr().err
    changed = ("optim.betas [0.9, 0.95] -> [0.5, 0.6], optim.eps 1e-08 -> 0.001, optim.weight_decay 0.1 -> 0.7, "
               "optim.muon_momentum 0.95 -> 0.8: the optimizer follows the new values from here")
    assert f"note: resuming step_2 with {changed}" in out, out
    got = _saved_group_settings(tmp_path / "run" / "checkpoints" / "step_4", tmp_path)
    assert got["weight_decay"] == 0.7 and tuple(got["betas"]) == (0.5, 0.6) and got["eps"] == 0.001, got
    if name == "muon":
        assert got["momentum"] == 0.8, got


def test_the_eta_spreads_an_eval_over_the_steps_instead_of_repeating_it(tmp_path):
    """One 0.4 s pause (an eval) in the first of four windows: the ETA took each window's pace, so the window
    with the eval predicted that pause for every remaining window (+72% right after each eval in a real run).
    It is now this process's pace so far: the pause counts once, spread over the steps done."""
    log, state = _step_log(16, 2, metrics=MetricsLogger(tmp_path, tensorboard=False))
    _steps(log, state, 8, pause=0.4, seconds=0.0)
    etas = [r["eta_sec"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    # after 2, 4, 6, 8 steps: 14, 12, 10, 8 steps left at 0.4 s / steps done (the window's pace gave 0 after it)
    assert etas == pytest.approx([14 * 0.2, 12 * 0.1, 10 * 0.4 / 6, 8 * 0.05], rel=0.15), etas


def test_the_job_status_has_the_step_from_the_first_step_on():
    """`kiln control list` showed "?/?" until the first train record (log_every steps): the status is now written
    at a process's first step too; a time budget not yet fixed has no total (it showed the placeholder)."""
    import dataclasses

    class Control:
        def __init__(self):
            self.said = []

        def status(self, **fields):
            self.said.append(fields)

    for provisional, total in ((False, 16), (True, None)):
        control = Control()
        log, state = _step_log(16, 10, control=control)
        log.plan = dataclasses.replace(log.plan, provisional=provisional)
        for _ in range(3):
            state.advance(tokens=1000, loss=1.0)
            log.step(state, lr=1e-3, grad_norm=1.0, extras={}, seconds=0.01)
        assert control.said == [{"step": 1, "total_steps": total}]


def test_the_config_of_a_run_moved_aside_by_fresh_resumes_that_run(tmp_path):
    """`--fresh` moved the run to RUN.old-<time>; `kiln train RUN.old-<time>/config.yaml` then resumed the *new*
    run in RUN (its config still named RUN as run.out_dir), under the old run's settings. It now trains where the
    file is, and says so; --fresh's line says how to resume the old run."""
    from conftest import run_kiln

    over = small_overrides(tmp_path, **{"train.max_steps": 4, "train.eval_every": 100, "train.save_every": 2})

    def kiln(*args: str):
        res = run_kiln("train", *args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    kiln("tiny", *over, "--train.stop_at_step", "2")
    fresh = kiln("tiny", *over, "--train.max_steps", "2", "--fresh")
    (old,) = tmp_path.glob("run.old-*")
    assert f"--fresh: moved the previous run to {old} (`kiln train {old}/config.yaml` resumes it there)" in fresh.stdout
    res = kiln(str(old / "config.yaml"), "--train.stop_at_step", "0")  # the saved config holds the stop
    assert f"is the config of the run in {old}: it trains there" in " ".join(res.stderr.split()), res.stderr
    assert [p.name for p in ckpt_io.list_checkpoints(old)][-1] == "step_4"
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "run")] == ["step_2"]  # the new run: untouched


def test_samples_every_n_steps_print_through_the_cli_and_leave_the_losses_as_they_were(tmp_path):
    """train.sample_every was read by nothing; a sample draws from its own generator, so the run's losses and
    weights are those of the same run without samples, bitwise."""
    from conftest import run_kiln

    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    plain.mkdir(), sampled.mkdir()
    train(load_config("tiny", small_overrides(plain, **{"train.max_steps": 6})), quiet=True)
    res = run_kiln("train", "tiny", *small_overrides(sampled, **{"train.max_steps": 6, "train.sample_every": 2,
                                                                  "train.sample_tokens": 5}), text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    shown = re.findall(r"^sample at step (\d+): It is a truth", res.stdout, re.M)  # tiny.yaml's prompt
    assert shown == ["2", "4"], res.stdout[-3000:]  # step 6 is the last: its sample is the final one
    assert "\nsample: It is a truth" in res.stdout
    assert losses(plain / "run") == losses(sampled / "run")
    wa, wb = ckpt_io.read_model_state(plain / "run"), ckpt_io.read_model_state(sampled / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_runs_config_yaml_resumes_past_a_damaged_old_checkpoint(tmp_path):
    """`kiln train RUN/config.yaml` asked whether RUN holds only weights-only checkpoints by reading every
    checkpoint's meta.json, so an old damaged one (never resumed) failed the command the run itself takes."""
    from conftest import run_kiln

    train(load_config("tiny", small_overrides(tmp_path, **{"train.max_steps": 6})), quiet=True)
    run = tmp_path / "run"
    oldest = ckpt_io.list_checkpoints(run)[0]
    (oldest / "meta.json").write_text("{broken")
    res = run_kiln("train", str(run / "config.yaml"), "--train.max_steps", "7", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ckpt_io.checkpoint_step(ckpt_io.resolve_checkpoint(run)) == 7
