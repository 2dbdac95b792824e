"""bench/quality.py: its scorer against a hand computation with kiln's own model, its held-out text, bad
input, and the script end to end (kiln through its CLI, the HF Trainer run, reuse of an HF result)."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.config import Config, ModelConfig, TrainConfig
from kiln.data.tokenizer import load_tokenizer
from kiln.export import export_checkpoint
from kiln.model import build_model
from kiln.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402
from quality_hf import load_texts, score_bpb  # noqa: E402

TINY = ("--model.d_model 32 --model.n_layers 1 --model.n_heads 2 --model.n_kv_heads 1 --model.ffn_dim 64 "
        "--train.seq_len 64 --train.micro_batch_size 2 --train.global_batch_size 2 --optim.warmup_steps 3 "
        "--train.eval_tokens 128 --train.sample_tokens 0")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("mistral-v3")


def texts_for_test() -> list[str]:
    alice = load_texts(ROOT / "bench" / "heldout" / "heldout.jsonl.gz")[0]
    # several windows and a short last one; a second document with multi-byte characters and space runs
    return [alice[2000:3500], "Caf\u00e9 na\u00efve \u2014 \u00bfqu\u00e9?  Two  spaces,\n\n  indented\ttab \u00fc" * 3]


def hand_bpb(model: torch.nn.Module, tokenizer, texts: list[str], window: int) -> tuple[float, int]:
    """The definition, written out with kiln's model and tokenizer: EOS, then each text token scored once."""
    nats, n_tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.eos_id, *tokenizer.encode(text)]
            for s in range(0, len(ids) - 1, window):
                y = torch.tensor(ids[s + 1:s + window + 1])
                x = torch.tensor([ids[s:s + len(y)]])
                logp = torch.log_softmax(model(x)[0].double(), dim=-1)  # kiln's forward: logits (1, t, V)
                nats -= logp[torch.arange(len(y)), y].sum().item()
            n_tokens += len(ids) - 1
            n_bytes += len(text.encode("utf-8"))
    return nats / (math.log(2) * n_bytes), n_tokens


def test_score_bpb_matches_hand_computation_with_kiln_model(tokenizer, tmp_path):
    mcfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                       ffn_dim=64, max_seq_len=128, init_std=0.3)  # sharp: predictions depend on context
    model = build_model(mcfg, seed=0).eval()
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, model=model, cfg=Config(model=mcfg, train=TrainConfig(seq_len=16)),
                    train_state={}, meta={})
    hf_dir = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    texts = texts_for_test()
    res = score_bpb(hf_dir, texts, window=16, batch_size=3)
    want, n_tokens = hand_bpb(model, tokenizer, texts, window=16)
    assert res["tokens"] == n_tokens and res["bytes"] == sum(len(t.encode()) for t in texts)
    assert res["bytes"] > sum(len(t) for t in texts)  # bytes, not characters
    assert res["bpb"] == pytest.approx(want, rel=1e-5)
    # every token is scored once: other windows and batches change the contexts, never what is counted
    other = score_bpb(hf_dir, texts, window=40, batch_size=1)
    assert other["tokens"] == res["tokens"] and other["bpb"] != res["bpb"]
    assert other["bpb"] == pytest.approx(hand_bpb(model, tokenizer, texts, window=40)[0], rel=1e-5)


