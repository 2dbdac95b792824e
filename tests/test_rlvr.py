"""RLVR: verifiers, group advantages, the policy-gradient loss against a hand-built surrogate, a toy task."""

from __future__ import annotations

import random

import pytest
import torch

from kiln.data.tokenizer import load_tokenizer
from kiln.errors import ConfigError
from kiln.eval.loss import token_logps
from kiln.model import build_model
from kiln.posttrain.chat import ChatFormat
from kiln.posttrain.rewards import RewardError, build_reward, extract_number, numeric_match
from kiln.posttrain.rlvr import (
    PromptBatch,
    PromptLoader,
    RLVRObjective,
    completion_batch,
    encode_tasks,
    group_advantages,
)
from kiln.train import checkpoint as ckpt_io
from kiln.train.metrics import read_metrics
from kiln.train.trainer import train
from test_sft import BASE_LR, base_checkpoint, jsonl, run_stage, tiny_config, tiny_tokenizer


def test_numeric_verifier():
    assert extract_number("so 3 apples, then 1,234.") == 1234
    assert numeric_match("", "The answer is 1,234.", "She has 1000 + 234 = 1234\n#### 1,234") == 1.0
    assert numeric_match("", "-3.50", "-3.5") == 1.0
    assert numeric_match("", "72 or 73", "#### 72") == 0.0  # the last number counts
    assert numeric_match("", "no idea", "5") == 0.0
    assert numeric_match("", "5", "no number") == 0.0


def test_reward_specs(tmp_path):
    f = tmp_path / "verify.py"
    f.write_text("def score(prompt, completion, answer):\n    return len(completion) / 10\n"
                 "def broken(prompt, completion, answer):\n    return 1 / 0\n"
                 "def text(prompt, completion, answer):\n    return 'yes'\n")
    r = build_reward(["numeric", "0.5*regex:^\\d+$", f"python:{f}:score"])
    assert r("p", "42", "42") == pytest.approx(1.0 + 0.5 + 0.2)
    assert r("p", "x 41", "42") == pytest.approx(0.4)
    assert build_reward(["exact"])("p", " hi ", "hi") == 1.0
    assert build_reward(["contains"])("p", "I say hi!", "hi") == 1.0
    assert build_reward(["python:math:isclose"]) is not None  # an import string works too
    with pytest.raises(RewardError, match="ZeroDivisionError"):
        build_reward([f"python:{f}:broken"])("p", "c", "a")
    with pytest.raises(RewardError, match="finite number"):
        build_reward([f"python:{f}:text"])("p", "c", "a")
    with pytest.raises(ConfigError, match="unknown verifier"):
        build_reward(["numbers"])
    with pytest.raises(ConfigError, match="invalid pattern"):
        build_reward(["regex:("])
    with pytest.raises(ConfigError, match="no function nope"):
        build_reward([f"python:{f}:nope"])


def test_group_advantages_closed_form():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4, eps=1e-4)
    # group 1: mean 0.5, population std 0.5, so (r - 0.5) / (0.5 + eps)
    h = 0.5 / (0.5 + 1e-4)
    assert a[:4].tolist() == pytest.approx([h, -h, -h, h], rel=1e-6)
    assert a[4:].tolist() == [0.0] * 4  # equal rewards: no signal


