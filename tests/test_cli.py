"""The real CLI: each bad input gives one line on stderr, exit code 2, and leaves checkpoints untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import kiln_cmd, run_kiln
from kiln.config import load_config
from kiln.train import checkpoint as ckpt_io
from kiln.train.trainer import train
from test_train import small_overrides


def run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_kiln(*args, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr + res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny run with two checkpoints, shared by the error cases below."""
    tmp = tmp_path_factory.mktemp("cli")
    over = small_overrides(tmp, **{"train.max_steps": 4, "train.save_every": 2})
    train(load_config("tiny", over), quiet=True)
    return tmp, over


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [oops\n")
    assert_user_error(run("train", str(bad)), str(bad), "malformed YAML")
    assert_user_error(run("train", str(tmp_path / "none.yaml")), "none.yaml", "no such config file")
    assert_user_error(run("train", "tiny", "--model.n_layrs", "2"), "unknown key 'model.n_layrs' (did you mean "
                                                                     "model.n_layers?)")
    # the closest key, the same every time (it was the first of a set: eval_tasks, eval_tasks_limit, ...); other
    # trainers' names; a key of another section
    for typo, meant in [("train.eval_evry", "train.eval_every"), ("optim.learning_rate", "optim.lr"),
                        ("train.batch_size", "train.micro_batch_size"), ("train.lr", "optim.lr")]:
        assert_user_error(run("train", "tiny", f"--{typo}", "5"), f"unknown key '{typo}' (did you mean {meant}?)")
    assert_user_error(run("train", "tiny", "--train.seq_len", "long"), "train.seq_len", "expected an integer")
    assert_user_error(run("train", "tiny", "--model.n_kv_heads", "3"), "model.n_kv_heads")
    # a folder named like a preset in the working directory (a run or an export called `tiny`) does not hide it;
    # a folder that names no preset is refused as a folder
    (tmp_path / "tiny").mkdir()
    res = run("estimate", "tiny", cwd=tmp_path)
    assert res.returncode == 0 and "tiny" in res.stdout, res.stderr
    (tmp_path / "exports").mkdir()
    assert_user_error(run("train", "exports", cwd=tmp_path), "exports: a folder, not a config file")


def test_data_errors(tmp_path, trained):
    _, over = trained
    base = [o for o in over]

    def with_train(spec: str) -> list[str]:
        out = list(base)
        i = out.index("--data.train")
        out[i + 1] = json.dumps([{"path": spec}])
        j = out.index("--run.out_dir")
        out[j + 1] = str(tmp_path / "fresh-run")
        return out

    missing = tmp_path / "missing.jsonl"
    assert_user_error(run("train", "tiny", *with_train(str(missing))), "data.train[0]", str(missing))
    assert_user_error(run("train", "tiny", *with_train(str(tmp_path / "nothing-*.jsonl"))), "nothing-*.jsonl")
    # one path as the whole list, as a user types it; --dry-run says what the run would (it said nothing)
    plain = [*base, "--data.val", str(missing), "--run.out_dir", str(tmp_path / "fresh-run")]
    for extra in ([], ["--dry-run"]):
        assert_user_error(run("train", "tiny", *plain, *extra), f"data.val[0]: {missing}: no such file")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for extra in ([], ["--dry-run"]):  # --dry-run said nothing of an empty file; the run then refused it
        assert_user_error(run("train", "tiny", *with_train(str(empty)), *extra),
                          f"data.train[0]: {empty}: empty source (the file is 0 bytes)")
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"body": "hello there"}) + "\n")
    assert_user_error(run("train", "tiny", *with_train(str(nocol))), str(nocol), "text")
    assert not (tmp_path / "fresh-run" / "checkpoints").exists()


def test_vocab_mismatch_and_unwritable_out_dir(tmp_path, trained):
    _, over = trained
    res = run("train", "tiny", *over, "--model.vocab_size", "1000", "--run.out_dir", str(tmp_path / "v"))
    assert_user_error(res, "32768", "model.vocab_size")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = run("train", "tiny", *over, "--run.out_dir", str(blocker / "sub"))
    assert_user_error(res, str(blocker / "sub"), "not writable")
    for extra in ([], ["--fresh"], ["--dry-run"]):  # the file itself: --fresh and --dry-run were tracebacks
        res = run("train", "tiny", *over, "--run.out_dir", str(blocker), *extra)
        assert_user_error(res, f"run.out_dir {blocker}: a file, not a folder; pass --run.out_dir DIR")
    assert blocker.read_text() == "x"


