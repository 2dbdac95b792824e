"""Post-training run folders through the real CLI: which folder a stage writes, what it refuses to resume
(another stage's run, the source's own folder, other data, an RLVR precomputed reference), each refusal
one line on stderr, exit code 2, before anything is written."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_kiln
from kiln.config import SourceConfig
from kiln.data.cursor import DataId
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import DataError
from kiln.posttrain.chat import ChatFormat
from kiln.posttrain.commands import _stage_parser, stage_config
from kiln.posttrain.dpo import DPOObjective, PairLoader, encode_pairs
from kiln.posttrain.rewards import build_reward
from kiln.posttrain.rlvr import PromptLoader, RLVRObjective, encode_tasks
from kiln.posttrain.sft import SFTLoader, SFTObjective, encode_conversations
from kiln.train.trainer import train
from test_sft import addition_chats, base_checkpoint, jsonl, tiny_config

PREFS = [{"prompt": f"What is {i}+1?", "chosen": str(i + 1), "rejected": "no"} for i in range(4)]
TASKS = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)]


def kiln(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_kiln(*args, capture_output=True, text=True, cwd=cwd, timeout=300)


def user_error(res: subprocess.CompletedProcess) -> str:
    """The one `kiln: error:` line of a refused command (exit code 2, no traceback)."""
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stdout[-2000:] + res.stderr[-3000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), res.stderr
    return lines[0]


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def stage_data(tmp: Path, stage: str) -> Path:
    """A small data file for `stage`: chats, preference pairs or prompts."""
    rows = {"sft": [{"messages": m} for m in addition_chats(8)], "dpo": PREFS, "rlvr": TASKS}[stage]
    return jsonl(tmp / f"{stage}.jsonl", rows)


def saved_run(tmp: Path, held: str, ckpt: Path) -> Path:
    """A 1-step run of `held` (sft, dpo, rlvr or pretraining) in tmp/held, trained in-process."""
    out = tmp / held
    cfg = tiny_config(tmp, **{"run.out_dir": str(out), "train.max_steps": 1})
    if held == "pretraining":
        cfg.data.train = [SourceConfig(path=str(jsonl(tmp / "text.jsonl", [{"text": "What is 2+2? It is 4. "
                                                                             * 20}] * 20)), name="toy")]
        cfg.data.val = []
        train(cfg, quiet=True)
        return out
    cfg.run.init_from = str(ckpt)
    tok = load_tokenizer(cfg.data.tokenizer)
    fmt = ChatFormat(tok)
    records = [("t", r) for r in {"sft": [{"messages": m} for m in addition_chats(8)], "dpo": PREFS,
                                  "rlvr": TASKS}[held]]
    obj = {"sft": lambda: SFTObjective(encode_conversations(records, fmt, max_len=64)),
           "dpo": lambda: DPOObjective(encode_pairs(records, fmt, max_len=65), reference=ckpt, beta=0.1),
           "rlvr": lambda: RLVRObjective(encode_tasks(records, fmt, max_prompt_len=100), reference=ckpt,
                                         reward=build_reward(["numeric"]), tokenizer=tok, group_size=2,
                                         kl_coef=0.0, max_new_tokens=2)}[held]()
    train(cfg, objective=obj, quiet=True)
    return out


@pytest.mark.parametrize("held,stage", [("sft", "dpo"), ("rlvr", "sft"), ("dpo", "rlvr"), ("pretraining", "sft")])
def test_a_folder_holding_another_stages_run_is_refused_and_left_alone(tmp_path, held, stage):
    """`kiln dpo ... --run.out_dir SFT_RUN` once said 'preference data changed under a resume (saved None
    pairs, now 4)', sft into an RLVR run the like, and rlvr into a DPO run 'resumes a rlvr run that
    started from ...': now one line naming the folder, what it holds, and the fix."""
    ckpt = base_checkpoint(tmp_path)
    out = saved_run(tmp_path, held, ckpt)
    before = tree(out)
    err = user_error(kiln(stage, "--checkpoint", str(ckpt), "--data", str(stage_data(tmp_path, stage)),
                          "--run.out_dir", str(out), "--quiet"))
    assert err == (f"kiln: error: {out} holds a {held} run, not {stage}: pass another --run.out_dir, or --fresh to "
                   "start over (the old run is moved aside)")
    assert tree(out) == before