def test_completion_batch_targets_only_the_completion():
    tok, tgt = completion_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert tok.tolist() == [[5, 6, 7, 1], [8, 3, 4, 0]]
    assert tgt.tolist() == [[-100, -100, 1, 2], [3, 4, 9, -100]]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_loss_gradient_is_the_group_relative_policy_gradient(tmp_path, temperature):
    """At the reference the k3 KL term has zero gradient; what remains is -sum_i A_i mean_t grad log p,
    with log p that of the sampling distribution (logits / temperature)."""
    ckpt = base_checkpoint(tmp_path)
    tok = load_tokenizer(str(tmp_path / "tok"))
    tasks = encode_tasks([("t", {"prompt": f"What is {i}+1?", "answer": str(i + 1)}) for i in range(3)],
                         ChatFormat(tok), max_prompt_len=100)
    model, _, _ = ckpt_io.load_for_inference(ckpt)
    model.train()
    reward = build_reward(["regex:[0-4]"])
    obj = RLVRObjective(tasks, reference=ckpt, reward=reward, tokenizer=tok, group_size=4, kl_coef=0.5,
                        max_new_tokens=6, temperature=temperature)
    obj.setup(model, device=torch.device("cpu"))
    batch = PromptBatch(tasks, seeds=[36, 37, 38])  # seeds under which every group has both outcomes
    loss, extras = obj.loss(model, batch)
    assert extras["kl"].item() == pytest.approx(0.0, abs=1e-6)
    got = torch.autograd.grad(loss, list(model.parameters()))

    outs = obj.sample(model, tasks, n=4, temperature=temperature, seeds=batch.seeds)  # the same completions
    rewards = torch.tensor([reward(t.text, obj.completions_text(t.prompt, o), t.answer)
                            for t, o in zip([t for t in tasks for _ in range(4)], outs)])
    assert extras["reward"].item() == pytest.approx(rewards.sum().item())
    assert 0 < rewards.sum() < len(rewards)  # both outcomes occur, so the gradient is not trivially zero
    adv = group_advantages(rewards, 4)
    tk, tg = completion_batch([t.prompt for t in tasks for _ in range(4)], outs, pad_id=tok.eos_id)
    mask = (tg != -100).float()
    logits = model(tk).float() / temperature  # (N, T, V): the distribution the completions were drawn from
    logp = torch.log_softmax(logits, -1).gather(-1, tg.clamp(min=0)[..., None]).squeeze(-1) * mask
    surrogate = -(adv * logp.sum(1) / mask.sum(1)).sum()
    want = torch.autograd.grad(surrogate, list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    if temperature != 1.0:  # the temperature matters: log p of the raw logits gives another gradient
        raw = token_logps(model, tk, tg)
        other = torch.autograd.grad(-(adv * (raw * mask).sum(1) / mask.sum(1)).sum(), list(model.parameters()))
        assert max((g - o).abs().max().item() for g, o in zip(got, other)) > 1e-3


def test_prompt_draws_are_seeded_by_their_place_in_the_global_stream(tmp_path):
    """One process with 4 prompts per micro-batch and 2 ranks with 2 each draw the same (prompt, seed)
    pairs at each step, also after a reshard from 2 ranks to 1; a group's samples do not depend on the
    other prompts of its micro-batch. (The torchrun runs are tests/distributed/test_posttrain_layouts.py.)"""
    tok = load_tokenizer(tiny_tokenizer(tmp_path / "tok"))
    tasks = encode_tasks([("t", {"prompt": f"What is {i}+1?", "answer": str(i + 1)}) for i in range(5)],
                         ChatFormat(tok), max_prompt_len=100)

    def draws(batch: PromptBatch) -> list[tuple[str, int]]:
        return sorted((t.text, s) for t, s in zip(batch.tasks, batch.seeds))

    one = PromptLoader(tasks, batch_size=4, seed=0, global_batch=4)
    two = [PromptLoader(tasks, batch_size=2, seed=0, rank=r, world_size=2, global_batch=4) for r in range(2)]
    for step in range(3):  # 5 prompts, 4 per step: steps cross epoch boundaries
        want, got = one.next_batch(), [ld.next_batch() for ld in two]
        assert want.step == step and [b.step for b in got] == [step, step]
        assert draws(want) == sorted(d for b in got for d in draws(b))
        assert len(set(want.seeds)) == 4
    resumed = PromptLoader(tasks, batch_size=4, seed=0, global_batch=4)
    resumed.load_resharded_state([ld.state_dict() for ld in two])
    want, got = one.next_batch(), resumed.next_batch()
    assert (want.seeds, want.step) == (got.seeds, got.step) and draws(want) == draws(got)

    model = build_model(tiny_config(tmp_path).model, seed=0)
    obj = RLVRObjective(tasks, reference=None, reward=build_reward(["numeric"]), tokenizer=tok, group_size=3,
                        kl_coef=0.0, max_new_tokens=5)
    whole = obj.sample(model, want.tasks, n=3, temperature=1.0, seeds=want.seeds)
    halves = [o for i in (0, 2) for o in obj.sample(model, want.tasks[i:i + 2], n=3, temperature=1.0,
                                                     seeds=want.seeds[i:i + 2])]
    assert whole == halves and len(whole) == 12


def test_prompt_loader_ranks_split_the_single_process_stream(tmp_path):
    """2 prompts on 3 ranks: rank 2 takes its first prompt from the second epoch."""
    from kiln.errors import DataError

    tok = load_tokenizer(tiny_tokenizer(tmp_path / "tok"))
    tasks = encode_tasks([("t", {"prompt": f"hi {i}", "answer": "1"}) for i in range(2)], ChatFormat(tok),
                         max_prompt_len=100)
    one = PromptLoader(tasks, batch_size=3, seed=0)
    three = [PromptLoader(tasks, batch_size=1, seed=0, rank=r, world_size=3) for r in range(3)]
    for _ in range(3):
        assert one.cursor.take(3) == [x for ld in three for x in ld.cursor.take(1)]
    with pytest.raises(DataError, match="no prompts"):
        PromptLoader([], batch_size=1, seed=0)


@pytest.mark.slow
def test_rlvr_raises_the_reward_with_the_default_lr_derived_from_the_checkpoint(tmp_path):
    """`kiln sft` then `kiln rlvr`, both with no --optim.lr: SFT teaches 'reply with one digit' (about
    uniform), RLVR with an exact-match verifier for 7 makes 7 likely. RLVR's rate is derived from the
    pretraining peak that SFT recorded, not from SFT's own rate. With the fixed 1e-6 kiln used before,
    the reward stays at about 0.1 over the 20 steps (measured: 0.05 ... 0.14)."""
    ckpt = base_checkpoint(tmp_path, **{"optim.lr": BASE_LR})
    prompts = ["Say a digit.", "A digit please.", "Give me a number.", "Say it."]
    rng = random.Random(0)
    chats = [{"messages": [{"role": "user", "content": rng.choice(prompts)},
                           {"role": "assistant", "content": str(rng.randint(0, 9))}]} for _ in range(400)]
    run_stage("sft", ckpt, jsonl(tmp_path / "chats.jsonl", chats), tmp_path / "sft", "--train.max_steps", "60",
              "--train.micro_batch_size", "8", "--train.global_batch_size", "8")
    tasks = jsonl(tmp_path / "rl.jsonl", [{"prompt": p, "answer": "7"} for p in prompts])
    out = run_stage("rlvr", tmp_path / "sft", tasks, tmp_path / "rl", "--train.max_steps", "20",
                    "--posttrain.rewards", '["exact"]', "--posttrain.max_new_tokens", "4", "--posttrain.group_size", "8")
    factor = (4096 / 48) ** 1.5 / 1000
    assert (f"kiln rlvr: optim.lr {BASE_LR * factor:.3g}: pretraining peak {BASE_LR:.3g} (posttrain.pretrain_lr of "
            in out)
    rewards = [r["reward"] for r in read_metrics(tmp_path / "rl") if r["kind"] == "train"]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"training reward {first:.3f} (first 5 steps) -> {last:.3f} (last 5): {[round(r, 3) for r in rewards]}")
    assert first < 0.35 and last > first + 0.3


