"""DPO / APO: closed-form losses, response-only log-probs, a toy preference set, reference modes, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_kiln
from kiln.data.tokenizer import load_tokenizer
from kiln.model import build_model
from kiln.posttrain.chat import ChatFormat
from kiln.posttrain.dpo import DPOObjective, encode_pairs, make_pair_batch, preference_loss, sequence_logps
from kiln.train.metrics import read_metrics
from kiln.train.trainer import train
from test_sft import BASE_LR, base_checkpoint, jsonl, run_stage, tiny_config, tiny_tokenizer


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_losses_match_their_closed_forms():
    c = torch.tensor([2.0, -1.0, 0.5])
    r = torch.tensor([-1.0, 0.5, 0.5])
    beta = 0.3
    for i in range(3):
        ci, ri = c[i].item(), r[i].item()
        want = {"sigmoid": -math.log(sig(beta * (ci - ri))),
                "apo_zero": (1 - sig(beta * ci)) + sig(beta * ri),
                "apo_down": sig(beta * ci) + (1 - sig(beta * (ci - ri)))}
        for kind, v in want.items():
            assert preference_loss(c, r, beta=beta, kind=kind)[i].item() == pytest.approx(v, rel=1e-6)
    # at the reference (c = r = 0) sigmoid DPO is log 2 and APO-zero is 1
    z = torch.zeros(1)
    assert preference_loss(z, z, beta=0.1, kind="sigmoid").item() == pytest.approx(math.log(2))
    assert preference_loss(z, z, beta=0.1, kind="apo_zero").item() == pytest.approx(1.0)


def pairs_data(n: int, seed: int = 0) -> list[dict]:
    """Toy preferences: the right sum is preferred over a wrong one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = torch.randint(0, 5, (2,), generator=g).tolist()
        out.append({"prompt": f"What is {a}+{b}?", "chosen": f"{a + b}", "rejected": f"{(a + b + 3) % 10} no"})
    return out


def test_log_probs_count_only_the_response_tokens(tmp_path):
    tok = load_tokenizer(tiny_tokenizer(tmp_path / "tok"))
    fmt = ChatFormat(tok)
    pairs = encode_pairs([(f"r{i}", p) for i, p in enumerate(pairs_data(3))], fmt, max_len=64)
    batch = make_pair_batch(pairs, pad_id=tok.eos_id)
    model = build_model(tiny_config(tmp_path).model, seed=0).eval()
    with torch.no_grad():
        got = sequence_logps(model, batch.tokens, batch.targets)  # (6,)
        for row, enc in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
            ids = torch.tensor(enc.ids)
            logp = F.log_softmax(model(ids[None, :-1])[0], dim=-1)  # alone, unpadded
            prompt_len = len(fmt.prompt_ids([{"role": "user", "content": pairs_data(3)[row % 3]["prompt"]}]))
            want = sum(logp[j - 1, ids[j]].item() for j in range(prompt_len, len(ids)))
            assert got[row].item() == pytest.approx(want, abs=1e-4)
            assert tok.decode(ids[prompt_len:].tolist()).endswith("</s>")