def test_the_source_folder_is_never_the_stages_run_folder(tmp_path):
    """An imported model's folder (a first checkpoint without a data position) as --run.out_dir: refused
    as a pretraining run; with --fresh it is the source itself, which --fresh would have moved aside."""
    ckpt = base_checkpoint(tmp_path)
    other = tmp_path / "imported"
    shutil.copytree(ckpt.parent.parent, other)
    before = tree(other)
    data = str(stage_data(tmp_path, "sft"))
    err = user_error(kiln("sft", "--checkpoint", str(ckpt), "--data", data, "--run.out_dir", str(other), "--quiet"))
    assert f"{other} holds a pretraining run, not sft: pass another --run.out_dir" in err
    err = user_error(kiln("sft", "--checkpoint", str(other), "--data", data, "--run.out_dir", str(other), "--fresh"))
    assert err.startswith(f"kiln: error: run.out_dir {other} holds the source checkpoint {other}/checkpoints/step_0")
    assert "pass another --run.out_dir" in err and "--fresh" not in err
    assert tree(other) == before and sorted(p.name for p in tmp_path.iterdir() if "imported" in p.name) == ["imported"]


def test_a_resume_on_other_data_with_as_many_records_is_refused(tmp_path):
    """The count alone let `--data other.jsonl` with as many records resume silently on other data: the
    data position now records a digest of the records, and a resume on other content is one line."""
    ckpt = base_checkpoint(tmp_path)
    first = jsonl(tmp_path / "a.jsonl", [{"messages": m} for m in addition_chats(8, seed=0)])
    other = jsonl(tmp_path / "b.jsonl", [{"messages": m} for m in addition_chats(8, seed=1)])
    out = tmp_path / "sft"
    res = kiln("sft", "--checkpoint", str(ckpt), "--data", str(first), "--run.out_dir", str(out), "--quiet",
               "--train.max_steps", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    before = tree(out / "checkpoints")
    err = user_error(kiln("sft", "--checkpoint", str(ckpt), "--data", str(other), "--run.out_dir", str(out),
                          "--quiet", "--train.max_steps", "2"))
    assert f"SFT data {other} changed under a resume (the same 8 conversations, other content" in err
    assert err.endswith("pass the data the run was trained on, or --fresh to start over")
    assert tree(out / "checkpoints") == before


@pytest.mark.parametrize("loader", ["sft", "dpo", "rlvr"])
def test_every_stages_data_position_carries_the_digest_and_old_ones_are_taken_on_trust(loader):
    items = [type("E", (), {"ids": torch.arange(n).numpy(), "mask": torch.ones(n, dtype=torch.bool).numpy()})()
             for n in (5, 9, 3, 7)]

    def make(data: DataId):
        return {"sft": lambda: SFTLoader(items, seq_len=16, batch_size=1, seed=0, pack=False, pad_id=0, data=data),
                "dpo": lambda: PairLoader(items, batch_size=1, seed=0, pad_id=0, data=data),
                "rlvr": lambda: PromptLoader(items, batch_size=1, seed=0, data=data)}[loader]()

    state = make(DataId("a.jsonl", "1" * 64)).state_dict()
    assert state["digest"] == "1" * 64
    with pytest.raises(DataError, match="b.jsonl changed under a resume .* other content.* or --fresh"):
        make(DataId("b.jsonl", "2" * 64)).load_state_dict(state)
    with pytest.raises(DataError, match="b.jsonl changed under a resume"):
        make(DataId("b.jsonl", "2" * 64)).load_resharded_state([state, state])
    old = {k: v for k, v in state.items() if k != "digest"}  # saved before the digest: its count is trusted
    make(DataId("b.jsonl", "2" * 64)).load_state_dict(old)


def test_the_default_run_folder_is_named_after_the_source_run_folder(tmp_path, monkeypatch):
    """Two `kiln train tiny --run.out_dir runs/expN` runs share run.name 'tiny': their SFT runs both went to
    runs/tiny-sft, and the collision's message suggested --fresh (moving the other experiment's SFT aside)."""
    ckpt = base_checkpoint(tmp_path)  # run.name "base"
    for exp in ("exp1", "exp2"):
        shutil.copytree(ckpt.parent.parent, tmp_path / "runs" / exp)
    data = str(stage_data(tmp_path, "sft"))
    res = kiln("sft", "--checkpoint", "runs/exp1/checkpoints/step_0", "--data", data, "--quiet",
               "--train.max_steps", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp1", "exp1-sft", "exp2"]
    monkeypatch.chdir(tmp_path)
    args, over = _stage_parser("sft", "").parse_known_args(["--checkpoint", str(tmp_path / "runs" / "exp2"),
                                                            "--data", data])
    cfg = stage_config("sft", args, over)[0]
    assert (cfg.run.name, cfg.run.out_dir) == ("exp2-sft", "runs/exp2-sft")
    # another source into that folder: resuming it, a new folder, then --fresh, in that order
    err = user_error(kiln("sft", "--checkpoint", "runs/exp2", "--data", data, "--run.out_dir", "runs/exp1-sft",
                          cwd=tmp_path))
    assert "resumes a sft run that started from" in err
    assert err.index("--checkpoint " + str(tmp_path / "runs/exp1/checkpoints/step_0")) \
        < err.index("another --run.out_dir") < err.index("--fresh")


def test_rlvr_refuses_a_precomputed_reference_and_resets_an_inherited_one(tmp_path, monkeypatch):
    """`kiln rlvr --posttrain.ref precomputed` was silently ignored (RLVR's samples are new every step, so
    its reference is always a copy): now refused in one line, as DPO's option; a DPO source's precomputed is
    reset to copy."""
    ckpt = base_checkpoint(tmp_path, **{"posttrain.ref": "precomputed"})
    data = str(stage_data(tmp_path, "rlvr"))
    out = tmp_path / "rl"
    err = user_error(kiln("rlvr", "--checkpoint", str(ckpt), "--data", data, "--run.out_dir", str(out),
                          "--posttrain.ref", "precomputed", "--quiet"))
    assert err == "kiln: error: --posttrain.ref is read by kiln dpo only; kiln rlvr would ignore it: drop it"
    assert not out.exists()
    # so is any option of another stage, and the data given twice: one of them was dropped without a word
    for stage, extra, line in [
        ("dpo", ["--posttrain.group_size", "4"], "--posttrain.group_size is read by kiln rlvr only; kiln dpo would "
                                                  "ignore it: drop it"),
        ("sft", ["--posttrain.beta", "0.5"], "--posttrain.beta is read by kiln dpo only; kiln sft would ignore it: "
                                              "drop it"),
        ("rlvr", ["--posttrain.data", "other.jsonl"], f"--data {data} and --posttrain.data other.jsonl name two "
                                                       "files; pass one of them"),
    ]:
        err = user_error(kiln(stage, "--checkpoint", str(ckpt), "--data", data, "--run.out_dir", str(out), *extra))
        assert err == f"kiln: error: {line}", err
        assert not out.exists()
    monkeypatch.chdir(tmp_path)
    args, over = _stage_parser("rlvr", "").parse_known_args(["--checkpoint", str(ckpt), "--data", data])
    assert stage_config("rlvr", args, over)[0].posttrain.ref == "copy"