def test_rlvr_resume_replays_the_same_samples(tmp_path):
    """The sampling seed is part of the loader state and the reference is reloaded from its checkpoint,
    so 2 steps + resume + 2 steps equals 4 steps (losses, rewards)."""
    ckpt = base_checkpoint(tmp_path)
    tok = load_tokenizer(str(tmp_path / "tok"))
    tasks = encode_tasks([("t", {"prompt": f"What is {i}+1?", "answer": str(i + 1)}) for i in range(5)],
                         ChatFormat(tok), max_prompt_len=100)

    def run(out: str, stop: int = 0) -> list[tuple]:
        obj = RLVRObjective(tasks, reference=ckpt, reward=build_reward(["regex:[0-4]"]), tokenizer=tok,
                            group_size=4, kl_coef=0.1, max_new_tokens=6)
        cfg = tiny_config(tmp_path, **{"run.out_dir": str(tmp_path / out), "run.init_from": str(ckpt),
                                       "train.max_steps": 4, "train.stop_at_step": stop, "train.save_every": 2,
                                       "train.micro_batch_size": 2, "train.global_batch_size": 2, "optim.lr": 1e-2})
        train(cfg, objective=obj, quiet=True)
        return [(r["step"], r["loss"], r["reward"], r["kl"]) for r in read_metrics(tmp_path / out)
                if r["kind"] == "train"]

    full = run("a")
    run("b", stop=2)
    assert run("b") == full and len(full) == 4
    assert any(r[2] > 0 for r in full) and any(r[3] > 0 for r in full)  # rewarded samples; the policy moved


