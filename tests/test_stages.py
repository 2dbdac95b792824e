"""Staged data mixtures (`data.stages`): where stages start, the one-line errors, the printout, the
stage in the metrics, and resume: a two-stage run killed with SIGKILL inside a stage and across the
boundary logs every step as the uninterrupted run does; prepared-shard stages reshard to another
data-parallel size; a started stage may not change, a future one may (and the run says so).

References: an uninterrupted in-process run of the same config, and the single-rank sequence of
batches of the same stages.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch

from conftest import run_kiln
from kiln.config import DataConfig, SourceConfig, StageConfig, load_config
from kiln.data.factory import Batching, build_train_source
from kiln.data.prepare import prepare
from kiln.data.stages import stage_at, stage_starts
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import ConfigError, DataError
from kiln.train import checkpoint as ckpt_io
from kiln.train.trainer import train
from test_control import last_per_step, records_per_step, start, wait_for_step
from test_loader import write_jsonl
from test_shards import word_tokenizer
from test_train import small_overrides, write_corpus

STEPS = 16


def stages_arg(a: Path, b: Path, *, second: str = "anneal", weight: float = 0.5) -> str:
    return json.dumps([{"name": "web", "start": 0, "train": [{"path": str(a), "name": "a"}]},
                       {"name": second, "start": 0.5, "train": [{"path": str(a), "name": "a", "weight": 1 - weight},
                                                                {"path": str(b), "name": "b", "weight": weight}]}])


def staged_overrides(tmp: Path, **extra: object) -> list[str]:
    tmp.mkdir(exist_ok=True)
    a = write_corpus(tmp / "a.jsonl", seed=3)
    b = write_corpus(tmp / "b.jsonl", seed=4)
    over = small_overrides(tmp, **{"train.max_steps": STEPS, "train.save_every": 2, "train.eval_every": 1000,
                                   "train.keep_last": 2, **extra})
    i = over.index("--data.train")
    return over[:i] + over[i + 2:] + ["--data.stages", stages_arg(a, b)]


def test_stage_starts_from_fractions_and_tokens():
    frac = [StageConfig(start=0), StageConfig(start=0.5), StageConfig(start=0.9)]
    assert stage_starts(frac, total_steps=100, tokens_per_step=64) == [0, 50, 90]
    tokens = [StageConfig(start=0), StageConfig(start=6400), StageConfig(start=6401), StageConfig(start=1e9)]
    assert stage_starts(tokens, total_steps=200, tokens_per_step=64) == [0, 100, 101, 200]  # clipped to the run
    assert [stage_at([0, 50, 90], s) for s in (0, 49, 50, 89, 90, 99)] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("stages, message", [
    ('[{"start": 0.1, "train": [{"path": "a.jsonl"}]}]', r"data.stages\[0\].start: the first stage starts at 0"),
    ('[{"start": 0, "train": [{"path": "a.jsonl"}]}, {"start": 0.5, "train": []}]',
     r"data.stages\[1\].train: a stage needs at least one source"),
    ('[{"start": 0, "train": [{"path": "a.jsonl"}]}, {"start": 0.5, "train": [{"path": "a.jsonl"}]}, '
     '{"start": 5000, "train": [{"path": "a.jsonl"}]}]', "every start as a fraction .* or every start as a token"),
    ('[{"start": 0, "train": [{"path": "a.jsonl"}]}, {"start": 0.5, "train": [{"path": "a.jsonl"}]}, '
     '{"start": 0.4, "train": [{"path": "a.jsonl"}]}]', "starts must increase, got 0, 0.5, 0.4"),
])
def test_bad_stages_are_one_line(stages, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", ["--data.stages", stages])
    with pytest.raises(ConfigError, match="data.stages replaces data.train"):
        load_config("tiny", ["--data.stages", '[{"start": 0, "train": [{"path": "a.jsonl"}]}]',
                             "--data.train", '[{"path": "b.jsonl"}]'])


def test_bad_stages_on_the_command_line_exit_2_with_one_line(tmp_path):
    res = run_kiln("train", "tiny", "--run.out_dir", str(tmp_path / "run"), "--data.stages",
                   '[{"start": 0, "train": [{"path": "a.jsonl"}]}, {"start": 0.5, "trian": []}]',
                   capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "kiln: error: command line: unknown key 'data.stages[1].trian' (did you mean data.stages[1].train?)"]


@pytest.mark.slow
def test_two_stage_run_killed_inside_and_across_the_boundary_resumes_bit_for_bit(tmp_path):
    over_ref = staged_overrides(tmp_path / "ref")
    summary = train(load_config("tiny", over_ref), quiet=True)
    assert summary["step"] == STEPS
    reference = records_per_step(tmp_path / "ref" / "run")
    stages = {s: r["data_stage"] for (k, s), r in reference.items() if k == "train"}
    assert stages == {s: "web" if s <= STEPS // 2 else "anneal" for s in range(1, STEPS + 1)}

    dry = run_kiln("train", "tiny", *over_ref, "--dry-run", capture_output=True, text=True,
                   timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "data stage 0 web: steps 0-7 (from 0 tokens): a x1" in dry.stdout
    assert "data stage 1 anneal: steps 8-end (from 1,024 tokens): a x0.5, b x0.5" in dry.stdout

    over = staged_overrides(tmp_path)
    run = tmp_path / "run"
    rng = random.Random(3)
    for lo, hi in ((3, 5), (7, 10), (11, 14)):  # inside the first stage, across the boundary, inside the second
        proc = start(tmp_path, over)
        try:
            wait_for_step(run, rng.randint(lo, hi), proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert 0 < int(ckpt_io.list_checkpoints(run)[-1].name.split("_")[1]) < STEPS
    train(load_config("tiny", over), quiet=True)
    assert records_per_step(run) == reference
    assert max(last_per_step(run)) == STEPS


@pytest.mark.slow
def test_a_started_stage_may_not_change_and_a_future_one_may(tmp_path):
    over = staged_overrides(tmp_path, **{"train.stop_at_step": 4})
    train(load_config("tiny", over), quiet=True)  # stopped inside stage 0, saved at step 4
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    base = over[:over.index("--data.stages")] + ["--train.stop_at_step", "6"]
    future = base + ["--data.stages", stages_arg(a, b, weight=0.25)]
    res = run_kiln("train", "tiny", *future, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "data.stages 1 changed since the last checkpoint; the run has not reached them" in res.stdout
    assert "data stage 1 anneal: steps 8-end (from 1,024 tokens): a x0.75, b x0.25" in res.stdout
    past = base + ["--data.stages", stages_arg(b, b, weight=0.25)]  # stage 0 now reads b
    res = run_kiln("train", "tiny", *past, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout
    assert res.stderr.strip().splitlines() == [
        "kiln: error: data.stages[0] (web) changed after the run started it; a started stage must stay as it was: "
        "restore it (or pass --fresh), and change only stages the run has not reached"]
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "run")][-1] == "step_6"  # nothing lost
    plain = base + ["--data.train", json.dumps([{"path": str(a)}])]
    res = run_kiln("train", "tiny", *plain, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "data position is for data.stages, and this run has none" in res.stderr


def test_a_begun_stage_keeps_its_start_when_a_resume_changes_the_runs_length():
    """A fractional start moves with train.max_steps; the steps a run has taken do not. Plan.set_stages keeps a
    begun stage's start and begins a stage that would now start in the past at the resumed step."""
    from kiln.train.plan import make_plan

    cfg = load_config("tiny", ["--train.max_steps", "24", "--data.stages", json.dumps(
        [{"start": 0, "train": [{"path": "a.jsonl"}]}, {"start": 0.5, "train": [{"path": "a.jsonl"}]},
         {"start": 0.9, "train": [{"path": "a.jsonl"}]}])])
    plan = make_plan(cfg.model, cfg.train, cfg.optim, stages=cfg.data.stages)
    assert plan.stage_starts == [0, 12, 22]  # as this config alone places them
    plan.set_stages(cfg.data.stages, step=12, started=[0, 8, 14])  # resumed at 12 from a 16-step run
    assert plan.stage_starts == [0, 8, 22]
    plan.set_stages(cfg.data.stages, step=23, started=[0, 20, 36])  # at 23 of a 40-step run: stage 2 not begun
    assert plan.stage_starts == [0, 20, 23]


