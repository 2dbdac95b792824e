"""The SmolLM pipeline (pretrain -> SFT -> DPO -> RLVR) from the command line, as a new user runs it, on a tiny model:
pretrain -> sft -> dpo -> rlvr -> chat (stdin) -> export -> transformers generate, plus the benchmarks."""

from __future__ import annotations

import json
import random

import pytest

from conftest import run_kiln

SHAPE = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--model.n_kv_heads", "1",
         "--model.ffn_dim", "64", "--train.seq_len", "64", "--train.micro_batch_size", "4",
         "--train.global_batch_size", "4", "--train.eval_tokens", "256", "--train.log_every", "1"]


def kiln(*args: str, stdin: str | None = None) -> str:
    res = run_kiln(*args, capture_output=True, text=True, input=stdin, timeout=600)
    assert res.returncode == 0, f"kiln {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


def records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_smollm_pipeline_end_to_end(tmp_path):
    rng = random.Random(0)
    sums = [(rng.randint(0, 4), rng.randint(0, 4)) for _ in range(64)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}) + "\n"
        for a, b in sums))
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(
        {"prompt": f"What is {a}+{b}?", "chosen": str(a + b), "rejected": f"{a + b + 1} maybe"}) + "\n"
        for a, b in sums[:32]))
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b)})
                                               + "\n" for a, b in sums[:16]))
    pre, sft, dpo, rl, hf = (tmp_path / n for n in ("pre", "sft", "dpo", "rl", "hf"))

    kiln("train", "tiny", "--run.out_dir", str(pre), "--train.max_steps", "3", "--train.sample_tokens", "0", *SHAPE)
    kiln("sft", "--checkpoint", str(pre), "--data", str(tmp_path / "sft.jsonl"), "--val-data",
         str(tmp_path / "sft.jsonl"), "--run.out_dir", str(sft), "--optim.lr", "1e-2", "--optim.warmup_steps", "0",
         "--posttrain.epochs", "6", "--train.eval_every", "1000", "--quiet")
    sft_log = records(sft / "metrics.jsonl")
    sft_evals = [r["eval_loss"] for r in sft_log if r["kind"] == "eval"]
    assert max(r["step"] for r in sft_log) > 6  # epochs -> steps (64 chats packed several per row)
    assert sft_evals[-1] < sft_evals[0] - 2.0

    kiln("dpo", "--checkpoint", str(sft), "--data", str(tmp_path / "dpo.jsonl"), "--val-data",
         str(tmp_path / "dpo.jsonl"), "--run.out_dir", str(dpo), "--optim.lr", "3e-3", "--train.max_steps", "6",
         "--train.eval_every", "1000", "--posttrain.beta", "0.5", "--quiet")
    dpo_evals = [r for r in records(dpo / "metrics.jsonl") if r["kind"] == "eval"]
    assert dpo_evals[-1]["eval_rewards/margin"] > dpo_evals[0]["eval_rewards/margin"] == 0.0
    assert dpo_evals[-1]["eval_rewards/accuracy"] > 0.5

    kiln("rlvr", "--checkpoint", str(dpo), "--data", str(tmp_path / "rl.jsonl"), "--run.out_dir", str(rl),
         "--optim.lr", "1e-3", "--train.max_steps", "2", "--train.micro_batch_size", "2",
         "--train.global_batch_size", "2", "--posttrain.group_size", "4", "--posttrain.max_new_tokens", "6",
         "--posttrain.rewards", '["numeric", "0.1*regex:^\\\\s*\\\\d+\\\\s*$"]', "--quiet")
    rl_train = [r for r in records(rl / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rl_train) == 2 and all({"reward", "kl", "completion_len"} <= r.keys() for r in rl_train)

    question, follow_up = "What is 2+3?", "And 1+1?"
    chat_out = kiln("chat", "--checkpoint", str(rl), "--temperature", "0", "--max-new-tokens", "8",
                    stdin=f"{question}\n{follow_up}\n")

    kiln("export", "--checkpoint", str(rl), "--out", str(hf))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.data.tokenizer import load_tokenizer
    from kiln.generate import generate
    from kiln.posttrain.chat import ChatFormat
    from kiln.train.checkpoint import load_for_inference

    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    hf_new = out[0, enc["input_ids"].shape[1]:].tolist()

    kmodel, cfg, _ = load_for_inference(rl)
    ktok = load_tokenizer(cfg.data.tokenizer)
    prompt = ChatFormat(ktok).prompt_ids([{"role": "user", "content": question}])
    assert enc["input_ids"][0].tolist() == prompt  # transformers' chat template gives kiln's tokens
    ours = generate(kmodel, prompt, max_new_tokens=8, temperature=0, eos_id=ktok.eos_id)[0]
    assert hf_new[:len(ours)] == ours  # the same greedy reply (HF may pad after EOS)
    fmt = ChatFormat(ktok)

    def reply(messages: list[dict]) -> str:
        ids = fmt.prompt_ids(messages)
        new = [t for t in generate(kmodel, ids, max_new_tokens=8, temperature=0, eos_id=ktok.eos_id)[0]
               if t != ktok.eos_id]
        return ktok.decode(ids + new)[len(ktok.decode(ids)):]

    first = reply([{"role": "user", "content": question}])
    second = reply([{"role": "user", "content": question}, {"role": "assistant", "content": first.strip()},
                    {"role": "user", "content": follow_up}])
    assert chat_out == f"{first}\n{second}\n"  # two turns of `kiln chat`, the second with the history
    assert tok.decode(hf_new, skip_special_tokens=True).strip() == first.strip()
    with torch.no_grad():
        assert (kmodel(torch.tensor([prompt])) - model(torch.tensor([prompt])).logits).abs().max() < 1e-4

    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": f"What is {a}+{b}?", "choices": [f" {a + b}", f" {a + b + 1}"],
                                      "answer": 0}) + "\n" for a, b in sums[:8]))
    res = json.loads(kiln("eval", "--checkpoint", str(rl), "--data", str(mc), "--task", "mc").splitlines()[-1])
    assert res["task"] == "mc" and res["n"] == 8 and 0 <= res["accuracy"] <= 1 and "acc_norm" in res
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {a}+{b}?", "answer": f"#### {a + b}"}) + "\n"
                           for a, b in sums[:4]))
    res = json.loads(kiln("eval", "--checkpoint", str(rl), "--data", str(gsm), "--task", "gsm8k", "--chat",
                          "--max-new-tokens", "6").splitlines()[-1])
    assert res["task"] == "gsm8k" and res["n"] == 4 and {"exact_match", "accuracy"} <= res.keys()