@pytest.mark.parametrize("kind", ["sigmoid", "apo_zero"])
def test_dpo_raises_margin_and_accuracy(tmp_path, kind):
    ckpt = base_checkpoint(tmp_path)
    tok = load_tokenizer(str(tmp_path / "tok"))
    fmt = ChatFormat(tok)
    train_pairs = encode_pairs([("t", p) for p in pairs_data(32)], fmt, max_len=65)
    val_pairs = encode_pairs([("v", p) for p in pairs_data(16, seed=1)], fmt, max_len=65)
    cfg = tiny_config(tmp_path, **{"run.out_dir": str(tmp_path / "dpo"), "run.init_from": str(ckpt),
                                   "train.max_steps": 12, "train.eval_every": 12, "optim.lr": 5e-3})
    obj = DPOObjective(train_pairs, val_pairs, reference=ckpt, beta=0.5, kind=kind)
    train(cfg, objective=obj, quiet=True)
    ev = [r for r in read_metrics(tmp_path / "dpo") if r["kind"] == "eval"]
    first, last = ev[0], ev[-1]
    assert first["eval_rewards/margin"] == 0.0 and first["eval_rewards/accuracy"] == 0.0  # policy == reference
    assert first["eval_loss"] == pytest.approx(math.log(2) if kind == "sigmoid" else 1.0, rel=1e-6)
    assert last["eval_rewards/margin"] > 0.5 and last["eval_rewards/accuracy"] >= 0.9
    assert last["eval_loss"] < first["eval_loss"]
    tr = [r for r in read_metrics(tmp_path / "dpo") if r["kind"] == "train"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= tr[-1].keys()
    if kind == "apo_zero":  # APO-zero raises the chosen likelihood itself, not only the gap
        assert last["eval_rewards/chosen"] > 0


def test_dpo_raises_the_margin_with_the_default_lr_derived_from_the_checkpoint(tmp_path):
    """No --optim.lr (and DPO's other defaults: beta 0.1, 10 warmup steps): the reward margin on
    held-out pairs rises within 20 steps (measured: 0 -> 1.52); with the fixed 5e-7 kiln used before,
    it stays at 5e-4 (its accuracy is 1.0 too: any positive margin counts, so the margin is the test)."""
    ckpt = base_checkpoint(tmp_path, **{"optim.lr": BASE_LR})
    data, val = jsonl(tmp_path / "pairs.jsonl", pairs_data(32)), jsonl(tmp_path / "val.jsonl", pairs_data(16, seed=1))
    out = run_stage("dpo", ckpt, data, tmp_path / "dpo", "--val-data", str(val), "--train.max_steps", "20",
                    "--train.eval_every", "20")
    assert f"kiln dpo: optim.lr {BASE_LR:.3g}: pretraining peak" in out  # min(1, 85^1.5 / 600) = 1 at width 48
    ev = [r for r in read_metrics(tmp_path / "dpo") if r["kind"] == "eval"]
    assert ev[0]["eval_rewards/margin"] == 0.0
    assert ev[-1]["eval_rewards/margin"] > 0.2 and ev[-1]["eval_rewards/accuracy"] >= 0.8, ev[-1]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_precomputed_reference_equals_the_frozen_copy(tmp_path, dtype):
    """Also under bf16 autocast (train.dtype=bf16; the CUDA default is the same): the reference's
    log-probs are computed under the trainer's autocast, so at step 0 the policy equals them (log 2)."""
    ckpt = base_checkpoint(tmp_path)
    tok = load_tokenizer(str(tmp_path / "tok"))
    pairs = pairs_data(8)
    losses = {}
    for mode in ("copy", "precomputed"):
        data = encode_pairs([("t", p) for p in pairs], ChatFormat(tok), max_len=65)
        cfg = tiny_config(tmp_path, **{"run.out_dir": str(tmp_path / mode), "run.init_from": str(ckpt),
                                       "train.max_steps": 3, "optim.lr": 5e-3, "train.dtype": dtype})
        train(cfg, objective=DPOObjective(data, None, reference=ckpt, beta=0.5, precompute=mode == "precomputed",
                                          batch_size=4), quiet=True)
        losses[mode] = [r["loss"] for r in read_metrics(tmp_path / mode) if r["kind"] == "train"]
    assert losses["copy"] == pytest.approx(losses["precomputed"], rel=1e-5)
    assert losses["copy"][0] == pytest.approx(math.log(2), rel=1e-6)
    assert losses["precomputed"][0] == pytest.approx(math.log(2), rel=1e-6)


def test_reference_stores_linear_weights_in_the_autocast_dtype_with_identical_log_probs(tmp_path):
    from kiln.posttrain.dpo import load_reference

    ckpt = base_checkpoint(tmp_path)
    tok = load_tokenizer(str(tmp_path / "tok"))
    batch = make_pair_batch(encode_pairs([("t", p) for p in pairs_data(4)], ChatFormat(tok), max_len=65),
                            pad_id=tok.eos_id)
    policy = build_model(tiny_config(tmp_path).model, seed=0)
    full = load_reference(ckpt, device=torch.device("cpu"), like=policy)
    half = load_reference(ckpt, device=torch.device("cpu"), like=policy, autocast_dtype=torch.bfloat16)
    assert full.layers["0"].attn.wq.weight.dtype == torch.float32
    assert half.layers["0"].attn.wq.weight.dtype == torch.bfloat16 and half.layers["1"].mlp.w_up.weight.dtype == torch.bfloat16
    assert half.tok_emb.weight.dtype == torch.float32 and half.norm.weight.dtype == torch.float32
    assert half.rope.inv_freq.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(sequence_logps(full, batch.tokens, batch.targets),
                           sequence_logps(half, batch.tokens, batch.targets))
    weights = sum(p.numel() * p.element_size() for p in half.parameters())
    assert weights < 0.75 * sum(p.numel() * p.element_size() for p in full.parameters())


def test_a_response_that_repeats_the_prompt_is_the_same_pair(tmp_path):
    """UltraFeedback-binarized layout: chosen / rejected are whole conversations starting with the prompt."""
    tok = load_tokenizer(tiny_tokenizer(tmp_path / "tok"))
    fmt = ChatFormat(tok)
    short = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5 no"}
    full = {"prompt": "What is 2+2?",
            "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5 no"}]}
    a, b = encode_pairs([("a", short), ("b", full)], fmt, max_len=65)
    for x, y in ((a.chosen, b.chosen), (a.rejected, b.rejected)):
        assert x.ids.tolist() == y.ids.tolist() and x.mask.tolist() == y.mask.tolist()


