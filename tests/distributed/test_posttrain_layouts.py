"""`torchrun -m kiln sft | dpo | rlvr` against the same command in one process.

Post-training shares pretraining's engine, so it runs under the data-parallel layouts: rank r of W
takes items (SFT rows, DPO pairs, RLVR prompts) r, r+W, ... of each global batch, and every
micro-batch's summed loss is divided by the whole step's count. A distributed run must therefore log
the single-process losses (fp32; the sums run in another order, so within 1e-5 relative as in
test_train_layouts.py). DPO's frozen reference is a whole model on every rank. RLVR seeds each
prompt's samples by its place in the global stream and decodes its group alone, so it samples the
same tokens: its rewards and completion lengths (sums of small integers) are equal, not merely close.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.train.metrics import read_metrics
from kilnproc import run_kiln as kiln_process
from test_dpo import pairs_data
from test_sft import addition_chats, base_checkpoint

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def run_kiln(stage: str, nproc: int, ckpt: Path, data: Path, out: Path, *extra: str) -> None:
    launcher = [sys.executable, "-m", "kiln"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "kiln"]
    # fp32: parity at summation-order tolerance; auto would be bf16 on bf16 CPUs (FSDP: bf16 parameters)
    over = {"run.out_dir": out, "run.device": "cpu", "train.dtype": "fp32", "train.max_steps": STEPS, "train.micro_batch_size": 1,
            "train.global_batch_size": 4, "train.log_every": 1, "train.eval_every": 1000, "train.save_every": 2,
            "optim.lr": 1e-2, "optim.warmup_steps": 0, "optim.schedule": "constant"}
    cmd = [*launcher, stage, "--checkpoint", str(ckpt), "--data", str(data), "--quiet",
           *(x for k, v in over.items() for x in (f"--{k}", str(v))), *extra]
    if nproc == 1:  # the reference, forked like the suite's other commands (same thread count as the ranks')
        res = kiln_process(*cmd[len(launcher):], text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           cwd=ROOT)
    else:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]


def train_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if r.get("kind") == "train"}


def assert_close(ref: Path, run: Path, keys: tuple[str, ...], *, equal: tuple[str, ...] = (), rel: float = 1e-5) -> None:
    a, b = train_records(ref), train_records(run)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (sorted(a), sorted(b))
    for step in a:
        for k in keys:
            x, y = a[step][k], b[step][k]
            assert abs(x - y) <= rel * abs(x) + 1e-7, (k, step, x, y)
        for k in equal:
            assert a[step][k] == b[step][k], (k, step, a[step][k], b[step][k])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("posttrain")
    ckpt = base_checkpoint(tmp)
    chats, pairs, prompts = tmp / "chats.jsonl", tmp / "pairs.jsonl", tmp / "prompts.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in addition_chats(40)))
    pairs.write_text("".join(json.dumps(p) + "\n" for p in pairs_data(40)))
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "answer": str(i + 1)}) + "\n"
                               for i in range(7)))  # 7 prompts, 4 per step: steps cross epochs
    return ckpt, chats, pairs, prompts


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_sft_fsdp_matches_one_process(base, tmp_path):
    ckpt, chats, _, _ = base
    run_kiln("sft", 1, ckpt, chats, tmp_path / "one")
    run_kiln("sft", 2, ckpt, chats, tmp_path / "fsdp", "--parallel.dp_shard", "2")
    assert_close(tmp_path / "one", tmp_path / "fsdp", ("loss", "grad_norm"))
    # and the 2-rank run resumes in one process from its step-2 checkpoint to the same losses
    resumed = tmp_path / "resumed"
    run_kiln("sft", 2, ckpt, chats, resumed, "--parallel.dp_shard", "2", "--train.stop_at_step", "2")
    run_kiln("sft", 1, ckpt, chats, resumed)
    assert_close(tmp_path / "one", resumed, ("loss",))


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_dpo_ddp_matches_one_process(base, tmp_path):
    ckpt, _, pairs, _ = base
    run_kiln("dpo", 1, ckpt, pairs, tmp_path / "one")
    run_kiln("dpo", 2, ckpt, pairs, tmp_path / "ddp", "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1")
    recs = train_records(tmp_path / "one")
    assert any(k.startswith("dpo") or "margin" in k for k in recs[1]), recs[1].keys()
    keys = ("loss", *(k for k in recs[1] if "margin" in k or "accuracy" in k))
    assert_close(tmp_path / "one", tmp_path / "ddp", keys)


# a random tiny policy writes an "e" in about a third of its 4-token completions: most groups mix
# rewards from the first step on (a real policy gradient; where none does, the gradient is only the KL
# term's rounding noise at the reference, which Adam would blow up differently on each layout), and
# kl_coef > 0 adds the frozen reference on every rank
RLVR = ("--posttrain.group_size", "4", "--posttrain.max_new_tokens", "4", "--posttrain.rewards", '["regex:e"]',
        "--posttrain.kl_coef", "0.1")
RLVR_KEYS = ("loss", "kl", "grad_norm", "group_reward_std")  # fp32 sums of fractions: in another order
RLVR_EQUAL = ("reward", "completion_len")  # sums of small integers: exact in any order


def _check_rlvr_learns_something(run: Path) -> None:
    recs = train_records(run)
    assert any(0 < r["group_reward_std"] for r in recs.values()), recs  # some groups had a signal
    assert any(r["kl"] > 0 for r in recs.values())  # the policy moved


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_rlvr_fsdp_matches_one_process_and_resumes_on_one(base, tmp_path):
    """The single process takes all 4 prompts of a step in one micro-batch, each FSDP rank 1 per
    micro-batch: the same samples anyway. Saved on 2 ranks at step 2, resumed in one process."""
    ckpt, _, _, prompts = base
    run_kiln("rlvr", 1, ckpt, prompts, tmp_path / "one", *RLVR, "--train.micro_batch_size", "4")
    _check_rlvr_learns_something(tmp_path / "one")
    run_kiln("rlvr", 2, ckpt, prompts, tmp_path / "fsdp", *RLVR, "--parallel.dp_shard", "2")
    # rel 1e-4 as for tp below: the kl and a grad norm that is the KL term's alone are small results of
    # larger fp32 log-probs, summed in another order (measured in CI: 1.5e-5 on kl, 3.4e-5 on a grad norm)
    assert_close(tmp_path / "one", tmp_path / "fsdp", RLVR_KEYS, equal=RLVR_EQUAL, rel=1e-4)
    resumed = tmp_path / "resumed"
    run_kiln("rlvr", 2, ckpt, prompts, resumed, *RLVR, "--parallel.dp_shard", "2", "--train.stop_at_step", "2")
    run_kiln("rlvr", 1, ckpt, prompts, resumed, *RLVR)
    assert_close(tmp_path / "one", resumed, RLVR_KEYS, equal=RLVR_EQUAL, rel=1e-4)


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_rlvr_ddp_and_tp_match_one_process(base, tmp_path):
    """DDP decodes with the replica itself; tensor parallelism (both ranks take the same prompts)
    with a gathered copy, and pads its batches to a length divisible by parallel.tp."""
    ckpt, _, _, prompts = base
    run_kiln("rlvr", 1, ckpt, prompts, tmp_path / "one", *RLVR)
    run_kiln("rlvr", 2, ckpt, prompts, tmp_path / "ddp", *RLVR, "--parallel.dp_replicate", "2",
             "--parallel.dp_shard", "1")
    assert_close(tmp_path / "one", tmp_path / "ddp", RLVR_KEYS, equal=RLVR_EQUAL)
    run_kiln("rlvr", 2, ckpt, prompts, tmp_path / "tp", *RLVR, "--parallel.tp", "2")
    # the KL compares the sharded policy's log-probs with the plain reference's: their last-bit
    # differences are relative to the small log-ratio (kl ~ ratio^2 / 2), not to the log-probs
    # (measured: 1.7e-5 on kl, 4e-5 on a step's grad norm that is the KL term's alone)
    assert_close(tmp_path / "one", tmp_path / "tp", RLVR_KEYS, equal=RLVR_EQUAL, rel=1e-4)
