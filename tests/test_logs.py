"""kiln logs summary/plot/compare on a real resumed run, and the W&B sink (offline)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_kiln
from kiln.cli import main
from kiln.config import load_config
from kiln.errors import KilnError
from kiln.logs import RunLog, find_run_dir, load_run, resolve_resumes, summarize
from kiln.train import checkpoint as ckpt_io
from kiln.train.metrics import read_metrics
from kiln.train.sinks import WandbSink, scalars, wandb_sink
from kiln.train.trainer import train
from test_train import small_overrides

C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run trained to step 8, "crashed" (checkpoints 6 and 8 lost), resumed from step 3 with a longer
    schedule to step 10: metrics.jsonl logs steps 4..8 twice, with different lr the second time.
    Also a copy of the run folder as it was before the crash (a second run for compare)."""
    tmp = tmp_path_factory.mktemp("logs")
    over = {"train.max_steps": 8, "train.save_every": 3, "train.eval_every": 3}
    train(load_config("tiny", small_overrides(tmp, **over)), quiet=True)
    run = tmp / "run"
    before = tmp / "before" / "run"
    before.parent.mkdir()
    shutil.copytree(run, before, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    n_first = len(read_metrics(run))
    for step in (6, 8):
        shutil.rmtree(run / "checkpoints" / f"step_{step}")
    assert ckpt_io.list_checkpoints(run)[-1].name == "step_3"
    train(load_config("tiny", small_overrides(tmp, **{**over, "train.max_steps": 10})), quiet=True)
    return {"run": run, "before": before, "n_first": n_first}


def test_resumed_run_keeps_the_latest_timeline(runs):
    raw = read_metrics(runs["run"])
    first, second = raw[:runs["n_first"]], raw[runs["n_first"]:]
    assert second[0]["kind"] == "train" and second[0]["step"] == 4  # resumed from step_3
    # reference: what the first segment logged before step 4, then everything the second logged
    want_train = [r for r in first if r["kind"] == "train" and r["step"] < 4] + \
                 [r for r in second if r["kind"] == "train"]
    want_eval = [r for r in first if r["kind"] == "eval" and r["step"] < 4] + \
                [r for r in second if r["kind"] == "eval"]
    log = load_run(runs["run"])
    assert log.train == want_train and [r["step"] for r in log.train] == list(range(1, 11))
    assert [r["step"] for r in log.eval] == [0, 3, 6, 9, 10]  # the lost timeline's eval at 8 is gone
    assert log.eval == want_eval
    old_lr = {r["step"]: r["lr"] for r in first if r["kind"] == "train"}
    assert log.train[4]["lr"] != old_lr[5]  # the longer schedule really changed the replayed steps
    assert log.superseded == 5 + 2  # train 4..8, eval 6 and 8

    s = summarize(log)
    losses = [r["loss"] for r in want_train]
    evals = [r["eval_loss"] for r in want_eval]
    assert s["steps"] == 10 and s["tokens_seen"] == 10 * 4 * 32
    assert s["loss"] == losses[-1] and s["best_loss"] == min(losses)
    assert s["best_loss_step"] == want_train[losses.index(min(losses))]["step"]
    assert s["eval_loss"] == evals[-1] and s["best_eval_loss"] == min(evals)
    assert s["eval_loss/toyval"] == want_eval[-1]["eval_loss/toyval"]
    assert s["tokens_per_sec_median"] == statistics.median(r["tokens_per_sec"] for r in want_train)
    assert s["elapsed_sec"] == want_train[-1]["elapsed_sec"]


def test_resolve_resumes_edge_cases():
    recs = [
        {"kind": "eval", "step": 0, "eval_loss": 10.0},
        *({"kind": "train", "step": s, "loss": 10.0 - s} for s in range(1, 7)),
        {"kind": "eval", "step": 5, "eval_loss": 6.0},
        {"kind": "note", "step": 3},  # unknown kinds are ignored
        {"kind": "train", "step": "7"},  # malformed
        # resumed from step 2 after deleting newer checkpoints; this segment only reached step 4
        {"kind": "train", "step": 3, "loss": 1.5},
        {"kind": "train", "step": 4, "loss": None},  # a NaN is logged as null
        {"kind": "eval", "step": 4, "eval_loss": 1.0},
        {"kind": "eval", "step": 4, "eval_loss": 0.5},  # the same step again: the last wins
    ]
    tr, ev, superseded = resolve_resumes(recs)
    assert [(r["step"], r["loss"]) for r in tr] == [(1, 9.0), (2, 8.0), (3, 1.5), (4, None)]
    assert [(r["step"], r["eval_loss"]) for r in ev] == [(0, 10.0), (4, 0.5)]
    assert superseded == 4 + 1 + 1  # train 3..6, eval 5, eval 4 once
    assert resolve_resumes([]) == ([], [], 0)


def test_a_target_record_of_a_lost_timeline_is_not_reported(tmp_path):
    """Reached at step 5, then resumed from step 2 (newer checkpoints deleted) with the same target: the
    record of step 5 belongs to the timeline the resume dropped."""
    recs = [*({"kind": "train", "step": s, "loss": 10.0 - s} for s in range(1, 6)),
            {"kind": "eval", "step": 5, "eval_loss": 4.0},
            {"kind": "target", "step": 5, "metric": "eval_loss", "target": 4.5, "value": 4.0},
            {"kind": "train", "step": 3, "loss": 7.5}, {"kind": "train", "step": 4, "loss": 7.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "config.yaml").write_text("train:\n  target_loss: 4.5\n")
    run = load_run(tmp_path)
    assert run.target is None and [r["step"] for r in run.train] == [1, 2, 3, 4] and run.eval == []
    assert summarize(run)["target_not_reached"]["target"] == 4.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:7]))  # not resumed
    assert load_run(tmp_path).target["step"] == 5