@pytest.mark.parametrize("name, n_docs, size", [("heldout", 2, (300_000, 500_000)), ("modern", 3, (60_000, 70_000))])
def test_heldout_text_is_not_in_the_bundled_corpus(name, n_docs, size):
    docs = load_texts(ROOT / "bench" / "heldout" / f"{name}.jsonl.gz")
    assert len(docs) == n_docs and size[0] < sum(len(d.encode()) for d in docs) < size[1]
    corpus = []
    for split in ("train", "val"):
        with gzip.open(ROOT / "src" / "kiln" / "data" / "corpus" / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            corpus += [json.loads(line)["text"] for line in f]
    everything = "\x00".join(corpus)
    for d in docs:  # build.py checks every 50th offset; every 250th keeps this test fast (any shared 450 chars)
        assert not any(d[i:i + 200] in everything for i in range(0, len(d) - 200, 250))
        assert "Gutenberg" not in d and "\r" not in d


@pytest.mark.skipif(not Path("/usr/share/common-licenses/GPL-3").is_file(), reason="Debian's base-files licences")
def test_the_modern_heldout_file_rebuilds_byte_for_byte():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "heldout" / "build_modern.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "identical" in res.stdout, res.stdout + res.stderr


def test_bad_input_is_one_line_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert quality.main(["--budget", "5 parsecs", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench/quality.py: error:") and "--budget" in err and "\n" not in err
    (tmp_path / "r.jsonl").write_text(json.dumps({"bench": "quality", "hf": {"settings": {}}}) + "\n")
    with pytest.raises(SystemExit, match="no record with this budget"):
        quality.main(["--budget", "10s", "--hf-result", str(tmp_path / "r.jsonl"), "--out-dir", str(out)])
    with pytest.raises(SystemExit, match=f"--also-score {tmp_path / 'none.txt'}: no such file"):
        quality.main(["--budget", "10s", "--also-score", str(tmp_path / "none.txt"), "--out-dir", str(out)])
    assert not out.exists()  # refused before any training


def test_hf_spec_mirrors_kiln_shape_and_schedule():
    cfg = quality.load_config("tiny", [])
    spec = quality.hf_spec(cfg, budget_s=300, seed=1, corpus=str(quality.CORPUS), out=Path("x"))
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**spec["model"]))
    assert sum(p.numel() for p in hf.parameters()) == spec["n_params_kiln"] == 4_981_888
    assert (spec["lr"], spec["warmup_steps"], spec["min_lr_ratio"], spec["betas"], spec["weight_decay"],
            spec["grad_clip"], spec["seq_len"], spec["micro_batch"] * spec["accum"]) == \
           (2e-3, 30, 0.1, [0.9, 0.95], 0.1, 1.0, 256, 8)


@pytest.mark.slow
def test_script_end_to_end_then_reusing_the_hf_result(tmp_path):
    small = tmp_path / "heldout.jsonl"
    small.write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in load_texts(quality.HELDOUT)))
    other = tmp_path / "modern.txt"  # --also-score: a second held-out text of another kind
    other.write_text("The license grants you a worldwide, royalty-free, non-exclusive right to use the software, "
                     "provided that you include this notice in every copy you distribute. " * 4)
    corpus = tmp_path / "corpus.jsonl"  # both systems train on the same 40 documents (the whole corpus: 2.6M tokens
    with gzip.open(quality.CORPUS, "rt", encoding="utf-8") as f:  # to tokenize for HF's run alone)
        corpus.write_text("".join(line for _, line in zip(range(40), f)))
    results = tmp_path / "results.jsonl"
    # kiln's budget counts its command's start (~3-6 s of a real interpreter on 2 busy cores); the HF run's train
    # seconds do not: the short run gets twice them, so that it fits a few steps on a loaded machine too
    common = ["--budget", "10s", "--kiln-args", f"{TINY} --data.train {corpus}", "--hf-args", TINY,
              "--corpus", str(corpus), "--heldout", str(small),
              "--curve-points", "2", "--results", str(results), "--also-score", str(other)]
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), *common, "--short-fraction", "2",
                          "--out-dir", str(tmp_path / "a")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| HF Trainer + LlamaForCausalLM |" in run.stdout and "kiln/HF: bpb" in run.stdout
    rec = json.loads(results.read_text().splitlines()[0])
    kiln, hf = rec["kiln"], rec["hf"]
    assert kiln["plan"] == "train.time_budget" and hf["reused_from"] is None
    assert kiln["n_params"] == hf["n_params"] == 1_057_888
    assert kiln["steps"] > 3 and hf["steps"] > 3 and kiln["tokens"] == kiln["steps"] * 2 * 64
    assert kiln["checkpoints"][-1]["step"] == kiln["steps"] and "bpb" in kiln["checkpoints"][-1]
    assert rec["bpb_ratio"] == pytest.approx(kiln["bpb"] / hf["bpb"])
    assert score_bpb(hf["model_dir"], load_texts(small))["bpb"] == pytest.approx(hf["bpb"], rel=1e-9)
    (also,) = rec["also"]
    kiln_dir = tmp_path / "a" / "kiln-export" / f"step_{kiln['steps']}"
    assert kiln["export_dir"] == str(kiln_dir)
    assert also["path"] == str(other) and also["bytes"] == len(other.read_text().encode())
    assert also["kiln_bpb"] == pytest.approx(score_bpb(kiln_dir, load_texts(other))["bpb"], rel=1e-9)
    assert also["hf_bpb"] == pytest.approx(score_bpb(hf["model_dir"], load_texts(other))["bpb"], rel=1e-9)
    assert also["bpb_ratio"] == pytest.approx(also["kiln_bpb"] / also["hf_bpb"]) and f"also {other}: kiln bpb" in run.stdout
    if rec["kiln_time_to_hf"]:
        assert rec["kiln_time_to_hf"]["bpb"] <= hf["bpb"]
    short = rec["kiln_short"]  # a third kiln run planned for the HF run's train seconds, scored alike
    assert short is not None, rec["kiln_short_error"]
    assert short["budget_s"] == pytest.approx(2 * hf["train_s"]) and short["steps"] > 3
    assert short["reaches_hf"] == (short["bpb"] <= hf["bpb"]) and "kiln with 2.00 of HF's train time" in run.stdout

    # the same settings again: the HF side is reused; kiln plans its steps itself (kiln without time_budget)
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), *common, "--hf-result", str(results),
                          "--kiln-plan", "steps", "--short-fraction", "0", "--out-dir", str(tmp_path / "b")], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    again = json.loads(results.read_text().splitlines()[1])
    assert again["kiln"]["plan"] == "measured train.max_steps" and "--train.max_steps" in again["kiln"]["cmd"]
    assert str(results) in again["hf"]["reused_from"] and again["hf"]["bpb"] == hf["bpb"]
    assert "(reused)" in run.stdout and again["kiln_short"] is None
    assert again["also"][0]["hf_bpb"] == pytest.approx(also["hf_bpb"], rel=1e-9)  # the reused HF model, scored again