def test_pair_loader_ranks_split_the_single_process_stream(tmp_path):
    """3 pairs on 4 ranks: rank 3 takes its first pair from the second epoch; each step's pairs over
    the ranks are the single process's; the position reshards from 4 ranks to 2."""
    from kiln.posttrain.dpo import PairLoader

    tok = load_tokenizer(tiny_tokenizer(tmp_path / "tok"))
    pairs = encode_pairs([("t", p) for p in pairs_data(3)], ChatFormat(tok), max_len=65)

    one = PairLoader(pairs, batch_size=4, seed=0, pad_id=0)
    four = [PairLoader(pairs, batch_size=1, seed=0, pad_id=0, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        want = one.cursor.take(4)
        assert want == [x for ld in four for x in ld.cursor.take(1)]
    two = [PairLoader(pairs, batch_size=2, seed=0, pad_id=0, rank=r, world_size=2) for r in range(2)]
    for ld in two:
        ld.load_resharded_state([ld4.state_dict() for ld4 in four])
    want = one.cursor.take(4)
    a, b = two[0].cursor.take(2), two[1].cursor.take(2)  # rank r of 2 takes positions r, r+2 of the step
    assert want == [a[0], b[0], a[1], b[1]]
    assert one.next_batch().tokens.shape[0] == 2 * 4 and two[1].next_batch().tokens.shape[0] == 2 * 2


def test_cli_rejects_incomplete_pairs(tmp_path):
    ckpt = base_checkpoint(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "yes"}) + "\n")
    res = run_kiln("dpo", "--checkpoint", str(ckpt), "--data", str(bad), "--run.out_dir",
                   str(tmp_path / "d"), capture_output=True, text=True)
    assert res.returncode == 2 and f"{bad}:1: a preference record needs" in res.stderr


def test_a_resume_keeps_the_reference_it_started_with(tmp_path):
    """The source run gains a checkpoint between two invocations: resuming the DPO run still uses (and
    reports) the checkpoint it started from; naming another checkpoint explicitly is an error."""
    import shutil

    from kiln.errors import ConfigError
    from kiln.posttrain.commands import _stage_parser, stage_config
    from kiln.train import checkpoint as ckpt_io

    first = base_checkpoint(tmp_path).resolve()
    base_run = first.parent.parent
    out = tmp_path / "dpo"

    def config(checkpoint, *extra):
        args, over = _stage_parser("dpo", "").parse_known_args(["--checkpoint", str(checkpoint), "--data", "x.jsonl",
                                                                 "--run.out_dir", str(out), *extra])
        return stage_config("dpo", args, over)

    cfg, ckpt, _ = config(base_run)
    assert ckpt == first and cfg.run.init_from == str(first)
    model = build_model(cfg.model, seed=0)
    ckpt_io.save_checkpoint(out / "checkpoints", 2, model=model, cfg=cfg, train_state={}, meta={"tokens_seen": 0})
    later = ckpt_io.save_checkpoint(base_run / "checkpoints", 5, model=model, cfg=ckpt_io.read_config(first),
                                    train_state={}, meta={"tokens_seen": 0}).resolve()
    cfg, ckpt, _ = config(base_run)  # the run folder now means step_5, but the resumed run keeps step_0
    assert ckpt == first and cfg.run.init_from == str(first)
    with pytest.raises(ConfigError, match=f"started from {first}, but --checkpoint is {later}"):
        config(later)
    assert config(later, "--fresh")[1] == later
    shutil.rmtree(first)
    with pytest.raises(ConfigError, match="no longer exists"):
        config(base_run)


def test_a_resumed_stage_says_which_objective_keys_changed(tmp_path):
    """A resume with another posttrain.beta / loss went on silently with the new objective (the loss jumped);
    it is allowed, and now said. An unchanged resume says nothing of it."""
    ckpt = base_checkpoint(tmp_path)
    data = jsonl(tmp_path / "prefs.jsonl", pairs_data(8))
    base = ["dpo", "--checkpoint", str(ckpt), "--data", str(data), "--run.out_dir", str(tmp_path / "dpo"),
            "--train.global_batch_size", "2", "--train.micro_batch_size", "2"]
    first = run_kiln(*base, "--train.max_steps", "2", capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    note = ("note: resuming step_2 with posttrain.beta 0.1 -> 0.5, posttrain.loss sigmoid -> apo_zero: the stage "
            "follows the new values from here (the steps taken keep theirs)")
    changed = [*base, "--train.max_steps", "3", "--posttrain.beta", "0.5", "--posttrain.loss", "apo_zero"]
    res = run_kiln(*changed, capture_output=True, text=True)
    assert res.returncode == 0 and note in res.stderr.splitlines(), res.stderr[-3000:]
    same = run_kiln(*base, "--train.max_steps", "4", "--posttrain.beta", "0.5", "--posttrain.loss", "apo_zero",
                    capture_output=True, text=True)
    assert same.returncode == 0 and "posttrain." not in same.stderr, same.stderr[-3000:]