def test_a_finished_run_says_nothing_to_train_without_a_schedule_note(trained):
    """A rerun with a shorter train.max_steps printed "note: resuming step_4 with train.max_steps 4 -> 3: the LR
    schedule ... follow the new values from here" and then that there was nothing to train."""
    tmp, over = trained
    res = run("train", "tiny", *over, "--train.max_steps", "3")
    assert res.returncode == 0 and "nothing to train: it is complete at step 4" in res.stdout, res.stderr[-2000:]
    assert "note: resuming" not in res.stderr + res.stdout
    dry = run("train", "tiny", *over, "--train.max_steps", "3", "--dry-run")  # it said "(resumes from step_4)"
    assert dry.returncode == 0 and "nothing to train: it is complete at step_4" in dry.stdout, dry.stderr[-2000:]
    assert "note: resuming" not in dry.stdout


def test_resume_refuses_another_architecture_and_touches_nothing(trained):
    tmp, over = trained
    ckpts = tmp / "run" / "checkpoints"
    before = tree_digest(ckpts)
    res = run("train", "tiny", *over, "--model.d_model", "64", "--train.max_steps", "6")
    assert_user_error(res, "model.d_model", "--fresh")
    assert tree_digest(ckpts) == before
    # another optimizer's state does not load: said as such, not as a corrupt checkpoint to move aside
    res = run("train", "tiny", *over, "--optim.name", "adafactor", "--train.max_steps", "6")
    assert_user_error(res, "saved with optim.name=adamw but the config says adafactor", "--fresh")
    assert "corrupt" not in res.stderr and tree_digest(ckpts) == before
    # --dry-run and kiln doctor say so before a run is started (both passed it: "resumes from the latest")
    res = run("train", "tiny", *over, "--model.d_model", "64", "--dry-run")
    assert_user_error(res, "saved with model.d_model=32 but the config says 64", "--fresh")
    res = run("train", "tiny", *over, "--train.max_steps", "6", "--dry-run")
    assert res.returncode == 0 and f"run folder       {tmp / 'run'} (resumes from step_" in res.stdout, res.stderr
    # a longer run moves the LR from the resumed step on: allowed, and said (the run says it at its start too)
    assert "note: resuming step_" in res.stdout and "with train.max_steps " in res.stdout and " -> 6: the LR" in res.stdout
    from kiln import doctor  # its out-dir check, without the model and data checks a CLI run adds (~10 s)

    status, detail = doctor.check_out_dir(doctor.Context(cfg=load_config("tiny"), device=doctor.torch.device("cpu"),
                                                         out_dir=tmp / "run"))
    assert status == "FAIL" and "saved with model.d_model=32 but the config says 128" in detail, detail
    assert detail.startswith("`kiln train` would stop: ") and "--fresh" in detail  # doctor itself takes no --fresh
    assert tree_digest(ckpts) == before


