"""SFT: chat template (and its HF equality), assistant-only masks, packing with document masks, training, resume.

Also the shared helpers of the post-training tests: a tiny byte-level BPE with chat control tokens
(fast models: 320 ids) and a tiny checkpoint to start post-training from.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kiln_cmd, run_kiln
from kiln.config import Config, ModelConfig
from kiln.data.packing import IGNORE
from kiln.data.tokenizer import Tokenizer, load_tokenizer
from kiln.eval.loss import token_loss_sum
from kiln.model import build_model
from kiln.posttrain.chat import KILN_TEMPLATE, ChatFormat, write_chat_template
from kiln.posttrain.sft import SFTLoader, SFTObjective, encode_conversations, pack_rows, rows_to_batch
from kiln.train import checkpoint as ckpt_io
from kiln.train.metrics import read_metrics
from kiln.train.objective import RunSettings
from kiln.train.trainer import train

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("What is the answer say digit number plus minus times yes no hello world good bad it . ? ! "
         "0 1 2 3 4 5 6 7 8 9 + = Be brief").split()
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "content": "6"}]


def tiny_tokenizer(folder: Path, *, chat_template: str | None = None) -> str:
    """A 320-id byte-level BPE with <s>, </s>, [INST], [/INST], <|im_start|>, <|im_end|>; returns its folder."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"])
    tk.train_from_iterator(text, trainer=trainer)
    Tokenizer(tk, name="tiny", eos_token="</s>", bos_token="<s>").save_hf(folder)
    if chat_template:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(folder)


def tiny_config(tmp_path: Path, **over) -> Config:
    """A 4-layer-free, 320-vocab config on the tiny tokenizer (tests build it in-process)."""
    tok = tiny_tokenizer(tmp_path / "tok")
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=320, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                            max_seq_len=128)
    cfg.data.tokenizer = tok
    cfg.run.name, cfg.run.out_dir, cfg.run.seed = "base", str(tmp_path / "base"), 0
    t = cfg.train
    t.seq_len, t.micro_batch_size, t.global_batch_size, t.log_every, t.eval_every = 64, 4, 4, 1, 1000
    t.save_every, t.sample_tokens, t.max_steps = 1000, 0, 1
    cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.schedule = 0, 0.0, "constant"
    for k, v in over.items():
        section, key = k.split(".")
        setattr(getattr(cfg, section), key, v)
    return cfg


def base_checkpoint(tmp_path: Path, **over) -> Path:
    """A randomly initialised tiny checkpoint, written as `kiln train` writes one (config keys `over`)."""
    cfg = tiny_config(tmp_path, **over)
    model = build_model(cfg.model, seed=0)
    return ckpt_io.save_checkpoint(tmp_path / "base" / "checkpoints", 0, model=model, cfg=cfg, train_state={},
                                   meta={"tokens_seen": 0})


