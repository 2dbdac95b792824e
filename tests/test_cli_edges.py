"""The command line as a user types it: pipes into `head`, `~` in quoted paths, abbreviations and typos, help
that fits 80 columns."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import kiln_cmd, run_kiln
from kiln.config import load_config
from kiln.train.trainer import train
from test_train import small_overrides


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A HOME holding a tiny run with two checkpoints (steps 2 and 4), HOME/run, and its data files."""
    tmp = tmp_path_factory.mktemp("home")
    train(load_config("tiny", small_overrides(tmp, **{"train.max_steps": 4, "train.save_every": 2})), quiet=True)
    return tmp


def kiln_in(home: Path, *args: str) -> subprocess.CompletedProcess:
    """`kiln ARGS` with HOME=home, run from an empty folder inside it."""
    cwd = home / "cwd"
    cwd.mkdir(exist_ok=True)
    return run_kiln(*args, capture_output=True, text=True, timeout=600, cwd=cwd, env={**os.environ, "HOME": str(home)})


def test_training_piped_into_head_goes_on_to_its_checkpoint(tmp_path):
    """`kiln train ... | head -3`: the reader leaves after three lines; the run trains on (its output to
    os.devnull), saves its last checkpoint and exits 0, rather than stopping at the next print with nothing saved."""
    args = ["train", "tiny", *small_overrides(tmp_path), "--train.time_budget", "", "--train.max_steps", "12",
            "--train.log_every", "1", "--train.save_every", "100"]
    proc = subprocess.Popen(kiln_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert all(lines) and "Traceback" not in err, err
    assert (tmp_path / "run" / "checkpoints" / "step_12").is_dir()
    assert '"step": 12' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_usage_into_a_closed_pipe_is_quiet_and_bare_kiln_prints_it_to_stderr():
    """`kiln --help | head -1` and bare `kiln | head -1`: no BrokenPipe traceback. Bare `kiln` is a mistake: the
    usage goes to stderr (exit 2), so `kiln | head` shows nothing on stdout."""
    for args in (["--help"], ["-h"], []):
        proc = subprocess.Popen(kiln_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # before the interpreter has started: its first write meets a closed pipe
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == (2 if not args else 0), err
        assert "Traceback" not in err and "Exception ignored" not in err, err
    for args, usage in (([], "kiln <command>"), (["data"], "kiln data"), (["tokenizer"], "kiln tokenizer")):
        res = subprocess.run(kiln_cmd(*args), capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and res.stdout == "" and usage in res.stderr, res.stdout


def test_a_tilde_no_shell_expanded_means_home(home):
    """`--checkpoint=~/run`, a quoted '~/run' and `--out '~/x'` reach kiln with the ~ as typed: it means HOME,
    as in the shell, not a folder named ~ in the working folder."""
    res = kiln_in(home, "eval", "--checkpoint=~/run", "--data", "~/val.jsonl", "--max-tokens", "64")
    assert res.returncode == 0 and '"loss"' in res.stdout, res.stderr
    res = kiln_in(home, "generate", "--checkpoint", "~/run", "--prompt", "a", "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr
    res = kiln_in(home, "export", "--checkpoint", "~/run", "--out", "~/hf")
    assert res.returncode == 0 and (home / "hf" / "config.json").is_file(), res.stderr
    res = kiln_in(home, "import", "--hf", "~/hf", "--out", "~/imported")
    assert res.returncode == 0 and (home / "imported" / "config.yaml").is_file(), res.stderr
    res = kiln_in(home, "average", "~/run", "--last", "2", "--out", "~/avg")
    assert res.returncode == 0 and (home / "avg" / "checkpoints").is_dir(), res.stderr
    res = kiln_in(home, "logs", "plot", "~/run", "--out", "~/p.png")
    assert res.returncode == 0 and (home / "p.png").is_file(), res.stderr
    res = kiln_in(home, "logs", "compare", "~/run", "~/run", "--out=~/c.png")
    assert res.returncode == 0 and (home / "c.png").is_file(), res.stderr
    assert not (home / "cwd" / "~").exists()


@pytest.mark.parametrize("args", [["bench", "tiny", "--step", "3"], ["train", "--dry"],
                                  ["generate", "--checkpoint", "nowhere", "--prom", "hi"],
                                  ["eval", "--checkpoint", "nowhere", "--dat", "x"],
                                  ["logs", "plot", "nowhere", "--ou", "p.png"]])
def test_an_abbreviated_option_is_refused_not_taken_for_the_long_one(args, tmp_path):
    """argparse takes `--step` for `--steps` and `--dry` for `--dry-run` by default: a typo that runs something
    else. Every kiln parser wants the option in full."""
    res = run_kiln(*args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert args[-2] in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.parametrize("args, line", [
    (["trian"], "kiln: error: unknown command 'trian'; did you mean train?"),
    (["data", "inspekt", "x"], "kiln data: error: unknown command 'inspekt'; did you mean inspect?"),
    (["tokenizer", "trian"], "kiln tokenizer: error: unknown command 'trian'; did you mean train?"),
    (["train", "--fersh"], "kiln train: error: unrecognized argument --fersh; did you mean --fresh?"),
    (["sft", "--checkpoint", "x", "--data", "y", "--val-dta", "z"],
     "kiln sft: error: unrecognized argument --val-dta; did you mean --val-data?"),
    (["estimate", "tiny", "--devise", "cpu"], "kiln estimate: error: unrecognized argument --devise; did you mean "
                                              "--device?")])
def test_a_typo_gets_the_nearest_name(args, line):
    """A mistyped command or option is refused (exit 2) with one error line that names the nearest real one."""
    res = run_kiln(*args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith(line), res.stderr


HELP = ["", "train", "generate", "chat", "eval", "sft", "dpo", "rlvr", "import", "export", "average", "presets",
        "control", "logs", "logs summary", "logs plot", "logs compare", "doctor", "bench", "estimate", "data",
        "data prepare", "data inspect", "data verify", "tokenizer", "tokenizer train", "tokenizer stats"]


@pytest.mark.parametrize("command", HELP)
def test_every_help_fits_80_columns(command):
    """`kiln [COMMAND] --help` in an 80-column terminal: no line wider than 80."""
    env = {**os.environ, "COLUMNS": "80"}
    res = run_kiln(*command.split(), "--help", capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.startswith(("usage: kiln", "kiln ")), res.stderr
    wide = [line for line in res.stdout.splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)


def test_tables_written_to_a_file_fit_80_columns(home, tmp_path):
    """`kiln logs summary RUNS > file` and `kiln doctor > file`: the tables take $COLUMNS, else 80 columns (they
    were drawn 100 to 160 wide); the JSON lines after them stay whole."""
    import shutil

    runs = []
    for i in range(4):
        run = tmp_path / f"a-longer-run-name-{i}"
        run.mkdir()
        shutil.copy(home / "run" / "metrics.jsonl", run / "metrics.jsonl")
        runs.append(str(run))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    res = run_kiln("logs", "summary", *runs, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    table = [line for line in res.stdout.splitlines() if not line.startswith("{")]
    assert len(table) > 5 and max(map(len, table)) <= 80, res.stdout
    res = run_kiln("logs", "summary", *runs, capture_output=True, text=True, timeout=120,
                   env={**env, "COLUMNS": "120"})
    assert max(len(line) for line in res.stdout.splitlines() if not line.startswith("{")) > 80
    res = run_kiln("doctor", "tiny", "--out-dir", str(tmp_path / "doc"), capture_output=True, text=True, timeout=300,
                   env=env)
    table = [line for line in res.stdout.splitlines() if not line.startswith("{")]
    assert res.returncode == 0 and "kiln doctor" in table[0] and max(map(len, table)) <= 80, res.stdout


def undescribed(help_text: str) -> list[str]:
    """The options and positionals of an argparse help text that have no description."""
    lines, bare, listed = help_text.splitlines(), [], False
    for i, line in enumerate(lines):
        if line.endswith(":") and not line.startswith(" "):  # a section title
            listed = line in ("options:", "positional arguments:")
            continue
        if not listed or not re.match(r"  \S", line) or re.match(r"  \S.*?\s{2,}\S", line):
            continue  # not an entry, or its description on the same line
        after = lines[i + 1] if i + 1 < len(lines) else ""
        if not re.match(r"\s{4,}\S", after):  # nor on the next line
            bare.append(line.strip())
    return bare


@pytest.mark.parametrize("command", [c for c in HELP if c not in ("", "data", "tokenizer")])
def test_every_option_in_help_says_what_it_does(command):
    """`kiln COMMAND -h` describes every option and positional (export's --checkpoint and --out, data prepare's
    --split, the --device of generate / eval / chat had none)."""
    res = run_kiln(*command.split(), "-h", capture_output=True, text=True, timeout=120,
                   env={**os.environ, "COLUMNS": "80"})
    assert res.returncode == 0 and not undescribed(res.stdout), (undescribed(res.stdout), res.stdout)


def test_help_names_defaults_and_the_metavars_of_the_top_level_usage():
    """The defaults a user would otherwise read in the source, and the same names as `kiln --help`."""
    def helptext(*args: str) -> str:
        return run_kiln(*args, "-h", capture_output=True, text=True, timeout=120,
                        env={**os.environ, "COLUMNS": "80"}).stdout

    bench = helptext("bench")
    assert "(default 10)" in bench and "(default 3)" in bench and "PRESET: a preset name" in bench
    assert "sequences per forward pass (default 8)" in helptext("eval")
    prep = " ".join(helptext("data", "prepare").split())
    assert "(default 65536)" in prep and "split (default train)" in prep and "required unless --config" in prep
    usage = " ".join(run_kiln("--help", capture_output=True, text=True).stdout.split())
    assert "average CKPT CKPT ... --out DIR [--ema D] [--last K]" in usage
    assert "--out DIR [--ema D] [--last K]" in " ".join(helptext("average").split())
    assert "--checkpoint CKPT --out PATH" in helptext("export")


def test_estimate_table_headers_line_up_with_their_values():
    """`kiln estimate tiny`: each column's header ends where its values (their "GiB") end, and the table fits 80
    columns (the headers sat one and two characters left of the values)."""
    res = run_kiln("estimate", "tiny", "--device", "cpu", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("activation checkpointing"))
    header, rows = lines[head], lines[head + 1:head + 4]
    ends = [m.end() for m in re.finditer(r"\S+", header)][-2:]  # "activations", "peak"
    for row in rows:
        assert [m.end() for m in re.finditer("GiB", row)] == ends, (header, row)
    assert max(len(line) for line in lines[:-1]) <= 80, res.stdout  # the last line is the JSON


def test_average_takes_checkpoint_flags_as_every_other_command_does(home, tmp_path):
    """`kiln average --checkpoint A --checkpoint B --out DIR`, as generate / eval / export spell it, alone or with
    positional CKPTs; neither is one line."""
    a, b = (str(home / "run" / "checkpoints" / f"step_{n}") for n in (2, 4))
    res = run_kiln("average", "--checkpoint", a, "--checkpoint", b, "--out", str(tmp_path / "x"),
                   capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "averaged 2 checkpoints" in res.stdout, res.stderr
    res = run_kiln("average", a, "--checkpoint", b, "--out", str(tmp_path / "y"), capture_output=True, text=True,
                   timeout=300)
    assert res.returncode == 0 and "averaged 2 checkpoints" in res.stdout, res.stderr
    res = run_kiln("average", "--out", str(tmp_path / "z"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.splitlines()[-1].startswith("kiln average: error: the checkpoints"), \
        res.stderr


def test_the_command_kiln_import_prints_continues_pretraining_in_a_new_run(home, tmp_path):
    """`kiln import --hf DIR --out smol` prints `kiln train smol/config.yaml --data.train ...`; that command (and
    its --dry-run) trains into smol-train from smol's weights-only step_0, as the config says, rather than
    following the config into smol and refusing its weights-only checkpoint."""
    assert run_kiln("export", "--checkpoint", str(home / "run"), "--out", str(tmp_path / "hf"),
                    capture_output=True, text=True, timeout=300).returncode == 0
    smol = tmp_path / "smol"
    res = run_kiln("import", "--hf", str(tmp_path / "hf"), "--out", str(smol), capture_output=True, text=True,
                   timeout=300)
    assert res.returncode == 0 and f"kiln train {smol / 'config.yaml'} --data.train" in res.stdout, res.stderr
    args = ["train", str(smol / "config.yaml"), "--data.train", str(home / "train.jsonl"), "--data.val",
            str(home / "val.jsonl"), "--train.max_steps", "2", "--train.eval_tokens", "64",
            "--train.sample_tokens", "0", "--train.seq_len", "32", "--train.global_batch_size", "2",
            "--train.micro_batch_size", "2"]
    dry = run_kiln(*args, "--dry-run", capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and f"run folder       {tmp_path / 'smol-train'} (new)" in dry.stdout, dry.stderr
    res = run_kiln(*args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "smol-train" / "checkpoints" / "step_2").is_dir()
    assert [c.name for c in (smol / "checkpoints").iterdir()] == ["step_0"]
    # a run folder whose latest checkpoint is weights-only: the dry run refuses it as the run does
    dry = run_kiln("train", "tiny", "--run.out_dir", str(smol), "--dry-run", capture_output=True, text=True,
                   timeout=300)
    assert dry.returncode == 2 and "a weights-only checkpoint" in dry.stderr.splitlines()[-1], dry.stderr