def test_corrupt_checkpoint_without_checksums_is_a_clear_error(trained, tmp_path):
    """A checkpoint written before checkpoints carried checksums cannot be verified (one note says
    so); a torn shard or a garbled state file in it still ends generate and resume with one error
    line from the loaders themselves, and nothing is touched. (Checkpoints with checksums:
    tests/test_checkpoint_integrity.py.)"""
    tmp, over = trained
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tmp / "run", copy)
    latest = sorted((copy / "checkpoints").iterdir())[-1]
    meta = json.loads((latest / "meta.json").read_text())
    for key in ("checksum", "files", "files_checksum", "meta_checksum"):
        meta.pop(key)
    (latest / "meta.json").write_text(json.dumps(meta))
    shards = sorted((latest / "dcp").glob("*.distcp"))
    assert shards, "the checkpoint holds DCP shards"
    shards[0].write_bytes(shards[0].read_bytes()[: shards[0].stat().st_size // 2])  # torn write
    before = tree_digest(copy / "checkpoints")
    out = [*over]
    out[out.index("--run.out_dir") + 1] = str(copy)

    def assert_unverified_error(res: subprocess.CompletedProcess, *needles: str) -> None:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 2 and "cannot be verified" in lines[0], res.stderr
        assert_user_error(subprocess.CompletedProcess(res.args, res.returncode, res.stdout, lines[1]), *needles)

    assert_unverified_error(run("train", "tiny", *out, "--train.max_steps", "6"), "dcp", "corrupt", ".corrupt")
    assert tree_digest(copy / "checkpoints") == before  # nothing touched
    # the half that survived may still hold every weight (DCP writes them first); tear into them too
    shards[0].write_bytes(shards[0].read_bytes()[:64])
    assert_unverified_error(run("generate", "--checkpoint", str(copy), "--prompt", "x"), "corrupt")
    shutil.copy(tmp / "run" / "checkpoints" / latest.name / "dcp" / shards[0].name, shards[0])  # repaired
    state = latest / "state" / "common.pt"
    state.write_bytes(b"garbage")
    assert_unverified_error(run("train", "tiny", *out, "--train.max_steps", "6"), "common.pt", "corrupt")
    assert_user_error(run("generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"), "nowhere")


def test_help_and_unknown_command():
    res = run("--help")
    assert res.returncode == 0 and "kiln <command>" in res.stdout
    res = run("nonsense")
    assert res.returncode == 2 and "unknown command 'nonsense'" in res.stderr
    # `kiln presets | head -1`: a reader that leaves early is no traceback (nor "Exception ignored" at exit)
    proc = subprocess.Popen(kiln_cmd("presets"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and err == "", err


def test_relative_tokenizer_and_chat_template_paths_work_from_another_folder(tmp_path):
    """A run trained with `--data.tokenizer tok` (a folder where the command ran) saves the absolute path, so
    generate and export from any other folder load it; the same for a chat template file."""
    from test_sft import CHATML, tiny_tokenizer

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    tiny_tokenizer(work / "tok")
    (work / "chat.jinja").write_text(CHATML)
    over = small_overrides(tmp_path, **{"data.tokenizer": "tok", "model.vocab_size": 320,
                                        "posttrain.chat_template": "chat.jinja", "train.max_steps": 2,
                                        "train.save_every": 1, "run.out_dir": "run"})
    res = run_kiln("train", "tiny", *over, "--quiet", cwd=work, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    run = work / "run"
    saved = load_config(str(run / "config.yaml"))
    assert (saved.data.tokenizer, saved.posttrain.chat_template) == (str(work / "tok"), str(work / "chat.jinja"))
    res = run_kiln("generate", "--checkpoint", str(run), "--prompt", "What is", "--max-new-tokens", "4",
                   cwd=elsewhere, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("What is"), res.stderr[-2000:]
    res = run_kiln("export", "--checkpoint", str(run), "--out", "hf", cwd=elsewhere,
                   capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((elsewhere / "hf" / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    # the template is kept with the checkpoint: export failed once the file moved, and wrote the file's new text
    # (not the one the model trained with) once it was edited
    (work / "chat.jinja").write_text("{{ 'CHANGED' }}")
    res = run_kiln("export", "--checkpoint", str(run), "--out", "hf2", cwd=elsewhere, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((elsewhere / "hf2" / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    (work / "chat.jinja").unlink()
    res = run_kiln("export", "--checkpoint", str(run), "--out", "hf3", cwd=elsewhere, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((elsewhere / "hf3" / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    # an average made with relative paths saves the checkpoint's own template by its absolute path (it was relative)
    res = run_kiln("average", "work/run", "--last", "2", "--out", "avg", cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (avg,) = ckpt_io.list_checkpoints(tmp_path / "avg") or [tmp_path / "avg"]
    template = load_config(str(avg / "config.yaml")).posttrain.chat_template
    assert Path(template).is_absolute() and Path(template).read_text() == CHATML, template


def test_presets_table_lists_every_preset_in_aligned_columns(capsys):
    """`kiln presets`: a row per preset, the parameter column aligned (a 22-character name pushed its row over)."""
    from kiln.cli import main
    from kiln.config import list_presets

    assert main(["presets"]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert [r.split()[0] for r in rows] == list_presets()
    ends = {r.index("M ") for r in rows}  # where each row's parameter count ends
    assert len(ends) == 1 and header.index("params") + len("params") == ends.pop() + 1, rows


def test_eval_and_generate_options_out_of_range_or_for_another_task_are_one_line(trained, capsys):
    """Values kiln eval / generate cannot use were tracebacks (--batch-size 0, a seed past int64) or silently
    replaced (--max-tokens 0 scored a row anyway); options the chosen --task does not read did nothing.
    In-process through kiln.cli.main: every refusal comes before a checkpoint is loaded."""
    from kiln.cli import main

    tmp, _ = trained
    ckpt = str(tmp / "run")

    def refused(argv: list[str]) -> str:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own exit
            code = e.code
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and "Traceback" not in err, (code, out, err)
        return err.strip().splitlines()[-1]

    for args, line in [
        (["eval", "--batch-size", "0"], "kiln eval: error: argument --batch-size: expected an integer >= 1, got 0"),
        (["eval", "--max-tokens", "-5"], "kiln eval: error: argument --max-tokens: expected an integer >= 1, got -5"),
        (["eval", "--task", "gsm8k", "--num-fewshot", "-2"],
         "kiln eval: error: argument --num-fewshot: expected an integer >= 0, got -2"),
        (["eval", "--limit", "3"], "kiln: error: --limit applies to --task mc or gsm8k, not --task loss; drop it"),
        (["eval", "--task", "mc", "--seq-len", "8"], "kiln: error: --seq-len applies to --task loss, not --task mc; "
                                                     "drop it"),
        (["eval", "--task", "mc", "--max-tokens", "5"], "kiln: error: --max-tokens applies to --task loss, not "
                                                        "--task mc; drop it"),
        (["generate", "--prompt", "x", "--seed", str(10**20)],
         f"kiln generate: error: argument --seed: expected an integer >= 0 below 2**63, got {10**20}"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"],
         "kiln generate: error: argument --max-new-tokens: expected an integer >= 1, got 0"),
        *([(["generate", "--prompt", "x", "--device", "cuda"],
            "kiln: error: --device cuda: no CUDA device is visible; use --device auto or cpu")]
          if not torch.cuda.is_available() else []),
        (["presets", "extra"], "kiln presets: error: unrecognized arguments: extra"),
    ]:
        cmd, *rest = args
        where = ["--checkpoint", ckpt, *(["--data", "bundled:val"] if cmd == "eval" else [])] if cmd != "presets" \
            else []
        assert refused([cmd, *where, *rest]) == line


def test_generate_reads_its_prompt_from_standard_input(trained):
    tmp, _ = trained
    args = kiln_cmd("generate", "--checkpoint", str(tmp / "run"), "--prompt", "-", "--max-new-tokens", "3",
                    "--temperature", "0")
    res = subprocess.run(args, input="Once upon a time", capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("Once upon a time"), res.stderr
    assert len(res.stdout) > len("Once upon a time")
    res = subprocess.run(args, input="", capture_output=True, text=True)
    assert res.returncode == 2 and "--prompt -: standard input was empty" in res.stderr
    assert "(--prompt '' samples from nothing)" in res.stderr  # what an empty --prompt does
    res = subprocess.run([*args, "--stop", ""], input="Once", capture_output=True, text=True)  # it was ignored
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "kiln: error: --stop '': an empty stop string matches nowhere; pass the text to stop at"], res.stderr


def test_data_commands_refuse_counts_they_cannot_use(tmp_path):
    """--seq-len 0 / --batch-size 0 were silently replaced by defaults; --workers -1 ran."""
    for args, needle in [(["verify", "bundled:val", "--seq-len", "0"], "argument --seq-len: expected an integer >= 1"),
                         (["verify", "bundled:val", "--batch-size", "0"], "argument --batch-size"),
                         (["prepare", "--source", "bundled:val", "--out", str(tmp_path / "p"), "--workers", "-1"],
                          "argument --workers: expected an integer >= 0")]:
        res = run("data", *args)
        assert res.returncode == 2 and needle in res.stderr.strip().splitlines()[-1], res.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", [["data", "prepare", "--out", "OUT"], ["tokenizer", "train", "--vocab-size", "300",
                                                                          "--out", "OUT"]])
def test_an_unquoted_source_glob_is_named_as_one(tmp_path, monkeypatch, capsys, command):
    """`--source web/*.jsonl` unquoted reaches kiln as `--source web/a.jsonl web/b.jsonl`: argparse said only
    "unrecognized arguments: web/b.jsonl". (In-process through kiln.cli.main: refused while parsing.)"""
    from kiln.cli import main

    (tmp_path / "web").mkdir()
    for n in "ab":
        (tmp_path / "web" / f"{n}.jsonl").write_text(json.dumps({"text": n}) + "\n")
    monkeypatch.chdir(tmp_path)
    argv = [*[str(tmp_path / "o") if a == "OUT" else a for a in command], "--source", "web/a.jsonl", "web/b.jsonl"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and err.endswith(
        "error: argument --source: one value each, but web/b.jsonl follows web/a.jsonl (a glob the shell expanded?): "
        "quote it, --source 'web/*.jsonl', so kiln expands it, or repeat --source"), err
    with pytest.raises(SystemExit):  # other stray words are argparse's own line
        main([*argv[:-1], "--bogus", "3"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: unrecognized arguments: --bogus 3")
    assert not (tmp_path / "o").exists()


def test_an_unquoted_data_glob_in_an_override_is_named_as_one(tmp_path, monkeypatch, capsys):
    from kiln.cli import main

    (tmp_path / "web").mkdir()
    for n in "ab":
        (tmp_path / "web" / f"{n}.jsonl").write_text(json.dumps({"text": n}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "tiny", "--data.train", "web/a.jsonl", "web/b.jsonl", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "kiln: error: unexpected argument 'web/b.jsonl' after --data.train web/a.jsonl: a glob the shell expanded? "
        "quote it (--data.train 'data/*.jsonl') so kiln expands it"]
    assert main(["train", "tiny", "--train.max_steps", "5", "oops", "--dry-run"]) == 2  # not a path: the usual line
    assert capsys.readouterr().err.strip().splitlines() == [
        "kiln: error: unexpected argument 'oops'; overrides look like --train.max_steps 50"]


def test_dry_run_refuses_a_tokenizer_the_model_cannot_hold(tmp_path):
    """--dry-run printed a plan (exit 0) for a config the run refuses at once: more tokenizer ids than rows."""
    res = run("train", "tiny", "--data.tokenizer", "bundled-4k", "--model.vocab_size", "2048", "--dry-run",
              "--run.out_dir", str(tmp_path / "r"))
    assert_user_error(res, "tokenizer 'bundled-4k' has 4096 ids but model.vocab_size is 2048")
    res = run("train", "tiny", "--data.tokenizer", "bundled-4k", "--dry-run", "--run.out_dir", str(tmp_path / "r"))
    assert res.returncode == 0 and "28672 embedding/head rows" in res.stderr, res.stderr
    assert not (tmp_path / "r").exists()


def test_dry_run_refuses_an_attention_backend_that_cannot_train_here(tmp_path):
    """On a CPU, --dry-run printed the plan for flex and flash, which the run then refused after its setup; and
    flash's line suggested flex, which cannot train on a CPU either."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine trains with both")
    for backend, line in [
        ("flex", "model.attention=flex has no backward on CPU in this PyTorch; train on CPU with "
                 "model.attention=sdpa (same document mask), or use flex on a GPU"),
        ("flash", "model.attention=flash runs on CUDA only (flash-attn 2), not on cpu; use model.attention=sdpa "
                  "here (flex too on a GPU)")]:
        for extra in (["--dry-run"], ["--train.max_steps", "1"]):
            res = run("train", "tiny", "--model.attention", backend, "--run.out_dir", str(tmp_path / "run"), *extra)
            assert res.returncode == 2 and res.stderr.strip().splitlines() == [f"kiln: error: {line}"], res.stderr
    assert not (tmp_path / "run").exists()