# the pretraining peak LR a base checkpoint of this width (48) records; kiln's tiny (d 128) pretrains
# at 2e-3. The post-training stages derive their default LR from it (kiln.posttrain.lr).
BASE_LR = 5e-3
OLD_DEFAULT_LR = {"sft": 2e-5, "dpo": 5e-7, "rlvr": 1e-6}  # kiln's fixed stage LRs before kiln.posttrain.lr


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_stage(stage: str, ckpt: Path, data: Path, out: Path, *extra: str) -> str:
    """`kiln STAGE --checkpoint CKPT --data FILE ...` as a user types it; returns its stdout."""
    res = run_kiln(stage, "--checkpoint", str(ckpt), "--data", str(data), "--run.out_dir", str(out),
                   "--quiet", "--train.log_every", "1", *extra, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def addition_chats(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        out.append([{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": f"{a + b}"}])
    return out


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer("mistral-v3")


def test_assistant_mask_is_exactly_the_assistant_spans(mistral):
    fmt = ChatFormat(mistral)
    assert fmt.render(CONVO) == "[INST] Be brief.\n\nWhat is 2+2?[/INST] It is 4.</s>[INST] And 3+3?[/INST] 6</s>"
    enc = fmt.encode(CONVO)
    # the masked runs are exactly [prompt up to message i, conversation up to message i) for each assistant i
    want = np.zeros(len(enc.ids), dtype=bool)
    for i in (2, 4):
        start, end = len(fmt.prompt_ids(CONVO[:i])), len(fmt.encode(CONVO[:i + 1]).ids)
        assert enc.ids[:end].tolist() == fmt.encode(CONVO[:i + 1]).ids.tolist()  # prefix-consistent
        want[start:end] = True
    assert enc.mask.tolist() == want.tolist()
    runs = [mistral.decode(enc.ids[s:e].tolist()) for s, e in _runs(enc.mask)]
    assert runs == ["It is 4.</s>", "6</s>"]  # (the decoder drops each run's leading space)
    assert enc.ids[enc.mask][-1] == mistral.eos_id and enc.ids[0] == mistral.backend.token_to_id("[INST]")
    # train_on="last" (DPO) keeps only the final reply
    last = fmt.encode(CONVO, train_on="last").mask
    assert last.tolist() == (want & (np.arange(len(want)) >= len(fmt.prompt_ids(CONVO[:4])))).tolist()
    # the packed row's targets are those tokens, shifted by one, and nothing else
    row = pack_rows([enc], np.arange(1), seq_len=64, pack=True, pad_id=mistral.eos_id)[0]
    scored = np.flatnonzero(row[1] != IGNORE) + 1
    assert scored.tolist() == np.flatnonzero(enc.mask).tolist()
    assert (row[1][scored - 1] == enc.ids[scored]).all()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate([*mask.tolist(), False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_exported_template_reproduces_kiln_tokens_in_transformers(tmp_path, mistral):
    from transformers import AutoTokenizer

    mistral.save_hf(tmp_path / "hf")
    assert write_chat_template(tmp_path / "hf", chat_template="auto", tokenizer_spec="mistral-v3") == "kiln"
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    fmt = ChatFormat(mistral)
    for msgs in (CONVO, CONVO[1:4], [{"role": "user", "content": "caf\u00e9  twice  spaced\n\nline"}]):
        for gen in (False, True):
            ours = fmt.prompt_ids(msgs) if gen else fmt.encode(msgs).ids.tolist()
            theirs = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)["input_ids"]
            assert ours == list(theirs)


def test_the_tokenizers_own_template_is_used_and_masked(tmp_path):
    spec = tiny_tokenizer(tmp_path / "tok", chat_template=CHATML)
    tok = load_tokenizer(spec)
    fmt = ChatFormat.for_config(tok, chat_template="auto", tokenizer_spec=spec)
    assert fmt.name == "tokenizer" and fmt.template == CHATML
    enc = fmt.encode(CONVO)
    runs = [tok.decode(enc.ids[s:e].tolist()) for s, e in _runs(enc.mask)]
    assert runs == ["It is 4.<|im_end|>\n", "6<|im_end|>\n"]
    assert ChatFormat.for_config(tok, chat_template="kiln", tokenizer_spec=spec).template == KILN_TEMPLATE
    from transformers import AutoTokenizer

    out = tmp_path / "export"
    tok.save_hf(out)
    write_chat_template(out, chat_template="auto", tokenizer_spec=spec)
    hf = AutoTokenizer.from_pretrained(out)
    assert list(hf.apply_chat_template(CONVO, tokenize=True)["input_ids"]) == enc.ids.tolist()


def test_packed_rows_give_each_conversation_its_own_loss(tmp_path):
    """Document masks: the loss of packed conversations equals the sum of their losses alone."""
    tok = load_tokenizer(tiny_tokenizer(tmp_path / "tok"))
    fmt = ChatFormat(tok)
    chats = addition_chats(6) + [[{"role": "user", "content": "say hello world"},
                                  {"role": "assistant", "content": "hello world good"}]]
    convs = encode_conversations([("t", {"messages": m}) for m in chats], fmt, max_len=64)
    rows = pack_rows(convs, np.arange(len(convs)), seq_len=64, pack=True, pad_id=tok.eos_id)
    assert len(rows) < len(convs)  # several conversations share a row
    model = build_model(ModelConfig(vocab_size=320, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                    max_seq_len=128, init_std=0.1), seed=0).eval()
    with torch.no_grad():
        packed = sum(token_loss_sum(model, rows_to_batch([r]), doc_mask=True).item() for r in rows)
        alone = [token_loss_sum(model, rows_to_batch(pack_rows([c], np.arange(1), seq_len=64, pack=False,
                                                                  pad_id=tok.eos_id)), doc_mask=False).item()
                 for c in convs]
    assert packed == pytest.approx(sum(alone), rel=1e-5)
    n_targets = sum(int((r[1] != IGNORE).sum()) for r in rows)
    assert n_targets == sum(int(c.mask[1:].sum()) for c in convs)  # every assistant token, once
    # a conversation never straddles two rows
    for _tok_row, _, doc in rows:
        assert (np.diff(doc) >= 0).all()


def test_sft_learns_and_resumes_exactly(tmp_path):
    ckpt = base_checkpoint(tmp_path)
    tok = load_tokenizer(str(tmp_path / "tok"))
    fmt = ChatFormat(tok)
    convs = encode_conversations([("t", {"messages": m}) for m in addition_chats(48)], fmt, max_len=64)
    val = encode_conversations([("v", {"messages": m}) for m in addition_chats(16, seed=1)], fmt, max_len=64)

    def run(out: str, steps: int, stop: int = 0):
        cfg = tiny_config(tmp_path, **{"run.out_dir": str(tmp_path / out), "run.init_from": str(ckpt),
                                       "train.max_steps": steps, "train.stop_at_step": stop,
                                       "train.eval_every": 6, "train.save_every": 3, "optim.lr": 1e-2})
        return train(cfg, objective=SFTObjective(convs, val), quiet=True)

    run("a", 12)
    run("b", 12, stop=5)
    run("b", 12)
    la = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "a") if r["kind"] == "train"]
    lb = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    assert la == lb and len(la) == 12
    ev = [r["eval_loss"] for r in read_metrics(tmp_path / "a") if r["kind"] == "eval"]
    assert ev[-1] < ev[0] - 1.0  # the assistant tokens are learnt


def test_sft_learns_with_the_default_lr_derived_from_the_checkpoint(tmp_path):
    """No --optim.lr: the LR comes from the checkpoint's pretraining peak and width, and the loss on the
    assistant tokens falls by more than a nat in 12 steps (measured: 5.81 -> 3.29); with the fixed 2e-5
    kiln used before, it does not (5.81 -> 5.79). The line saying which LR and why is printed."""
    ckpt = base_checkpoint(tmp_path, **{"optim.lr": BASE_LR})
    chats = jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in addition_chats(48)])
    val = jsonl(tmp_path / "val.jsonl", [{"messages": m} for m in addition_chats(16, seed=1)])
    out = run_stage("sft", ckpt, chats, tmp_path / "sft", "--val-data", str(val), "--train.max_steps", "12",
                    "--train.eval_every", "12")
    line = next(x for x in out.splitlines() if "optim.lr" in x)
    assert line.startswith(f"kiln sft: optim.lr {BASE_LR:.3g}: pretraining peak {BASE_LR:.3g} (optim.lr of ")
    assert "d_model 48" in line and "--optim.lr overrides" in line
    ev = [r["eval_loss"] for r in read_metrics(tmp_path / "sft") if r["kind"] == "eval"]
    assert ev[-1] < ev[0] - 1.0, ev
    assert max(r["lr"] for r in read_metrics(tmp_path / "sft") if r["kind"] == "train") == pytest.approx(BASE_LR)
    assert ckpt_io.read_config(ckpt_io.resolve_checkpoint(tmp_path / "sft")).posttrain.pretrain_lr == BASE_LR


def test_the_stage_lr_rule_its_inputs_and_an_explicit_lr(tmp_path):
    """The rule's numbers for kiln's tiny and a 1B shape; a later stage derives from the recorded
    pretraining peak, not from the SFT rate; --optim.lr and --posttrain.pretrain_lr win."""
    from kiln.posttrain.commands import _stage_parser, stage_config
    from kiln.posttrain.lr import stage_lr

    def shaped(d: int, lr: float, **over) -> Config:
        cfg = Config()
        cfg.model.d_model, cfg.optim.lr = d, lr
        for k, v in over.items():
            section, key = k.split(".")
            setattr(getattr(cfg, section), key, v)
        return cfg

    tiny, one_b = shaped(128, 2e-3), shaped(2048, 3e-4)
    assert [stage_lr(s, tiny).lr for s in ("sft", "dpo", "rlvr")] == pytest.approx([2e-3, 6.03e-4, 3.62e-4], rel=1e-3)
    assert [stage_lr(s, one_b).lr for s in ("sft", "dpo", "rlvr")] == pytest.approx([2.828e-5, 1.414e-6, 8.485e-7],
                                                                                   rel=1e-3)
    assert stage_lr("sft", shaped(4096, 3e-4)).lr == pytest.approx(1e-5)  # the 7-8B anchor itself: 1/30
    # the peak of a run with optim.lr_scaling=sqrt is lr x sqrt(global batch); a recorded peak wins over optim.lr
    assert stage_lr("sft", shaped(128, 1e-4, **{"optim.lr_scaling": "sqrt", "train.global_batch_size": 16})).peak \
        == pytest.approx(4e-4)
    assert stage_lr("dpo", shaped(128, 1e-5, **{"posttrain.pretrain_lr": 2e-3})).lr == pytest.approx(6.03e-4, rel=1e-3)

    base = base_checkpoint(tmp_path, **{"optim.lr": BASE_LR})

    def config(stage: str, ckpt: Path, *extra: str) -> Config:
        args, over = _stage_parser(stage, "").parse_known_args(["--checkpoint", str(ckpt), "--data", "x.jsonl",
                                                                "--run.out_dir", str(tmp_path / stage), *extra])
        return stage_config(stage, args, over)[0]

    sft = config("sft", base)
    assert (sft.optim.lr, sft.posttrain.pretrain_lr, sft.optim.lr_scaling) == (BASE_LR, BASE_LR, "none")
    assert config("sft", base, "--optim.lr", "1e-4").optim.lr == 1e-4
    assert config("sft", base, "--posttrain.pretrain_lr", "1e-3").optim.lr == pytest.approx(1e-3)
    sft.optim.lr = 1e-6  # an SFT checkpoint: its optim.lr is the SFT rate, its pretrain_lr the pretraining peak
    sft_ckpt = ckpt_io.save_checkpoint(tmp_path / "sft-run" / "checkpoints", 3, model=build_model(sft.model, seed=0),
                                       cfg=sft, train_state={}, meta={"tokens_seen": 0})
    dpo = config("dpo", sft_ckpt)
    assert dpo.posttrain.pretrain_lr == BASE_LR and dpo.optim.lr == pytest.approx(stage_lr("dpo", sft).lr)
    assert dpo.optim.lr == pytest.approx(BASE_LR * min(1.0, (4096 / 48) ** 1.5 / 600))


def test_a_source_run_with_a_time_budget_or_target_passes_neither_to_the_next_stage(tmp_path):
    """`make train` trains `demo` for a 5 m time budget. `kiln sft` from it runs its epochs (it used to keep the
    source's budget beside the epochs' max_steps: a saved config no later command could read, so dpo and chat
    on the SFT run failed), the next stage starts from that checkpoint, and a budget given to the stage is the
    stage's length. A checkpoint an earlier kiln saved with both reads as the run it was (max_steps)."""
    ckpt = base_checkpoint(tmp_path, **{"train.max_steps": 0, "train.time_budget": "5m", "train.target_loss": 3.0,
                                         "train.keep_best": 2, "optim.warmup_steps": 3})
    chats = jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in addition_chats(8)])
    out = run_stage("sft", ckpt, chats, tmp_path / "sft")
    assert "done: 1 steps, 256 tokens" in out  # one epoch of 8 short chats
    assert re.search(r"^train.max_steps 1 = 1 epoch\(s\) \(posttrain.epochs\) x \d rows / global batch 4"
                     r"( \(rounded up to whole steps: [\d.]+ epochs\))?;", out, re.M)
    cfg = ckpt_io.read_config(ckpt_io.resolve_checkpoint(tmp_path / "sft"))
    assert (cfg.train.time_budget, cfg.train.target_loss, cfg.train.keep_best, cfg.train.max_steps) == ("", 0.0, 0, 1)
    # given to a stage without --val-data, a target or keep_best would never act: one line, nothing written
    res = run_kiln("sft", "--checkpoint", str(ckpt), "--data", str(chats), "--run.out_dir",
                   str(tmp_path / "sft-target"), "--train.target_loss", "0.5",
                   capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith(
        "kiln: error: train.target_loss needs evals, and this run has none: give it validation data (kiln sft / dpo / "
        "rlvr: --val-data;")
    assert not (tmp_path / "sft-target" / "checkpoints").exists()
    pairs = jsonl(tmp_path / "pairs.jsonl", [{"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}] * 4)
    run_stage("dpo", tmp_path / "sft", pairs, tmp_path / "dpo")
    run_stage("sft", ckpt, chats, tmp_path / "sft-budget", "--train.time_budget", "8s")  # 5 s: too short under load
    budgeted = ckpt_io.resolve_checkpoint(tmp_path / "sft-budget")
    assert ckpt_io.read_config(budgeted).train.time_budget == "8s"
    assert int(budgeted.name.removeprefix("step_")) > 10  # the steps that fit 8 s, not the one step of an epoch

    old = ckpt_io.resolve_checkpoint(tmp_path / "sft")
    text = (old / "config.yaml").read_text().replace("time_budget: ''", "time_budget: 5m")
    (old / "config.yaml").write_text(text)
    assert "time_budget: 5m" in text
    assert ckpt_io.read_config(old).train.max_steps == 1


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_checkpoint_of_a_parallel_run_post_trains_in_one_process(tmp_path, stage):
    """A pp 2 (or tp 2, FSDP) run's checkpoint loads anywhere; the stage's layout is its own command's, not the
    source's: it inherited parallel.pp 2 and refused to start in one process."""
    ckpt = base_checkpoint(tmp_path, **{"parallel.pp": 2, "parallel.pp_schedule": "GPipe", "parallel.dp_shard": 2})
    data = (jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in addition_chats(8)]) if stage == "sft" else
            jsonl(tmp_path / "pairs.jsonl", [{"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}] * 4))
    run_stage(stage, ckpt, data, tmp_path / stage)
    cfg = ckpt_io.read_config(ckpt_io.resolve_checkpoint(tmp_path / stage))
    assert (cfg.parallel.pp, cfg.parallel.dp_shard, cfg.parallel.pp_schedule) == (1, 1, "1F1B")


def test_loader_state_round_trip():
    convs = [type("E", (), {"ids": np.arange(n), "mask": np.ones(n, bool)})() for n in (5, 9, 3, 7, 12, 4)]
    a = SFTLoader(convs, seq_len=16, batch_size=2, seed=3, pack=True, pad_id=0)
    for _ in range(3):
        a.next_batch()
    b = SFTLoader(convs, seq_len=16, batch_size=2, seed=3, pack=True, pad_id=0)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets)


def test_cli_reports_bad_chat_data_in_one_line(tmp_path):
    ckpt = base_checkpoint(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    res = run_kiln("sft", "--checkpoint", str(ckpt), "--data", str(bad), "--run.out_dir",
                   str(tmp_path / "sft"), capture_output=True, text=True)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("kiln: error:") and f"{bad}:2: message 0" in err


def test_chat_fits_its_replies_into_a_short_context(tmp_path):
    """`demo` trains a 256-token context: chat's replies must fit it by default, and a reply length that leaves
    no room for a prompt is one line before anyone types (it was refused only after the first message)."""
    ckpt = base_checkpoint(tmp_path)  # model.max_seq_len 128
    chat = kiln_cmd("chat", "--checkpoint", str(ckpt), "--temperature", "0")
    res = subprocess.run(chat, input="What is 2+2?\nAnd 3+3?\n", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("\n") == 2 and "note: prompt truncated" not in res.stderr
    res = subprocess.run([*chat, "--max-new-tokens", "128"], input="", capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        f"kiln: error: --max-new-tokens 128 leaves no room for a prompt within model.max_seq_len (128) of {ckpt}; "
        "ask for fewer (e.g. 64)")
    # a conversation that outgrows the context forgets its oldest exchange, and says so (it was silent)
    long = "tell me about " + "the sea " * 8  # fits alone with its reply (one too long alone is refused)
    res = subprocess.run([*chat, "--max-new-tokens", "60"], input=f"{long}\n{long}\n", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("(note: the conversation outgrew the model's 128-token context with --max-new-tokens 60: the oldest 1 "
            "exchange(s) are forgotten)") in res.stderr, res.stderr[-2000:]


def test_sft_loss_and_eval_use_train_loss_impl(tmp_path):
    from kiln.errors import ConfigError
    from kiln.model.loss import _liger_loss

    if _liger_loss() is not None:
        pytest.skip("liger-kernel is installed")
    tok = load_tokenizer(tiny_tokenizer(tmp_path / "tok"))
    convs = encode_conversations([("t", {"messages": m}) for m in addition_chats(4)], ChatFormat(tok), max_len=64)
    cfg = tiny_config(tmp_path, **{"train.loss_impl": "liger"})  # not installed: the loss must say so
    obj = SFTObjective(convs, convs)
    obj.configure(RunSettings.of(cfg))
    model = build_model(cfg.model, seed=0)
    batch = obj.train_data(tok).next_batch()
    with pytest.raises(ConfigError, match="liger"):
        obj.loss(model, batch)
    with pytest.raises(ConfigError, match="liger"):
        obj.evaluate(model, obj.val_data(tok), device=torch.device("cpu"), autocast=None)


def test_loader_memory_does_not_grow_with_the_epochs_tokens():
    """Only row plans (conversation indices) are kept per epoch; rows are built when batched."""
    import tracemalloc

    rng = np.random.default_rng(0)
    convs = [type("E", (), {"ids": np.arange(n, dtype=np.int32), "mask": np.ones(n, bool)})()
             for n in rng.integers(8, 40, size=3000)]
    tokens = sum(len(c.ids) for c in convs)
    tracemalloc.start()
    loader = SFTLoader(convs, seq_len=128, batch_size=4, seed=0, pack=True, pad_id=0)
    loader.next_batch()
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    # materialised rows would be 20 bytes per row position (int64 tokens and targets, int32 doc ids)
    assert kept < 5 * tokens, f"{kept} bytes kept for {tokens} tokens"


def test_ranks_split_one_global_stream_of_rows():
    """W ranks take rows r, r+W, ... of the epochs' rows one after another: each step's rows over all
    ranks are the single process's rows for that step, also across an epoch boundary and when an
    epoch has fewer rows than ranks (3 rows, 4 ranks). An empty data set is one clear error."""
    from kiln.errors import DataError

    convs = [type("E", (), {"ids": np.arange(n), "mask": np.ones(n, bool)})() for n in (5, 9, 3)]
    for pack, world in ((False, 4), (False, 2), (True, 2)):  # packed: 3 conversations fill 2 rows of 16
        one = SFTLoader(convs, seq_len=16, batch_size=world, seed=0, pack=pack, pad_id=0)
        ranks = [SFTLoader(convs, seq_len=16, batch_size=1, seed=0, pack=pack, pad_id=0, rank=r, world_size=world)
                 for r in range(world)]
        for _ in range(5):
            want = one.next_batch().tokens
            got = torch.cat([loader.next_batch().tokens for loader in ranks])
            assert torch.equal(want, got), (pack, world)
    with pytest.raises(DataError, match="no conversations"):
        SFTLoader([], seq_len=16, batch_size=2, seed=0, pack=True, pad_id=0)


def test_sft_position_reshards_to_another_number_of_ranks():
    """Saved on 2 ranks after 3 steps, resumed on 3 ranks or 1: the single process's next rows."""
    convs = [type("E", (), {"ids": np.arange(n), "mask": np.ones(n, bool)})() for n in (5, 9, 3, 7, 12, 4, 6)]

    def loader(rank=0, world=1, batch=1):
        return SFTLoader(convs, seq_len=16, batch_size=batch, seed=1, pack=True, pad_id=0, rank=rank, world_size=world)

    one = loader(batch=6)
    two = [loader(r, 2, batch=3) for r in range(2)]
    for _ in range(3):
        one.next_batch()
        for ld in two:
            ld.next_batch()
    saved = [ld.state_dict() for ld in two]
    continued = loader(batch=6)
    continued.load_resharded_state(saved)
    expected = [continued.next_batch().tokens for _ in range(3)]
    assert torch.equal(expected[0], one.next_batch().tokens)  # resharded to 1 = the uninterrupted process
    for world in (3, 1):
        resumed = [loader(r, world, batch=6 // world) for r in range(world)]
        for ld in resumed:
            ld.load_resharded_state(saved)
        for want in expected:  # rank r's i-th row is the step's row r + i * world
            got = torch.stack([ld.next_batch().tokens for ld in resumed], dim=1).reshape(want.shape)
            assert torch.equal(want, got), world


def test_an_earlier_kilns_distributed_position_is_refused():
    from kiln.errors import DataError

    convs = [type("E", (), {"ids": np.arange(n), "mask": np.ones(n, bool)})() for n in (5, 9, 3)]
    old = {"kind": "sft", "epoch": 0, "cursor": 1, "conversations": 3}  # no cursor_version: per-rank shares
    SFTLoader(convs, seq_len=16, batch_size=1, seed=0, pack=False, pad_id=0).load_state_dict(old)  # 1 process: same
    two = SFTLoader(convs, seq_len=16, batch_size=1, seed=0, pack=False, pad_id=0, rank=1, world_size=2)
    with pytest.raises(DataError, match="earlier kiln"):
        two.load_state_dict(old)


def test_epoch_cursor_computes_each_epoch_once_and_continues_across_epochs():
    from kiln.data.cursor import EpochCursor

    calls = []

    def items(epoch: int) -> list[int]:
        calls.append(epoch)
        return [10 * epoch + i for i in range(3)]

    cur = EpochCursor(items, empty="none")
    assert cur.take(2) == [0, 1] and cur.take(2) == [2, 10] and cur.take(4) == [11, 12, 20, 21]
    assert calls == [0, 1, 2]  # once per epoch, not once per item
    other = EpochCursor(items, empty="none")
    other.load_state_dict(cur.state_dict())
    assert other.take(3) == cur.take(3) == [22, 30, 31]


def test_hub_datasets_take_a_config_and_local_typos_are_not_hub_names(tmp_path, monkeypatch):
    import datasets

    from kiln.data.records import load_records
    from kiln.errors import DataError

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: calls.append(
        (path, name, split)) or [{"question": "q", "answer": "1"}])
    monkeypatch.chdir(tmp_path)
    assert load_records("openai/gsm8k:main", split="test") == [("openai/gsm8k:main[0]", {"question": "q", "answer": "1"})]
    load_records("HuggingFaceTB/smoltalk")
    (tmp_path / "data" / "local_ds").mkdir(parents=True)
    load_records("data/local_ds")  # a local dataset folder goes to `datasets` too
    assert calls == [("openai/gsm8k", "main", "test"), ("HuggingFaceTB/smoltalk", None, "train"),
                     ("data/local_ds", None, "train")]
    for missing in ("data/x.parquet", "data/x.jsonl", str(tmp_path / "data" / "x.parquet"), "./x.jsonl"):
        with pytest.raises(DataError, match="no such file"):
            load_records(missing)
    assert len(calls) == 3


def test_val_data_from_the_hub_uses_posttrain_val_split(tmp_path, monkeypatch):
    import kiln.data.records as records
    import kiln.train.trainer as trainer
    from kiln.posttrain import commands

    ckpt = base_checkpoint(tmp_path)
    splits = {}

    def hub(name, *, split):
        splits[name] = split
        return [(f"{name}[{i}]", {"messages": m}) for i, m in enumerate(addition_chats(4))]

    monkeypatch.setattr(records, "_hub_records", hub)
    monkeypatch.setattr(trainer, "train", lambda cfg, **kw: {})
    monkeypatch.chdir(tmp_path)
    args = ["--checkpoint", str(ckpt), "--data", "org/chats", "--val-data", "org/chats_val", "--run.out_dir", "sft"]
    assert commands.sft(args) == 0
    assert splits == {"org/chats": "train", "org/chats_val": "test"}
    commands.sft([*args, "--posttrain.val_split", "validation"])
    assert splits["org/chats_val"] == "validation"


@pytest.mark.parametrize("stage, row", [
    ("sft", {"messages": [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "3"}]}),
    ("dpo", {"prompt": "What is 1+2?", "chosen": "3", "rejected": "5 no"}),
    ("rlvr", {"prompt": "What is 1+2?", "answer": "3"}),
])
def test_a_missing_val_data_file_is_named_as_val_data(tmp_path, stage, row, capsys):
    """It was reported as posttrain.data, the training data the user had right. (In-process through
    kiln.cli.main: refused while the data loads, before any run folder.)"""
    from kiln.cli import main

    ckpt = base_checkpoint(tmp_path)
    data = jsonl(tmp_path / "data.jsonl", [row] * 4)
    missing = tmp_path / "nope.jsonl"
    argv = [stage, "--checkpoint", str(ckpt), "--data", str(data), "--val-data", str(missing),
            "--run.out_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"kiln: error: posttrain.val_data: no such file {missing}"]
    assert not (tmp_path / "out").exists()


def test_a_resume_without_the_runs_val_data_says_its_evals_stop(tmp_path):
    """`kiln sft ... --val-data V` then the same without --val-data resumed silently with no evals."""
    from conftest import run_kiln

    ckpt = base_checkpoint(tmp_path)
    data = jsonl(tmp_path / "chats.jsonl", [{"messages": CONVO}] * 8)
    val = jsonl(tmp_path / "val.jsonl", [{"messages": CONVO}] * 2)
    base = ["sft", "--checkpoint", str(ckpt), "--data", str(data), "--run.out_dir", str(tmp_path / "sft"),
            "--train.global_batch_size", "2", "--train.micro_batch_size", "2", "--quiet"]
    first = run_kiln(*base, "--val-data", str(val), "--train.max_steps", "2", capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    res = run_kiln(*base, "--train.max_steps", "3", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (f"note: resuming step_2 without posttrain.val_data, which the run evaluated on ({val}): no evals from "
            f"here; pass --val-data {val} to keep them") in res.stderr


def test_epochs_rounded_up_to_whole_steps_say_so(capsys):
    """posttrain.epochs 0.5 of 1 row in batches of 2 is one step, two passes over the data; the line said
    "0.5 epoch(s)" without a word of it."""
    from kiln.config import load_config
    from kiln.posttrain.commands import _set_steps

    cfg = load_config("tiny", ["--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                               "--posttrain.epochs", "0.5"])
    _set_steps(cfg, {}, 1, "rows")
    assert cfg.train.max_steps == 1 and "(rounded up to whole steps: 2 epochs)" in capsys.readouterr().out
    cfg.posttrain.epochs = 2.0
    _set_steps(cfg, {}, 4, "rows")
    assert cfg.train.max_steps == 4 and "rounded" not in capsys.readouterr().out