def test_a_reached_target_costs_what_its_time_does(tmp_path):
    """The summary took cost from the last train record and time from the target's eval: "3m06s, $0.10" in the
    target row beside "cost $0.09" and tokens per dollar of that. Both now end at the target."""
    recs = [{"kind": "train", "step": 20, "tokens_seen": 40960, "loss": 8.0, "elapsed_sec": 162.0,
             "cost_usd": 0.09},
            {"kind": "eval", "step": 20, "eval_loss": 8.1},
            {"kind": "target", "step": 20, "tokens_seen": 40960, "metric": "eval_loss", "target": 9.0, "value": 8.1,
             "elapsed_sec": 186.8, "cost_usd": 0.1038}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "config.yaml").write_text("train:\n  target_loss: 9\n")
    s = summarize(load_run(tmp_path))
    assert (s["elapsed_sec"], s["cost_usd"]) == (186.8, 0.1038) and s["tokens_per_usd"] == 40960 / 0.1038


def test_a_run_whose_process_is_gone_is_not_reported_as_running(tmp_path):
    """After kill -9 the summary kept the last record's ETA and no stop, as if the run went on. A status whose
    process on this machine has ended without a final state is now said as such; another machine's is not
    judged."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 30, "tokens_seen": 10, "loss": 5.0,
                                                        "progress": 0.15, "eta_sec": 516.0}) + "\n")
    (tmp_path / "control").mkdir()
    status = {"job_id": "tiny-1", "pid": dead.pid, "host": socket.gethostname(), "step": 30}
    (tmp_path / "control" / "status.json").write_text(json.dumps(status))
    s = summarize(load_run(tmp_path))
    assert s["stopped"] == {"by": "gone", "last_checkpoint": None} and "eta_sec" not in s
    res = run_kiln("logs", "summary", str(tmp_path), capture_output=True, text=True, timeout=300)
    assert "by an unannounced end (killed?); no checkpoint;" in res.stdout, res.stdout
    (tmp_path / "control" / "status.json").write_text(json.dumps({**status, "host": "another-machine"}))
    assert summarize(load_run(tmp_path))["eta_sec"] == 516.0


def _cells(img: np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    h, w = img.shape[0] // rows, img.shape[1] // cols
    return [img[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(rows) for c in range(cols)]


def _near(cell: np.ndarray, rgb: tuple[int, int, int], tol: float = 0.06) -> int:
    """Pixels of `cell` (float RGB in [0, 1]) within `tol` of the colour `rgb`."""
    return int((np.abs(cell[..., :3] - np.array(rgb) / 255).max(axis=-1) < tol).sum())


def test_plot_writes_a_png_with_every_panel_drawn(runs, capsys):
    from matplotlib.image import imread

    assert main(["logs", "plot", str(runs["run"])]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == runs["run"] / "plots" / "curves.png"
    img = imread(out)  # float32 (H, W, 4) in [0, 1]
    assert img.shape[:2] == (800, 2000)
    rgb = img[..., :3]
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    cells = _cells(img, 2, 4)
    for i, cell in enumerate(cells[:7]):
        assert cell[..., :3].var() > 0, f"panel {i} is blank"
    sats = _cells(saturation[..., None], 2, 4)
    for i in range(5):  # loss, eval loss, lr, grad norm, tok/s: each has a coloured curve
        assert (sats[i] > 0.3).sum() > 200, f"panel {i} has no curve"
    assert (sats[5] > 0.3).sum() == 0  # downstream tasks: this run has none (the panel says so)
    assert (cells[6][..., :3].max(axis=-1) < 0.3).sum() > 500  # the summary panel's dark text
    assert (sats[6] > 0.3).sum() == 0  # (the summary text may run on into the last, empty cell)


def test_every_plotted_panel_names_its_unit_and_long_summary_rows_wrap(runs, monkeypatch, tmp_path):
    """Only the loss panels had a y label (lr, grad norm, tok/s, the tasks and every compare panel had none); a
    long summary row ("target reached ...") squeezed the panels beside it."""
    import kiln.logs as logs

    figs = []
    monkeypatch.setattr(logs, "_save", lambda fig, out: figs.append(fig) or Path(out))
    run = load_run(runs["run"])
    logs.plot_run(run, tmp_path / "a.png")
    logs.compare_runs([run, load_run(runs["before"])], tmp_path / "b.png")
    for fig in figs:
        drawn = [ax for ax in fig.axes if ax.axison]
        assert drawn and all(ax.get_ylabel() for ax in drawn), [ax.get_title() for ax in drawn if not ax.get_ylabel()]
    summary = next(ax for ax in figs[0].axes if ax.get_title() == "summary").texts[0].get_text()
    assert max(map(len, summary.splitlines())) <= 46


def test_a_run_of_one_record_is_drawn_as_dots(tmp_path, capsys):
    """A short run (a 3-step DPO stage logs one train record) drew one-point lines, which are invisible: its
    lr and grad-norm panels came out empty."""
    from matplotlib.image import imread

    train(load_config("tiny", small_overrides(tmp_path, **{"train.max_steps": 1, "train.eval_every": 100})),
          quiet=True)
    assert len([r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]) == 1
    assert main(["logs", "plot", str(tmp_path / "run")]) == 0
    img = imread(Path(capsys.readouterr().out.strip().splitlines()[-1]))
    saturation = img[..., :3].max(axis=-1) - img[..., :3].min(axis=-1)
    sats = _cells(saturation[..., None], 2, 4)
    for i in (2, 3):  # lr, grad norm: no legend, so any colour is the record's dot
        assert (sats[i] > 0.3).sum() > 10, f"panel {i} shows nothing"


def test_compare_overlays_both_runs_in_every_panel(runs, tmp_path, capsys):
    from matplotlib.image import imread

    target = tmp_path / "cmp.png"
    assert main(["logs", "compare", str(runs["before"]), str(runs["run"]), "--out", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    img = imread(target)
    assert img.shape[:2] == (500, 1600)
    for i, cell in enumerate(_cells(img, 1, 3)):  # train loss, eval loss, lr vs tokens
        assert _near(cell, C0) > 100 and _near(cell, C1) > 100, f"panel {i} does not show both runs"


MAGIC = {"png": lambda b: b.startswith(b"\x89PNG"), "jpg": lambda b: b.startswith(b"\xff\xd8"),
         "jpeg": lambda b: b.startswith(b"\xff\xd8"), "pdf": lambda b: b.startswith(b"%PDF"),
         "svg": lambda b: b"<svg" in b[:2000]}


@pytest.mark.parametrize("action, ext", [("plot", "jpg"), ("plot", "pdf"), ("plot", "svg"), ("plot", "PNG"),
                                         ("compare", "jpeg")])
def test_out_is_written_in_the_format_its_extension_names(runs, tmp_path, capsys, action, ext):
    """`kiln logs plot RUN --out x.jpg` wrote PNG bytes into x.jpg."""
    target = tmp_path / f"x.{ext}"
    folders = [str(runs["run"])] if action == "plot" else [str(runs["before"]), str(runs["run"])]
    assert main(["logs", action, *folders, "--out", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert MAGIC[ext.lower()](target.read_bytes()), target.read_bytes()[:16]


@pytest.mark.parametrize("action", ["plot", "compare"])
def test_an_unknown_out_extension_is_one_line_naming_out(runs, tmp_path, action):
    folders = [str(runs["run"])] if action == "plot" else [str(runs["before"]), str(runs["run"])]
    target = tmp_path / "x.gif"
    res = run_kiln("logs", action, *folders, "--out", str(target), capture_output=True, text=True,
                   timeout=120)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"kiln: error: --out {target}: unknown image type .gif; end the file name in .png, .jpg, .jpeg, .pdf, .svg"]
    assert not target.exists()


def test_summary_cli_table_and_json_lines(runs, capsys):
    assert main(["logs", "summary", str(runs["before"]), str(runs["run"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = "\n".join(lines[:-2])
    assert "before/run" in table and "logs" in table and "eval loss" in table and "tok/s" in table
    got = [json.loads(x) for x in lines[-2:]]
    assert got[0] == json.loads(json.dumps(summarize(load_run(runs["before"]))))
    assert got[1]["steps"] == 10 and got[0]["steps"] == 8
    assert got[1]["records_superseded"] == 7 and "re-logged after resume" in table


def test_logs_errors_are_one_line(tmp_path, capsys, runs):
    assert main(["logs", "summary", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such run folder" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"kind": "train", "st')  # torn by a crash
    assert main(["logs", "plot", str(tmp_path / "empty")]) == 2
    assert "no train or eval records" in capsys.readouterr().err
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"foo": 1}\n[1, 2]\n"text"\n')  # JSON, not records: skipped
    assert main(["logs", "plot", str(tmp_path / "empty")]) == 2  # both were AttributeError tracebacks
    assert "no train or eval records" in capsys.readouterr().err
    assert main(["logs", "summary", str(tmp_path / "empty")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 0
    assert main(["logs", "compare", str(runs["run"])]) == 2
    assert "at least two" in capsys.readouterr().err
    ckpt = ckpt_io.list_checkpoints(runs["run"])[-1]
    assert find_run_dir(ckpt) == runs["run"] and find_run_dir(runs["run"] / "metrics.jsonl") == runs["run"]


# ---------------------------------------------------------------------------------------------
# W&B


def test_wandb_sink_is_off_by_default_and_names_the_install(monkeypatch, tmp_path):
    assert wandb_sink(load_config("tiny"), tmp_path) is None
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = load_config("tiny", ["--run.wandb_project", "p"])
    with pytest.raises(KilnError, match=r"pip install wandb") as e:
        wandb_sink(cfg, tmp_path)
    assert "\n" not in str(e.value)
    assert scalars({"kind": "eval", "step": 3, "eval_loss": 2.0, "eval_loss/x": None, "ok": True}) == \
        (3, {"eval/eval_loss": 2.0})


def _wandb_history(path: Path) -> list[dict]:
    """History rows of an offline .wandb file (LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL / FIRST start; MIDDLE / LAST append
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_logs_the_tensorboard_names(runs, tmp_path, monkeypatch):
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config("tiny", ["--run.wandb", "true", "--run.name", "replay"])
    log = load_run(runs["run"])
    sink = wandb_sink(cfg, tmp_path)
    records = sorted(log.train + log.eval, key=lambda r: (r["step"], r["kind"] == "eval"))
    for r in records:
        sink.log(r)
    run_id = sink.run.id
    sink.close()
    import wandb

    wandb.teardown()  # finish() may return before wandb-core has flushed the offline file; teardown waits
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    (offline,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    rows = {row["_step"]: row for row in _wandb_history(offline)}
    for r in log.train:
        assert rows[r["step"]]["train/loss"] == r["loss"] and rows[r["step"]]["train/lr"] == r["lr"]
    for r in log.eval:
        assert rows[r["step"]]["eval/eval_loss/toyval"] == r["eval_loss/toyval"]
    # a resumed kiln run continues the same W&B run id
    again = WandbSink(tmp_path, project="kiln", name="replay", mode="offline")
    assert again.run.id == run_id
    again.close()


def test_resolve_resumes_is_linear_in_the_records():
    """One pass, O(1) per record between resumes: 300k records resolve in well under a second (the
    quadratic max-per-record version took minutes)."""
    import time

    n = 300_000
    recs = [{"kind": "train", "step": s, "loss": 1.0} for s in range(n)]
    recs += [{"kind": "eval", "step": s, "eval_loss": 1.0} for s in range(0, n, 1000)]
    recs.sort(key=lambda r: r["step"])
    recs += [{"kind": "train", "step": s, "loss": 2.0} for s in range(n - 5000, n + 10)]  # a resume
    t0 = time.perf_counter()
    tr, ev, superseded = resolve_resumes(recs)
    assert time.perf_counter() - t0 < 3.0
    assert len(tr) == n + 10 and tr[-1]["loss"] == 2.0 and tr[n - 5001]["loss"] == 1.0
    assert superseded == 5000 + 4  # train n-5000..n-1; eval n-4000, n-3000, n-2000, n-1000
    assert [r["step"] for r in ev][-1] == n - 5000


def test_summary_reads_peak_memory_bytes_only():
    """Train records carry peak_memory_bytes; other keys named like memory are not peak memory."""
    recs = [{"kind": "train", "step": 1, "loss": 1.0, "memory": 10 * 2**30, "memory_bytes": 9 * 2**30,
             "peak_memory_bytes": 2**30}, {"kind": "train", "step": 2, "loss": 1.0, "memory": 10 * 2**30}]
    tr, ev, n = resolve_resumes(recs)
    s = summarize(RunLog(Path("x"), "x", tr, ev, n, None))
    assert s["peak_memory_bytes"] == 2**30
    tr, ev, n = resolve_resumes(recs[1:])
    assert "peak_memory_bytes" not in summarize(RunLog(Path("x"), "x", tr, ev, n, None))


def test_wandb_sink_reports_the_steps_it_drops_once(monkeypatch, tmp_path, capsys):
    """Resumed from an older checkpoint, W&B is already past the replayed steps: they are dropped, and one
    stderr line says how many, when logging catches up."""
    import types

    logged = []

    class FakeRun:
        id, step = "abc", 10

        def log(self, values, step):
            logged.append(step)

        def finish(self):
            pass
    fake = types.SimpleNamespace(init=lambda **kw: FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (tmp_path / "wandb_id.txt").write_text("abc\n")
    sink = WandbSink(tmp_path, project="p", name="n")
    for s in range(4, 13):
        sink.log({"kind": "train", "step": s, "loss": 1.0})
    sink.log({"kind": "eval", "step": 12, "eval_loss": 1.0})
    sink.close()
    assert logged == [10, 11, 12, 12]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already at step 10: 6 metrics record(s) at steps 4-9" in err[0]
    # still behind at close(): reported there
    sink = WandbSink(tmp_path, project="p", name="n")
    sink.log({"kind": "train", "step": 3, "loss": 1.0})
    assert capsys.readouterr().err == ""
    sink.close()
    assert "1 metrics record(s) at steps 3-3" in capsys.readouterr().err