def test_rlvr_prints_its_eval_reward_not_a_negated_loss(tmp_path):
    """The console's eval line read `eval_loss -0.0000` (the negated mean reward kept for keep_best); it now
    shows the reward itself, as the metrics record names it."""
    from conftest import run_kiln

    ckpt = base_checkpoint(tmp_path)
    tasks = jsonl(tmp_path / "rl.jsonl", [{"prompt": "Say 7.", "answer": "7"}] * 4)
    res = run_kiln("rlvr", "--checkpoint", str(ckpt), "--data", str(tasks), "--val-data", str(tasks),
                   "--run.out_dir", str(tmp_path / "rl"), "--train.max_steps", "1", "--posttrain.group_size", "2",
                   "--posttrain.max_new_tokens", "2", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                   capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    evals = [ln for ln in res.stdout.splitlines() if ln.startswith("step ") and "eval_" in ln]
    assert evals and all("eval_reward " in ln and "eval_loss" not in ln for ln in evals), res.stdout[-2000:]
    record = [r for r in read_metrics(tmp_path / "rl") if r["kind"] == "eval"][-1]
    assert f"eval_reward {record['eval_reward']:.4f}" in evals[-1]


def test_rlvr_refuses_greedy_sampling_which_trains_nothing(tmp_path):
    """With temperature 0 every completion of a group is the same: equal rewards, zero advantages, and the run
    trained nothing (its log-probabilities were also divided by 0). Refused before the reference loads."""
    from conftest import run_kiln

    ckpt = base_checkpoint(tmp_path)
    tasks = jsonl(tmp_path / "rl.jsonl", [{"prompt": "Say 7.", "answer": "7"}] * 4)
    res = run_kiln("rlvr", "--checkpoint", str(ckpt), "--data", str(tasks), "--run.out_dir", str(tmp_path / "rl"),
                   "--posttrain.temperature", "0", capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "kiln: error: posttrain.temperature 0 samples one completion per prompt G times, so a group's rewards are "
        "equal and nothing trains; use > 0 (default 1.0)"], res.stderr[-2000:]
    assert not (tmp_path / "rl").exists()


def test_verifier_edges_penalties_commas_and_what_a_verifier_returns(tmp_path):
    """A negative weight was "unknown verifier"; a regex with a comma was split into pieces without a hint; a
    numpy scalar was "not a finite number", a bool said nothing useful, and sys.exit() in a verifier ended the
    run with no word."""
    import numpy as np

    f = tmp_path / "v.py"
    f.write_text("import sys\nimport numpy as np\n"
                 "def np32(p, c, a):\n    return np.float32(0.5)\n"
                 "def yes(p, c, a):\n    return a in c\n"
                 "def quit(p, c, a):\n    sys.exit(3)\n")
    assert build_reward(["numeric", "-0.5*contains"])("p", "7", "7") == pytest.approx(0.5)
    with pytest.raises(ConfigError, match=r"unknown verifier '3}'.*split at every comma: .*JSON list"):
        build_reward(["regex:\\d{1", "3}"])  # what --posttrain.rewards 'regex:\d{1,3}' became
    assert build_reward([f"python:{f}:np32"])("p", "c", "a") == pytest.approx(np.float32(0.5))
    with pytest.raises(RewardError, match=r"returned True, a bool; return a number"):
        build_reward([f"python:{f}:yes"])("p", "7", "7")
    with pytest.raises(RewardError, match=r"raised SystemExit: 3"):
        build_reward([f"python:{f}:quit"])("p", "c", "a")


def test_rlvr_names_its_own_verifiers_and_checks_its_reply_length_first(tmp_path, capsys):
    """An RLVR run started from another RLVR run's checkpoint ran that run's python: verifier (code chosen by
    whoever made the checkpoint, resolved from the current folder) without the command naming it. A
    posttrain.max_new_tokens past the context was said as the first record's fault ("-98976 tokens left")."""
    from kiln.cli import main
    from kiln.posttrain.commands import _stage_tree

    marker = tmp_path / "ran"
    (tmp_path / "v.py").write_text(f"def f(p, c, a):\n    open({str(marker)!r}, 'w').close()\n    return 1.0\n")
    ckpt = base_checkpoint(tmp_path, **{"posttrain.rewards": [f"python:{tmp_path / 'v.py'}:f"]})
    tasks = jsonl(tmp_path / "rl.jsonl", [{"prompt": "Say 7.", "answer": "7"}] * 4)

    class Args:
        data, val_data = str(tasks), ""

    cfg, _, _ = _stage_tree("rlvr", ckpt, Args(), [])
    assert cfg.posttrain.rewards == ["numeric"] and not marker.exists()
    assert main(["rlvr", "--checkpoint", str(ckpt), "--data", str(tasks), "--run.out_dir", str(tmp_path / "rl"),
                 "--posttrain.max_new_tokens", "5000"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "kiln: error: posttrain.max_new_tokens 5000 leaves no room for a prompt within model.max_seq_len (128)")
    assert not (tmp_path / "rl").exists()
