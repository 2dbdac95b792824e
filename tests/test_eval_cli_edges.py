"""`kiln eval` as a user types it, at its edges: the bundled heldout-next task, a --seq-len past the model's
context, GSM8K few-shot and answer checks, a multiple-choice answer that is a boolean."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from kiln.cli import main
from test_sft import base_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One tiny checkpoint (model.max_seq_len 128, train.seq_len 64) for the module."""
    return base_checkpoint(tmp_path_factory.mktemp("eval-edges"))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def kiln_eval(capsys):
    """`kiln eval --checkpoint CKPT ARGS` through kiln.cli.main, in this process (the command's own parsing,
    loading and one-line errors, without a Python start per case)."""
    def run(ckpt, *args: str) -> Result:
        code = main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", *args])
        out, err = capsys.readouterr()
        return Result(code, out, err)
    return run


def error_line(res: Result) -> str:
    """The one line a refused command prints (and nothing else on stderr)."""
    assert res.returncode == 2, res.stdout[-1000:] + res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[-2000:]
    return lines[0]


def test_eval_mc_scores_the_bundled_heldout_next_task_as_training_does(ckpt, kiln_eval):
    """`--data heldout-next` is train.eval_tasks' bundled task (it was "no such file"): the same items, drawn with
    the run's seed, and the accuracy kiln's in-training scorer (kiln.eval.suite.score_tasks) gives the model."""
    from kiln.data.tokenizer import load_tokenizer
    from kiln.device import autocast_for
    from kiln.eval.suite import load_tasks, score_tasks
    from kiln.train.checkpoint import load_for_inference

    res = kiln_eval(ckpt, "--task", "mc", "--data", "heldout-next", "--limit", "12")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    model, cfg, _ = load_for_inference(str(ckpt), device="cpu")
    tasks = load_tasks(["heldout-next"], limit=12, seed=cfg.run.seed)
    with autocast_for(cfg.train.dtype, next(model.parameters()).device):
        want = score_tasks(model, load_tokenizer(cfg.data.tokenizer), tasks, max_len=cfg.train.seq_len,
                           batch_size=cfg.train.micro_batch_size)
    assert out["n"] == 12 and out["data"] == "heldout-next"
    assert out["acc"] == pytest.approx(want["eval/heldout-next/acc"])
    assert out["acc_norm"] == pytest.approx(want["eval/heldout-next/acc_norm"])
    # without --limit: the items the run scored (train.eval_tasks_limit), not all 1730 (compared with none)
    res = kiln_eval(ckpt, "--task", "mc", "--data", "heldout-next")
    assert res.returncode == 0 and json.loads(res.stdout.strip().splitlines()[-1])["n"] == cfg.train.eval_tasks_limit


@pytest.mark.parametrize("task", [[], ["--task", "gsm8k"]])
def test_heldout_next_is_a_multiple_choice_task(ckpt, kiln_eval, task):
    """The default loss task looked it up on the HF hub (offline: "Couldn't reach 'heldout-next'")."""
    assert error_line(kiln_eval(ckpt, *task, "--data", "heldout-next")) == (
        "kiln: error: --data heldout-next is a bundled multiple-choice task; score it with --task mc")


def test_eval_refuses_a_seq_len_past_the_models_context(ckpt, tmp_path, kiln_eval):
    """Positions past model.max_seq_len were never trained: refused, as `kiln train` refuses train.seq_len."""
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert error_line(kiln_eval(ckpt, "--data", str(data), "--seq-len", "256")) == (
        f"kiln: error: --seq-len 256 exceeds the model's max_seq_len (128) of {ckpt}; pass --seq-len 128 or less")


def test_gsm8k_refuses_more_fewshot_examples_than_the_file_has(ckpt, tmp_path, kiln_eval):
    data, shots = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "What is 1+1?", "answer": "#### 2"}) + "\n")
    shots.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(2)))
    assert error_line(kiln_eval(ckpt, "--task", "gsm8k", "--data", str(data), "--num-fewshot", "5",
                                "--fewshot-data", str(shots))) == (
        f"kiln: error: --fewshot-data {shots} has 2 examples; lower --num-fewshot 5 to 2 or fewer, or add examples")


def test_gsm8k_refuses_an_answer_without_a_number(ckpt, tmp_path, kiln_eval):
    """Such a record could only ever be scored wrong: one line naming the file and the record's line."""
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n"
                    + json.dumps({"question": "Why?", "answer": "no number"}) + "\n")
    assert error_line(kiln_eval(ckpt, "--task", "gsm8k", "--data", str(data))) == (
        f"kiln: error: {data}:2: answer 'no number' holds no number; give the reference as \"... #### N\" "
        "(or the number itself)")