@pytest.mark.slow
def test_a_longer_resumed_run_does_not_go_back_into_a_stage_it_left(tmp_path):
    """A run stopped inside its second stage (0.5 of 16 steps: from step 8), resumed with train.max_steps 24
    (0.5 of 24: step 12), went back to the first stage for steps 13-16 and then into the second again. The
    begun stage now stays where it began, and the resume says so."""
    over = staged_overrides(tmp_path, **{"train.stop_at_step": 12})
    train(load_config("tiny", over), quiet=True)
    i = over.index("--train.stop_at_step")
    longer = [*over[:i], *over[i + 2:], "--train.max_steps", "24"]
    res = run_kiln("train", "tiny", *longer, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("note: data stage 1 (anneal) began at step 8 (data.stages[1].start 0.5 of 24 steps is step 12): a "
            "resumed run keeps the batches it drew") in res.stderr
    assert "data stage 1 anneal: steps 8-end" in res.stdout
    stages = {s: r["data_stage"] for (k, s), r in records_per_step(tmp_path / "run").items() if k == "train"}
    assert stages == {s: "web" if s <= 8 else "anneal" for s in range(1, 25)}


def test_prepared_stages_reshard_to_another_data_parallel_size(tmp_path):
    """Two stages of prepared shards (the boundary at micro-batch 6 of each rank): 2 ranks stopped
    inside the first stage and inside the second continue on 1 rank as one rank would have read."""
    tok = word_tokenizer(tmp_path / "tok.json", 32768)
    folders = []
    for name, markers in (("web", range(1000, 1100)), ("code", range(5000, 5060))):
        src = write_jsonl(tmp_path / f"{name}.jsonl", list(markers))
        prepare([SourceConfig(path=str(src), name=name)], tmp_path / name, tokenizer=tok, workers=1, shard_docs=40,
                quiet=True)
        folders.append(str(tmp_path / name))
    data = DataConfig(tokenizer=tok, format="shards", train=DataConfig().train, stages=[
        StageConfig(name="web", start=0, train=[SourceConfig(path=folders[0])]),
        StageConfig(name="mix", start=0.5, train=[SourceConfig(path=folders[0], weight=0.5),
                                                  SourceConfig(path=folders[1], weight=0.5)])])
    tokenizer = load_tokenizer(tok)

    def loaders(world: int, batch: int, steps: int):
        out = []
        for r in range(world):
            ld = build_train_source(data, tokenizer, Batching(seq_len=16, batch_size=batch, seed=5), dp_rank=r,
                                    dp_world=world)
            ld.set_starts(stage_starts(data.stages, total_steps=steps, tokens_per_step=64), accum_steps=1)
            out.append(ld)
        return out

    def rows(lds, n):  # n micro-batches per rank, rows in global order
        got = []
        for _ in range(n):
            bs = [ld.next_batch() for ld in lds]
            got += [bs[r].tokens[j] for j in range(bs[0].tokens.shape[0]) for r in range(len(lds))]
        return got

    one = loaders(1, 4, 12)
    ref = rows(one, 12)
    for stop in (3, 8):  # inside the first stage, inside the second
        two = loaders(2, 2, 12)
        head = rows(two, stop)
        states = [ld.state_dict() for ld in two]
        assert {s["stage"] for s in states} == {0 if stop < 6 else 1}
        resumed = loaders(1, 4, 12)[0]
        resumed.load_resharded_state(json.loads(json.dumps(states)))
        tail = rows([resumed], 12 - stop)
        assert len(head) + len(tail) == len(ref)
        assert all(torch.equal(x, y) for x, y in zip(head + tail, ref))
    assert not torch.equal(ref[0], ref[-1])
    with pytest.raises(DataError, match="for data.train, and this run has data.stages"):
        loaders(1, 4, 12)[0].load_state_dict(build_train_source(
            DataConfig(tokenizer=tok, format="shards", train=[SourceConfig(path=folders[0])]), tokenizer,
            Batching(seq_len=16, batch_size=4, seed=5)).state_dict())


@pytest.mark.slow
def test_a_time_budget_places_fractional_stages_on_the_steps_it_fixes(tmp_path):
    """train.time_budget + a stage at 0.5 of the run: the stage starts halfway through the steps the budget
    fixed (not the placeholder length of the timed warmup), and every record equals a run of that many
    steps without a budget: the same batches from the same stages."""
    over = staged_overrides(tmp_path, **{"train.save_every": 1000, "optim.warmup_steps": 8})
    i = over.index("--train.max_steps")
    over = over[:i] + over[i + 2:] + ["--train.time_budget", "10s"]  # the clock counts the start-up too
    res = run_kiln("train", "tiny", *over, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = ckpt_io.list_checkpoints(tmp_path / "run")[-1]
    planned = torch.load(ckpt / "state" / "common.pt", weights_only=False)["planned_steps"]
    assert planned > 20, res.stdout
    half = stage_starts([StageConfig(start=0), StageConfig(start=0.5)], total_steps=planned, tokens_per_step=128)[1]
    assert f"data stage 1 anneal: steps {half}-end" in res.stdout
    got = records_per_step(tmp_path / "run")
    stages = {s: r["data_stage"] for (k, s), r in got.items() if k == "train"}
    assert stages == {s: "web" if s <= half else "anneal" for s in range(1, max(stages) + 1)}
    ref = staged_overrides(tmp_path / "ref", **{"train.save_every": 1000, "optim.warmup_steps": 8,
                                                "train.max_steps": planned})
    train(load_config("tiny", ref), quiet=True)
    reference = records_per_step(tmp_path / "ref" / "run")

    def train_only(records: dict, last: int) -> dict:  # progress: None until the budget fixes the length
        return {k: {f: x for f, x in r.items() if f != "progress"} for k, r in records.items()
                if k[0] == "train" and k[1] <= last}

    assert train_only(got, max(stages)) == train_only(reference, max(stages))
