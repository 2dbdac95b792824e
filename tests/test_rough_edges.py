"""Small things a user meets at the command line: a chat template path that is not there, and the dtype
spellings `kiln export` takes."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import run_kiln
from test_sft import CONVO, base_checkpoint, jsonl


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_kiln(*args, capture_output=True, text=True, timeout=600)


def test_a_missing_chat_template_file_is_named_as_missing(tmp_path):
    """`--posttrain.chat_template nothere.jinja` is a file the user meant: say it is not there, rather than
    listing the choices as if the value were misspelt (which a word that is not a path still gets)."""
    ckpt = base_checkpoint(tmp_path)
    data = jsonl(tmp_path / "chats.jsonl", [{"messages": CONVO}])
    for value, line in [
        ("nothere.jinja", "posttrain.chat_template: no such file nothere.jinja; pass auto, kiln, or a path to a "
                          ".jinja file"),
        ("kilm", "posttrain.chat_template='kilm': expected auto, kiln, or a path to a .jinja file"),
    ]:
        res = run_cli("sft", "--checkpoint", str(ckpt), "--data", str(data), "--run.out_dir", str(tmp_path / "sft"),
                      "--posttrain.chat_template", value)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [f"kiln: error: {line}"], res.stderr[-2000:]


def test_hf_export_takes_the_short_dtype_names_gguf_takes(tmp_path):
    """`--dtype bf16` (GGUF's spelling, and the one train.dtype uses) works for an HF export too and is
    recorded under its HF name; an unknown one lists every spelling."""
    from safetensors import safe_open

    ckpt = base_checkpoint(tmp_path)
    out = tmp_path / "hf"
    res = run_cli("export", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "bf16")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "kiln_export.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    res = run_cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf-x"), "--dtype", "int8")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "kiln: error: --dtype 'int8': expected float32 (fp32, f32), bfloat16 (bf16) or float16 (fp16, f16)"]
    assert not (tmp_path / "hf-x").exists()


def test_an_empty_out_dir_is_refused_not_taken_as_the_default(tmp_path):
    """`--run.out_dir "$OUT"` with OUT unset went to runs/<name>, where it could resume another run."""
    for extra in ([], ["--dry-run"]):
        res = run_kiln("train", "tiny", "--run.out_dir", "", "--train.max_steps", "1", *extra, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [
            "kiln: error: --run.out_dir is empty; pass a folder, or leave it out for runs/tiny"], res.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_an_empty_config_file_is_refused_not_read_as_all_defaults(tmp_path):
    """An empty YAML (or one of comments only: a failed redirect, an unsaved editor) trained with every default,
    a 32768-entry model on bundled:train, as if it were a config."""
    for text in ("", "# my run\n"):
        cfg = tmp_path / "run.yaml"
        cfg.write_text(text)
        res = run_kiln("train", str(cfg), "--dry-run", cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [
            f"kiln: error: {cfg}: empty; a config sets a section (model:, train:, ...) or starts from a preset with "
            "`base: tiny` (kiln presets lists them)"], res.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]


def test_a_folder_of_other_files_is_not_taken_as_a_run_folder(tmp_path):
    """`--run.out_dir ~/project` wrote config.yaml and checkpoints/ among the user's files, and with --fresh moved
    the whole folder aside as "the previous run". Refused, the folder as it was; a hidden file alone is no run."""
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "notes.txt").write_text("mine")
    (proj / "data.jsonl").write_text("{}\n")
    for extra in ([], ["--fresh"], ["--dry-run"]):
        res = run_kiln("train", "tiny", "--run.out_dir", str(proj), "--train.max_steps", "1", *extra,
                       capture_output=True, text=True, timeout=600)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [
            f"kiln: error: run.out_dir {proj}: holds files that are not a kiln run (data.jsonl, notes.txt); pass a "
            "new or empty folder as --run.out_dir"], res.stderr[-2000:]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]
        assert sorted(p.name for p in proj.iterdir()) == ["data.jsonl", "notes.txt"]
    from kiln.train.preflight import check_run_folder

    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".DS_Store").write_text("")
    check_run_folder(hidden)


def test_post_training_records_that_trained_wrongly_or_crashed_are_one_line(tmp_path, capsys):
    """Each was a traceback (bytes that are not UTF-8), trained silently on something else (a DPO pair with one
    reply twice; a reply conversation glued after another prompt; an RLVR answer null, read as "None"), or named
    no record (a template refusing a message order). In-process through kiln.cli.main: refused before a step."""
    from kiln.cli import main

    ckpt = base_checkpoint(tmp_path)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}\n')
    same = jsonl(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 3)
    glued = jsonl(tmp_path / "glued.jsonl", [{"prompt": "q", "rejected": "b", "chosen": [
        {"role": "user", "content": "OTHER"}, {"role": "assistant", "content": "a"}]}])
    null = jsonl(tmp_path / "null.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "x", "answer": None}])
    order = jsonl(tmp_path / "order.jsonl", [{"messages": [CONVO[0], {"role": "system", "content": "s"}, CONVO[1]]}])
    half = jsonl(tmp_path / "half.jsonl", [{"prompt": "a"}])
    cases = [
        ("sft", bad, f"{bad}:1: not UTF-8 text (byte 0xe9 at column 47); re-save the file as UTF-8"),
        ("dpo", same, f"{same}:1: every pair's chosen and rejected are the same text (as encoded); a preference "
                      "needs two different replies"),
        ("dpo", glued, f"{glued}:1: 'chosen' is a conversation that does not start with the prompt's messages; give "
                       "the reply alone, or the whole conversation from the prompt on"),
        ("rlvr", null, f"{null}:2: 'answer' must be a string or a number, got null"),
        ("sft", order, f"{order}:1: chat template 'kiln': 'kiln chat template: roles are system (first only), "
                       "user and assistant'"),
        ("sft", half, f"{half}:1: a prompt record needs \"completion\" too (or give \"messages\")"),
    ]
    for stage, data, line in cases:
        assert main([stage, "--checkpoint", str(ckpt), "--data", str(data), "--run.out_dir",
                     str(tmp_path / stage), "--train.max_steps", "1"]) == 2, (stage, data)
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"kiln: error: {line}", (stage, data)
        assert not (tmp_path / stage).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a GPU")
def test_run_device_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path):
    """The layout and `kiln generate --device` decide the device by one rule (kiln.device.pick_device)."""
    res = run_cli("train", "tiny", "--run.device", "cuda", "--train.max_steps", "1", "--run.out_dir",
                  str(tmp_path / "run"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == ("kiln: error: run.device=cuda but no CUDA device is visible; use "
                                                   "run.device=auto or cpu")
    assert not (tmp_path / "run").exists()