def test_a_boolean_mc_answer_is_shown_as_given(ckpt, tmp_path, kiln_eval):
    """`"answer": true` is no choice index: the message shows True, not None."""
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"context": "1 is", "choices": [" odd", " even"], "answer": True}) + "\n")
    assert error_line(kiln_eval(ckpt, "--task", "mc", "--data", str(data))) == (
        f"kiln: error: {data}:1: answer True is not a choice index, letter or choice text")


def test_a_file_as_the_checkpoint_is_named_as_a_file(ckpt, tmp_path, kiln_eval):
    """It said "no complete checkpoint found (expected FILE/checkpoints/step_<N>/meta.json)"."""
    from kiln.train.checkpoint import resolve_checkpoint

    step = resolve_checkpoint(ckpt)
    data = tmp_path / "text.txt"
    data.write_text("Some text to score. " * 20)
    assert error_line(kiln_eval(step / "meta.json", "--data", str(data))) == (
        f"kiln: error: {step / 'meta.json'}: a file, not a checkpoint or run folder; pass the checkpoint folder it is "
        f"in, {step}")
    assert error_line(kiln_eval(data, "--data", str(data))) == (
        f"kiln: error: {data}: a file, not a checkpoint or run folder")


@pytest.mark.parametrize("record, message", [
    ({"question": 7, "choices": ["a", "b"], "answer": 0}, "'question' must be a string, got 7"),
    ({"choices": {"text": ["a", "b"]}, "answerKey": "A"}, "no 'question' field"),
    ({"ctx": "c", "endings": [1, 2], "label": 0}, "'endings' must be a list of at least two strings, got [1, 2]"),
    ({"ctx_a": 5, "endings": ["a", "b"], "label": 0}, "'ctx_a' must be a string, got 5"),
    ({"ctx": "c", "endings": "ab", "label": 0}, "'endings' must be a list of at least two strings, got \"ab\""),
    ({"ctx": "c", "endings": ["a"], "label": 0}, "'endings' must be a list of at least two strings, got [\"a\"]"),
    ({"question": "q", "choices": {"text": "ab", "label": ["A", "B"]}, "answerKey": "A"},
     "'choices.text' must be a list of at least two strings, got \"ab\""),
    ({"context": "c", "choices": ["a", "b"], "answer": "Z"},
     "answer index 25 (the letter 'Z') is outside the 2 choices (0-1, A-B)"),
])
def test_a_malformed_mc_record_is_one_line(ckpt, tmp_path, kiln_eval, record, message):
    """Fields of the wrong type were tracebacks (AttributeError, KeyError, TypeError), and a string of endings
    was scored as its letters (acc 1.0 from a broken file)."""
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"context": "1 is", "choices": [" odd", " even"], "answer": 0}) + "\n"
                    + json.dumps(record) + "\n")
    assert error_line(kiln_eval(ckpt, "--task", "mc", "--data", str(data))) == f"kiln: error: {data}:2: {message}"


def test_bits_per_byte_counts_the_scored_text_whatever_the_row_length(tmp_path, kiln_eval):
    """Each row was decoded on its own, which drops the space its first token carries: the bytes, and so bits
    per byte, changed with --seq-len (80 bytes at 8 tokens, 81 at the default, for one text). The bytes are
    now those of the scored text: each document but its first token, which is only ever an input."""
    from kiln.config import load_config
    from kiln.data.tokenizer import load_tokenizer
    from kiln.train.checkpoint import read_config, resolve_checkpoint
    from kiln.train.trainer import train

    ckpt = tmp_path / "run"  # a SentencePiece-style tokenizer (Metaspace), as Mistral v3 and bundled-4k are
    train(load_config("tiny", ["--data.tokenizer", "bundled-4k", "--model.vocab_size", "4096", "--model.d_model",
                               "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "1",
                               "--model.ffn_dim", "64", "--train.seq_len", "64", "--train.max_steps", "1",
                               "--train.time_budget", "", "--train.eval_tokens", "64", "--train.sample_tokens", "0",
                               "--run.out_dir", str(ckpt)]), quiet=True)
    texts = ["Whether tis nobler in the mind to suffer the slings and arrows", "Or to take arms against a sea"]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = load_tokenizer(read_config(resolve_checkpoint(ckpt)).data.tokenizer)
    want = sum(len(t.encode()) - len(tok.decode(tok.encode(t)[:1]).encode()) for t in texts)
    for seq_len in ("8", "13", "64"):
        res = kiln_eval(ckpt, "--data", str(data), "--seq-len", seq_len)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.strip().splitlines()[-1])["bytes"] == want, (seq_len, res.stdout[-500:])


