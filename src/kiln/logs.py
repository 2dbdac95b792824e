"""`kiln logs summary|plot|compare`: read runs' metrics.jsonl, print tables, draw PNG curves.

A run folder may have been resumed several times. After a resume the trainer logs again the steps
between the checkpoint and the crash, so metrics.jsonl can hold a step twice. `load_run` keeps one
timeline: a record whose step is not past the last one of its kind starts a new segment, and the
earlier records after that step (and of its kind at that step) are dropped. When the new segment
covers the lost steps (the usual case) this is exactly "the last record per (kind, step)"; it also
drops a lost timeline's tail that the new segment never reached (a resume from an older checkpoint).

Plots use matplotlib's object API on a bare `Figure` (Agg canvas, no pyplot state, no display).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from kiln.cliargs import user_path
from kiln.errors import KilnError
from kiln.runinfo import format_duration
from kiln.train.checkpoint import list_checkpoints
from kiln.train.control import DATA_RAN_DRY, gone
from kiln.train.metrics import read_metrics

KINDS = ("train", "eval")
FIGSIZE, DPI = (20.0, 8.0), 100  # plot: 2000 x 800 pixels
COMPARE_FIGSIZE = (16.0, 5.0)  # compare: 1600 x 500 pixels
FORMATS = ("png", "jpg", "jpeg", "pdf", "svg")  # what --out's extension may name


@dataclass
class RunLog:
    """One run's metrics after resolving resumes: records sorted by step, one per (kind, step)."""

    path: Path
    name: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    superseded: int  # records dropped because a resumed segment logged the same steps again
    config: dict[str, Any] | None
    target: dict[str, Any] | None = None  # the "target" record: train.target_loss reached
    ended: str | None = None  # how the run's last process ended (control/status.json), None while it runs;
    # "gone": its process on this machine is not there and said nothing (kill -9)
    last_checkpoint: str | None = None  # the newest complete checkpoint's folder name