def test_a_run_folder_as_data_is_named_as_one(ckpt, kiln_eval):
    """`--data runs/x` was read as a folder of JSON files: "cannot read as json (CastError: Couldn't cast)"."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    assert error_line(kiln_eval(ckpt, "--data", str(run))) == (
        f"kiln: error: --data {run}: a kiln run folder, not text to score; pass a text, jsonl or parquet source "
        f"(or --checkpoint {run} to evaluate that run)")


def test_loss_takes_the_split_of_a_hub_dataset_and_refuses_options_a_source_cannot_use(ckpt, tmp_path, kiln_eval,
                                                                                      monkeypatch):
    """`--split` never reached the loss task (an HF dataset's train split was scored whatever was asked), and
    `--split` or `--text-column` on a local text file were ignored without a word."""
    text = tmp_path / "a.txt"
    text.write_text("some words to score\n")
    assert error_line(kiln_eval(ckpt, "--data", str(text), "--split", "test")) == (
        f"kiln: error: --split applies to an HF dataset name; {text} is a local source with no splits: drop it")
    assert error_line(kiln_eval(ckpt, "--data", str(text), "--text-column", "body")) == (
        f"kiln: error: --text-column applies to jsonl, json and parquet sources; {text} is plain text: drop it")
    import kiln.eval.run as run
    from kiln.errors import DataError

    seen = []

    def fake(src, *a, **k):  # the hub is offline here: the source as the loader would get it
        seen.append(src.split)
        raise DataError("offline")

    monkeypatch.setattr(run, "validation_batches", fake)
    for args, split in ((["--split", "validation"], "validation"), ([], "train")):
        assert error_line(kiln_eval(ckpt, "--data", "org/some-dataset", *args)) == "kiln: error: offline"
        assert seen[-1] == split


def test_gsm8k_says_when_its_few_shot_examples_are_the_items_it_scores(ckpt, tmp_path, kiln_eval):
    """`--fewshot-data` the same file as `--data` put scored items' answers into every prompt, without a word."""
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(3)))
    res = kiln_eval(ckpt, "--task", "gsm8k", "--data", str(data), "--num-fewshot", "2", "--fewshot-data", str(data),
                    "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    assert (f"note: 2 of the 2 few-shot examples are items scored here (--fewshot-data {data} holds them): their "
            "answers are in every prompt") in res.stderr


def test_eval_takes_a_precision_and_says_which_it_used(ckpt, kiln_eval, tmp_path):
    """kiln eval ran under the checkpoint's train.dtype (auto: bf16 autocast on a bf16 CPU) and said nothing of
    it, so an fp32 transformers run of the export differed by 9e-4 with no way to compare exactly. --dtype fp32
    scores in fp32; the JSON names the precision."""
    import contextlib

    from kiln.config import SourceConfig
    from kiln.data.loader import validation_batches
    from kiln.data.tokenizer import load_tokenizer
    from kiln.eval.loss import evaluate
    from kiln.train.checkpoint import load_for_inference

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox jumps"}) + "\n" for i in range(20)))
    runs = {}
    for dtype in ("fp32", "bf16"):
        res = kiln_eval(ckpt, "--data", str(data), "--dtype", dtype)
        assert res.returncode == 0, res.stderr[-2000:]
        runs[dtype] = json.loads(res.stdout.strip().splitlines()[-1])
    assert runs["fp32"]["precision"] == "fp32" and runs["bf16"]["precision"] == "bf16 autocast"
    model, cfg, _ = load_for_inference(str(ckpt), device="cpu")
    batches = validation_batches(SourceConfig(path=str(data), name="t"), load_tokenizer(cfg.data.tokenizer),
                                 seq_len=cfg.train.seq_len, batch_size=8, max_tokens=1_000_000)
    ref = evaluate(model, batches, device=next(model.parameters()).device, doc_mask=cfg.data.doc_mask,
                   autocast=contextlib.nullcontext(), impl=cfg.train.loss_impl)
    assert runs["fp32"]["loss"] == ref["loss"] != runs["bf16"]["loss"]