def find_run_dir(path: str | Path) -> Path:
    """The run folder for a run folder, its metrics.jsonl, or a checkpoint inside it."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == "metrics.jsonl":
        return p.parent
    if not p.exists():
        raise KilnError(f"{path}: no such run folder")
    for cand in (p, p.parent, p.parent.parent):  # RUN, RUN/checkpoints, RUN/checkpoints/step_N
        if (cand / "metrics.jsonl").is_file():
            return cand
    if (p / "checkpoints").is_dir() or (p / "meta.json").is_file():  # `kiln average` / `kiln import` write these
        raise KilnError(f"{path}: a checkpoint without training metrics (kiln average and kiln import write such "
                        f"folders); score it with kiln eval --checkpoint {path}")
    raise KilnError(f"{path}: no metrics.jsonl here; pass a run folder such as runs/tiny")


def resolve_resumes(records: Sequence[dict[str, Any]]) -> tuple[list[dict], list[dict], int]:
    """(train, eval, superseded): one timeline out of records appended across resumes."""
    kept, superseded = _timeline(records)
    return kept["train"], kept["eval"], superseded


def _timeline(records: Sequence[dict[str, Any]]) -> tuple[dict[str, list[dict]], int]:
    """The records of each kind in KINDS and "target" (train.target_loss reached) on the resolved timeline,
    sorted by step; and how many were dropped."""
    kinds = (*KINDS, "target")
    kept: dict[str, dict[int, dict[str, Any]]] = {k: {} for k in kinds}
    last: dict[str, int | None] = {k: None for k in kinds}  # the highest step kept per kind
    superseded = 0
    for r in records:
        kind, step = r.get("kind"), r.get("step")
        if kind not in kept or isinstance(step, bool) or not isinstance(step, int):
            continue
        last_step = last[kind]
        if last_step is not None and step <= last_step:
            # a new segment: what the earlier one logged after this point is another timeline. Other
            # kinds at this very step may predate the checkpoint (an eval right after a resume), so
            # only their later steps go; the same step of this kind comes again and replaces it. A
            # target record goes with the eval it was reached at.
            # O(records kept) once per resume, O(1) per record otherwise.
            for k in kinds:
                same = k == kind or (k == "target" and kind == "eval")
                stale = [s for s in kept[k] if s > step or (s == step and same)]
                for s in stale:
                    del kept[k][s]
                superseded += len(stale)
                last[k] = max(kept[k], default=None)
        kept[kind][step] = r
        last[kind] = step  # every step of this kind still kept is below it
    return {k: [kept[k][s] for s in sorted(kept[k])] for k in kinds}, superseded


def load_run(path: str | Path) -> RunLog:
    """Read a run folder's metrics.jsonl (and config.yaml when present)."""
    run_dir = find_run_dir(path)
    kept, superseded = _timeline(read_metrics(run_dir))
    config = None
    if (run_dir / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
        except yaml.YAMLError:
            config = None
    config = config if isinstance(config, dict) else None
    # the run's target as its config now sets it: a record of a target that a resume has since changed
    # (or of a lost timeline: _timeline) says nothing about this one
    train_cfg = (config or {}).get("train") or {}
    target = next((r for r in reversed(kept["target"])
                   if config is None or (r.get("target"), r.get("metric")) ==
                   (train_cfg.get("target_loss"), train_cfg.get("target_metric") or "eval_loss")), None)
    try:
        status = json.loads((run_dir / "control" / "status.json").read_text())
    except (OSError, ValueError):
        status = {}
    ended = status.get("state") if isinstance(status, dict) else None
    if isinstance(status, dict) and gone(status):
        ended = "gone"
    ckpts = list_checkpoints(run_dir)
    return RunLog(run_dir, run_dir.name, kept["train"], kept["eval"], superseded, config, target,
                  ended=ended if isinstance(ended, str) else None, last_checkpoint=ckpts[-1].name if ckpts else None)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _series(records: Sequence[dict[str, Any]], key: str, *, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of records that have a finite `key` (and `x`)."""
    xs, ys = [], []
    for r in records:
        xv, yv = _num(r.get(x)), _num(r.get(key))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def eval_keys(run: RunLog) -> list[str]:
    """"eval_loss" then the per-source "eval_loss/<source>" keys, in first-seen order."""
    keys: list[str] = []
    for r in run.eval:
        for k in r:
            if (k == "eval_loss" or k.startswith("eval_loss/")) and k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: (k != "eval_loss", keys.index(k)))


def task_keys(run: RunLog) -> list[str]:
    """The downstream tasks' "eval/<task>/acc_norm" keys (train.eval_tasks), in first-seen order."""
    keys: list[str] = []
    for r in run.eval:
        keys += [k for k in r if k.startswith("eval/") and k.endswith("/acc_norm") and k not in keys]
    return keys


def summarize(run: RunLog) -> dict[str, Any]:
    """The numbers `kiln logs summary` prints (and its JSON line): last/best losses, speed, cost."""
    tr = run.train
    out: dict[str, Any] = {"run": run.name, "path": str(run.path), "steps": 0, "tokens_seen": 0}
    if tr:
        out["steps"] = tr[-1]["step"]
        out["tokens_seen"] = next((r["tokens_seen"] for r in reversed(tr) if _num(r.get("tokens_seen"))), 0)
    steps, losses = _series(tr, "loss")
    if losses:
        i = min(range(len(losses)), key=losses.__getitem__)
        out.update(loss=losses[-1], best_loss=losses[i], best_loss_step=int(steps[i]))
    for key in eval_keys(run):
        steps, vals = _series(run.eval, key)
        if vals:
            i = min(range(len(vals)), key=vals.__getitem__)
            out[key] = vals[-1]
            out["best_" + key] = vals[i]
            out["best_" + key + "_step"] = int(steps[i])
    for key in task_keys(run):  # accuracies: higher is better
        steps, vals = _series(run.eval, key)
        if vals:
            i = max(range(len(vals)), key=vals.__getitem__)
            out[key], out["best_" + key], out["best_" + key + "_step"] = vals[-1], vals[i], int(steps[i])
    if run.target is not None:  # train.target_loss was reached: what it cost
        t = run.target
        out["target"] = {k: t.get(k) for k in ("metric", "target", "value", "step", "tokens_seen", "elapsed_sec",
                                                "cost_usd") if t.get(k) is not None}
    else:  # a target set and not reached: say so, with the best the run got
        train_cfg = (run.config or {}).get("train") or {}
        goal, metric = train_cfg.get("target_loss") or 0, train_cfg.get("target_metric") or "eval_loss"
        if isinstance(goal, int | float) and goal > 0:
            out["target_not_reached"] = {"metric": metric, "target": goal, "best": out.get("best_" + metric),
                                         "best_step": out.get("best_" + metric + "_step")}
    _, tps = _series(tr, "tokens_per_sec")
    if tps:
        out["tokens_per_sec_median"] = statistics.median(tps)
    _, mfu = _series(tr, "mfu")
    if mfu:
        out["mfu_median"] = statistics.median(mfu)
    mem = _series(tr, "peak_memory_bytes")[1]
    if mem:
        out["peak_memory_bytes"] = max(mem)
    for key in ("elapsed_sec", "cost_usd", "progress", "eta_sec"):  # cumulative: the last value counts
        vals = _series(tr, key)[1]
        if vals:
            out[key] = vals[-1]
    if run.ended == DATA_RAN_DRY:  # data.on_exhausted=stop: ended there, as configured
        out["data_ran_dry"] = True
    elif run.ended not in (None, "finished", "target") and "target" not in out:  # stopped before its end
        out["stopped"] = {"by": run.ended, "last_checkpoint": run.last_checkpoint}
        out.pop("eta_sec", None)  # nothing is running to arrive
    if "target" in out:  # stopped at its target: finished, whatever share of its planned steps it took
        out.pop("eta_sec", None)
        for key in ("elapsed_sec", "cost_usd"):  # the target's eval came after the last train record
            if key in out["target"]:
                out[key] = max(out.get(key, 0.0), out["target"][key])
    if out.get("cost_usd") and out["tokens_seen"]:
        out["tokens_per_usd"] = out["tokens_seen"] / out["cost_usd"]
    out["records_superseded"] = run.superseded
    return out


# ---------------------------------------------------------------------------------------------
# summary


def _fmt_tokens(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _rows(s: dict[str, Any]) -> dict[str, str]:
    """Display rows of one summary (label -> text); missing values are left out."""
    rows = {"steps": f"{s['steps']:,}", "tokens": _fmt_tokens(s["tokens_seen"])}
    if "loss" in s:
        rows["train loss (last)"] = f"{s['loss']:.4f}"
        rows["train loss (best)"] = f"{s['best_loss']:.4f} @ {s['best_loss_step']}"
    sources = [k for k in s if k.startswith("eval_loss/")]
    for key in ["eval_loss"] * ("eval_loss" in s) + (sources if len(sources) > 1 else []):  # 1 source = total
        label = "eval loss" + (f" {key.split('/', 1)[1]}" if "/" in key else "")
        rows[f"{label} (last)"] = f"{s[key]:.4f}"
        rows[f"{label} (best)"] = f"{s['best_' + key]:.4f} @ {s['best_' + key + '_step']}"
    for key in [k for k in s if k.startswith("eval/") and k.endswith("/acc_norm")]:
        task = key.split("/")[1]
        rows[f"{task} acc_norm (last)"] = f"{s[key]:.3f}"
        rows[f"{task} acc_norm (best)"] = f"{s['best_' + key]:.3f} @ {s['best_' + key + '_step']}"
    if "target" in s:
        t = s["target"]
        cost = f", ${t['cost_usd']:,.2f}" if "cost_usd" in t else ""
        rows["target reached"] = (f"{t['metric']} {t['value']:.4f} <= {t['target']:g} at step {t['step']}: "
                                  f"{format_duration(t['elapsed_sec'])}, {_fmt_tokens(t['tokens_seen'])} tokens{cost}")
    if "target_not_reached" in s:
        t = s["target_not_reached"]
        best = f"; best {t['best']:.4f} @ {t['best_step']}" if t.get("best") is not None else ""
        rows["target not reached"] = f"{t['metric']} {t['target']:g}{best}"
    if "tokens_per_sec_median" in s:
        rows["tok/s (median)"] = f"{s['tokens_per_sec_median']:,.0f}"
    if "mfu_median" in s:
        rows["MFU (median)"] = f"{100 * s['mfu_median']:.1f}%"
    if "peak_memory_bytes" in s:
        rows["peak memory"] = f"{s['peak_memory_bytes'] / 2**30:.2f} GiB"
    if "progress" in s:
        p = s["progress"]
        rows["progress"] = f"{100 * p if p <= 1 else p:.1f}%"  # a fraction, or already a percentage
        if "target" in s:
            rows["progress"] += " (stopped at its target)"
        elif s.get("data_ran_dry"):
            rows["progress"] += " (its data ran dry: data.on_exhausted=stop)"
    if "stopped" in s:
        st = s["stopped"]
        by = {"failed": "an error (see its output)", "gone": "an unannounced end (killed?)"}.get(
            st["by"], st["by"])
        last = f"last checkpoint {st['last_checkpoint']}" if st["last_checkpoint"] else "no checkpoint"
        rows["stopped"] = f"by {by}; {last}; the same command " + ("resumes" if st["last_checkpoint"] else "starts over")
    if "elapsed_sec" in s:
        rows["elapsed"] = format_duration(s["elapsed_sec"])
    if "eta_sec" in s:
        rows["ETA"] = format_duration(s["eta_sec"])
    if "cost_usd" in s:
        rows["cost"] = f"${s['cost_usd']:,.2f}"
    if "tokens_per_usd" in s:
        rows["tokens / $"] = _fmt_tokens(s["tokens_per_usd"])
    if s["records_superseded"]:
        rows["re-logged after resume"] = f"{s['records_superseded']} records (last kept)"
    return rows


def print_summary(summaries: Sequence[dict[str, Any]]) -> None:
    """A rich table (one column per run), then one JSON line per run."""
    rows = [_rows(s) for s in summaries]
    labels: list[str] = []
    for r in rows:
        labels += [k for k in r if k not in labels]
    table = Table(title="kiln logs summary", show_lines=False)
    table.add_column("metric", style="bold")
    for label in _labels([Path(s["path"]) for s in summaries]):
        table.add_column(label, justify="right")
    for label in labels:
        table.add_row(label, *[r.get(label, "-") for r in rows])
    Console().print(table)  # the terminal's width; redirected, $COLUMNS or 80 (rich's default)
    for s in summaries:
        print(json.dumps(s))


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short unique names for runs: the folder name, or more of the path where names collide."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


# ---------------------------------------------------------------------------------------------
# plots


def smooth(ys: Sequence[float]) -> list[float]:
    """Debiased exponential moving average; the window grows with the number of points."""
    beta = min(0.98, max(0.0, 1.0 - 10.0 / max(len(ys), 1)))
    out, avg = [], 0.0
    for i, y in enumerate(ys):
        avg = beta * avg + (1 - beta) * y
        out.append(avg / (1 - beta ** (i + 1)) if beta > 0 else y)
    return out


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DPI, layout="constrained")


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} records", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_format(out: str | Path) -> str:
    """The image format `out`'s extension names (matplotlib writes each of FORMATS); one line otherwise."""
    fmt = Path(out).suffix.lower().removeprefix(".")
    if fmt not in FORMATS:
        raise KilnError(f"--out {out}: unknown image type {'.' + fmt if fmt else '(no extension)'}; end the file "
                        f"name in {', '.join('.' + f for f in FORMATS)}")
    return fmt


def _save(fig: Any, out: Path) -> Path:
    out = Path(out)
    fmt = plot_format(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI, format=fmt)
    except OSError as e:
        raise KilnError(f"{out}: cannot write the plot ({e.strerror}); pass --out FILE.png") from None
    return out


def _dots(xs: list) -> dict[str, Any]:
    """Markers for a series of one or two records (a short run's one train record): a line of one point is
    invisible."""
    return {"marker": "o", "ms": 5} if len(xs) < 3 else {}


def plot_run(run: RunLog, out: str | Path | None = None) -> Path:
    """One PNG of a run: train loss (raw + smoothed), eval loss per source, lr, grad norm, tok/s."""
    if not run.train and not run.eval:
        raise KilnError(f"{run.path / 'metrics.jsonl'}: no train or eval records yet; train first")
    out = Path(out) if out else run.path / "plots" / "curves.png"
    fig = _figure(FIGSIZE)
    axes = fig.subplots(2, 4).flatten()
    tr = run.train
    fig.suptitle(f"{run.name}  ({run.path})")

    ax = axes[0]
    steps, loss = _series(tr, "loss")
    if loss:
        ax.plot(steps, loss, color="C0", alpha=0.3, lw=1, label="loss")
        ax.plot(steps, smooth(loss), color="C0", lw=2, label="smoothed", **_dots(steps))
        ax.legend()
    else:
        _empty(ax, "train")
    ax.set(title="train loss", xlabel="step", ylabel="nats/token")

    ax = axes[1]
    keys = eval_keys(run)
    single = len(keys) == 2  # one source: its curve is the total
    for i, key in enumerate(keys[:1] if single else keys):
        xs, ys = _series(run.eval, key)
        label = keys[-1].split("/", 1)[1] if single else "all sources" if key == "eval_loss" else key.split("/", 1)[1]
        ax.plot(xs, ys, marker="o", ms=3, lw=2.5 if i == 0 else 1.2, color=f"C{i}", label=label)
    if keys:
        ax.legend()
    else:
        _empty(ax, "eval")
    ax.set(title="eval loss", xlabel="step", ylabel="nats/token")

    for ax, key, title, unit in ((axes[2], "lr", "learning rate", "lr"),
                                 (axes[3], "grad_norm", "grad norm (before clip)", "L2 norm"),
                                 (axes[4], "tokens_per_sec", "tokens/s", "tokens/s")):
        xs, ys = _series(tr, key)
        if ys:
            ax.plot(xs, ys, color="C2" if key == "lr" else "C3" if key == "grad_norm" else "C4", lw=1.5, **_dots(xs))
            if key == "grad_norm" and min(ys) > 0 and max(ys) / min(ys) > 50:
                ax.set_yscale("log")  # a spike would flatten everything else
            if key == "tokens_per_sec":
                ax.axhline(statistics.median(ys), color="gray", ls="--", lw=1, label=f"median {statistics.median(ys):,.0f}")
                ax.legend()
            if key == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        else:
            _empty(ax, key)
        ax.set(title=title, xlabel="step", ylabel=unit)

    ax = axes[5]
    for i, key in enumerate(task_keys(run)):
        xs, ys = _series(run.eval, key)
        ax.plot(xs, ys, marker="o", ms=3, lw=1.5, color=f"C{i}", label=key.split("/")[1])
    if task_keys(run):
        ax.legend()
    else:
        _empty(ax, "train.eval_tasks")
    ax.set(title="downstream acc_norm", xlabel="step", ylabel="accuracy")

    axes[7].axis("off")
    ax = axes[6]
    ax.axis("off")
    text = "\n".join(textwrap.fill(f"{k}: {v}", width=46, subsequent_indent="    ")  # long rows: no squeezed panels
                     for k, v in _rows(summarize(run)).items())
    ax.text(0.02, 0.98, text, va="top", ha="left", family="monospace", fontsize=10, transform=ax.transAxes)
    ax.set_title("summary")
    return _save(fig, out)


def compare_runs(runs: Sequence[RunLog], out: str | Path) -> Path:
    """One PNG with the runs overlaid: train loss, eval loss and lr against tokens seen."""
    if len(runs) < 2:
        raise KilnError("kiln logs compare needs at least two run folders")
    for run in runs:
        if not run.train and not run.eval:
            raise KilnError(f"{run.path / 'metrics.jsonl'}: no train or eval records yet")
    # tokens are comparable across batch sizes; fall back to steps if a run does not log them
    x = "tokens_seen" if all(_series(r.train, "tokens_seen")[1] for r in runs if r.train) else "step"
    fig = _figure(COMPARE_FIGSIZE)
    axes = fig.subplots(1, 3)
    labels = _labels([r.path for r in runs])
    for i, (run, label) in enumerate(zip(runs, labels)):
        c = f"C{i % 10}"
        xs, ys = _series(run.train, "loss", x=x)
        if ys:
            axes[0].plot(xs, ys, color=c, alpha=0.2, lw=1)
            axes[0].plot(xs, smooth(ys), color=c, lw=2, label=label, **_dots(xs))
        xs, ys = _series(run.eval, "eval_loss", x=x)
        if ys:
            axes[1].plot(xs, ys, color=c, marker="o", ms=3, lw=2, label=label)
        xs, ys = _series(run.train, "lr", x=x)
        if ys:
            axes[2].plot(xs, ys, color=c, lw=1.5, label=label, **_dots(xs))
    xlabel = "tokens seen" if x == "tokens_seen" else "step"
    if axes[2].lines:
        axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax, title, unit in zip(axes, ("train loss (smoothed; raw faint)", "eval loss", "learning rate"),
                               ("nats/token", "nats/token", "lr")):
        ax.set(title=title, xlabel=xlabel, ylabel=unit)
        if ax.lines:
            ax.legend()
        else:
            _empty(ax, title.split(" (")[0])
    fig.suptitle("kiln logs compare: " + ", ".join(labels))
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str]) -> int:
    """`kiln logs summary|plot|compare ...`."""
    p = argparse.ArgumentParser(prog="kiln logs", description="Summaries and plots of runs' metrics.jsonl.",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="action", required=True, metavar="summary|plot|compare")
    s = sub.add_parser("summary", help="table of steps, losses, speed, cost; one JSON line per run",
                       allow_abbrev=False)
    s.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with its metrics.jsonl)")
    pl = sub.add_parser("plot", help="PNG curves of one run (default RUN_DIR/plots/curves.png)",
                        allow_abbrev=False)
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, one image each")
    pl.add_argument("--out", type=user_path, help="image file, .png .jpg .pdf or .svg (only with one run)")
    c = sub.add_parser("compare", help="one PNG with several runs overlaid", allow_abbrev=False)
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="two or more run folders")
    c.add_argument("--out", type=user_path, help="image file, .png .jpg .pdf or .svg (default: compare.png beside the first run)")
    args = p.parse_args(argv)
    if getattr(args, "out", None):
        plot_format(args.out)  # before reading and drawing anything
    runs = [load_run(r) for r in args.runs]
    if args.action == "summary":
        print_summary([summarize(r) for r in runs])
    elif args.action == "plot":
        if args.out and len(runs) > 1:
            raise KilnError("kiln logs plot: --out takes one run; without it each run gets RUN_DIR/plots/curves.png")
        for run in runs:
            print(plot_run(run, args.out))
    else:
        print(compare_runs(runs, args.out or runs[0].path.parent / "compare.png"))
    return 0
