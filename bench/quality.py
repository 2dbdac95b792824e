"""The model per wall-clock second: kiln against a Hugging Face Trainer run, same budget, scored alike.

    python bench/quality.py                                    # tiny, 300 s each (~15 min in all)
    python bench/quality.py --budget 90s --kiln-args '--optim.lr 3e-3'
    python bench/quality.py --hf-result bench/results/quality.jsonl --kiln-args '...'   # reuse the HF run

One invocation, one after the other:

1. kiln: `python -m kiln train PRESET [--kiln-args] --train.time_budget B --train.save_every_minutes M
   --train.keep_last 0` through the CLI. A kiln without train.time_budget (detected) gets a timed warm-up
   run first, then `--train.max_steps` that fit (`--kiln-plan steps` forces that path).
2. HF: transformers.Trainer + LlamaForCausalLM in a child process (bench/quality_hf.py): the run_clm
   recipe (tokenize, EOS after each document, concatenate, 256-token blocks, Trainer's random sampler) on
   the same corpus (kiln's bundled train split), with the shape, batch, LR schedule and AdamW settings of
   `--hf-preset` (default: bench/hf_baseline.yaml, kiln's tiny preset as it was when this comparison was
   set, so the baseline stays put while kiln's recipe and presets change), fused AdamW, fp32 on CPU; its
   max_steps fixed from a timed warm-up run (20 steps, the first 5 not counted) to fit the budget.
3. Scoring: both final models, and kiln's intermediate checkpoints (after the run: no training time), by the
   same transformers code (quality_hf.score_bpb; kiln's through `kiln export`) in bits per byte on
   bench/heldout/heldout.jsonl.gz (Carroll and Melville: not in the bundled corpus), each with its own
   tokenizer. The first kiln checkpoint at or below HF's final bpb gives kiln's time to HF's quality.
   `--also-score FILE` (repeatable) scores both final models on more held-out texts too (another domain:
   RESULTS.md's "Tenth sitting" found the ratio depends on it), reported beside the main one.
4. A shorter kiln run, planned as a user with less time would plan it: `--train.time_budget` set to
   `--short-fraction` (default one third) of the HF run's train seconds, its final model scored alike:
   whether kiln reaches HF's final bpb in that fraction of HF's time when it is asked to.

Prints a table, appends one JSON record to --results (default bench/results/quality.jsonl) and prints
a markdown row for bench/RESULTS.md. Timings on a shared machine are noisy: the record keeps the load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from quality_hf import hf_main, load_texts, score_bpb  # noqa: E402

from kiln.config import Config, load_config, parse_duration  # noqa: E402
from kiln.device import cpu_name  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.export import LLAMA, export_checkpoint, hf_architecture  # noqa: E402
from kiln.model import count_params  # noqa: E402
from kiln.runinfo import git_describe  # noqa: E402

HELDOUT = ROOT / "bench" / "heldout" / "heldout.jsonl.gz"
CORPUS = ROOT / "src" / "kiln" / "data" / "corpus" / "train.jsonl.gz"
RESULTS = ROOT / "bench" / "results" / "quality.jsonl"
# 300 s: the tiny preset's own length (~600K tokens, "about 5 minutes on 2 CPU cores"), long enough for
# hundreds of steps past its 30-step warmup, and one invocation (two runs, warm-ups, scoring) stays ~15 min.
DEFAULT_BUDGET = "300s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", default=DEFAULT_BUDGET, help="wall-clock training budget per system (300s, 10m)")
    p.add_argument("--kiln-preset", default="tiny", help="kiln preset or YAML")
    p.add_argument("--kiln-args", default="", help="overrides for kiln only, e.g. '--optim.lr 3e-3'")
    p.add_argument("--hf-preset", default=str(ROOT / "bench" / "hf_baseline.yaml"),
                   help="shape/batch/schedule of the HF baseline (default: bench/hf_baseline.yaml, the tiny preset "
                        "as it was when this comparison was set)")
    p.add_argument("--hf-args", default="", help="overrides for the HF baseline's settings (same syntax)")
    p.add_argument("--skip-hf", action="store_true", help="kiln only: no HF run, no ratio")
    p.add_argument("--hf-result", default="", help="reuse the HF side of an earlier run: results .jsonl or .json")
    p.add_argument("--kiln-plan", default="auto", choices=["auto", "budget", "steps"],
                   help="budget: --train.time_budget; steps: timed warm-up + --train.max_steps; auto: budget if supported")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--curve-points", type=int, default=6, help="kiln checkpoints scored along the run (final included)")
    p.add_argument("--short-fraction", type=float, default=1 / 3,
                   help="after the HF run, a kiln run with this fraction of the HF run's train seconds as its "
                        "train.time_budget, scored on its final model (0: none)")
    p.add_argument("--heldout", default=str(HELDOUT), help="held-out text: jsonl(.gz) with 'text', or .txt(.gz)")
    p.add_argument("--also-score", action="append", default=[], metavar="FILE",
                   help="another held-out text to score both final models on (repeatable; jsonl(.gz) or .txt(.gz))")
    p.add_argument("--corpus", default=str(CORPUS), help="the HF run's corpus (kiln's data config decides kiln's)")
    p.add_argument("--window", type=int, default=256, help="scoring window (targets per window)")
    p.add_argument("--out-dir", default="", help="runs and exports (default runs/quality/<time>)")
    p.add_argument("--results", default=str(RESULTS), help="JSON lines file to append this run's record to")
    p.add_argument("--hf-child", default="", help=argparse.SUPPRESS)  # internal: the HF run's process
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Settings


def hf_spec(cfg: Config, *, budget_s: float, seed: int, corpus: str, out: Path) -> dict[str, Any]:
    """What the HF run mirrors from a kiln config: shape, tokenizer, batch, LR schedule, AdamW, clipping."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    if hf_architecture(m) != LLAMA or m.embed_scale or o.name != "adamw" or o.lr_scaling != "none" \
            or o.schedule not in ("cosine", "constant"):
        raise SystemExit("the HF baseline is LlamaForCausalLM + AdamW with a cosine or constant schedule: its "
                         "preset must not set qk_norm / nope_every / embed_scale / deepnorm / another optimizer")
    accum = t.global_batch_size // t.micro_batch_size
    model = {"vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.ffn_dim,
             "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
             "head_dim": m.hd, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
             "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rope_theta)},
             "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std}
    return {"model": model, "n_params_kiln": count_params(m), "tokenizer": cfg.data.tokenizer, "seq_len": t.seq_len,
            "micro_batch": t.micro_batch_size, "accum": accum, "lr": o.lr, "warmup_steps": o.warmup_steps,
            "schedule": o.schedule, "min_lr_ratio": o.min_lr_ratio, "betas": list(o.betas), "eps": o.eps,
            "weight_decay": o.weight_decay, "grad_clip": t.grad_clip, "budget_s": budget_s, "seed": seed,
            "corpus": corpus, "out_dir": str(out)}


SETTINGS_KEYS = ("model", "tokenizer", "seq_len", "micro_batch", "accum", "lr", "warmup_steps", "schedule",
                 "min_lr_ratio", "betas", "eps", "weight_decay", "grad_clip", "budget_s", "seed")


def settings_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of an HF spec that decides its result (a reused HF result must match it)."""
    return {k: spec[k] for k in SETTINGS_KEYS} | {"corpus_sha256": sha256(Path(spec["corpus"]))}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kiln_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln", *args]


def kiln_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def kiln_has_time_budget() -> bool:
    """Whether the kiln that `python -m kiln` runs knows train.time_budget (asked in a child, as the CLI resolves it)."""
    code = "import dataclasses, kiln.config as c; print('time_budget' in {f.name for f in dataclasses.fields(c.TrainConfig)})"
    out = subprocess.run([sys.executable, "-c", code], env=kiln_env(), capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "True"


# ---------------------------------------------------------------------------------------------
# kiln


def run_logged(cmd: list[str], log: Path) -> float:
    """Run cmd with its output in `log`; its wall seconds. A failure prints the log's tail and stops."""
    print(f"$ {shlex.join(cmd)}\n  (output: {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=kiln_env(), cwd=ROOT).returncode
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise SystemExit("\n".join([f"failed (exit {rc}): {shlex.join(cmd)}", *tail]))
    return time.time() - t0


def metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def elapsed_at(records: list[dict[str, Any]], step: int) -> float:
    """The run's clock at `step`: its train record, else interpolated between the records around it."""
    pts = sorted((r["step"], r["elapsed_sec"]) for r in records if r.get("kind", "train") == "train"
                 and "elapsed_sec" in r)
    if not pts:
        return math.nan
    for (s0, e0), (s1, e1) in zip(pts, pts[1:]):
        if s0 <= step <= s1:
            return e0 + (e1 - e0) * (step - s0) / max(s1 - s0, 1)
    s_last, e_last = pts[-1]  # past the last record: extrapolate at the mean pace
    return e_last + (step - s_last) * e_last / max(s_last, 1)


def checkpoint_clock(ckpt: Path, records: list[dict[str, Any]], step: int) -> float:
    """Wall seconds of the run when `ckpt` was saved: the elapsed time kept in its train state, else from metrics."""
    import torch  # heavy; torch is loaded by then anyway

    try:
        common = torch.load(ckpt / "state" / "common.pt", weights_only=True)
        return float(common["elapsed"])
    except Exception:  # another checkpoint layout: the metrics records say it to within log_every steps
        return elapsed_at(records, step)


def plan_steps(args: argparse.Namespace, base: list[str], out: Path, budget_s: float, cfg: Config) -> list[str]:
    """kiln without train.time_budget: an 8-step run (a save after step 4) times a step, the set-up + initial
    eval, a save, and the final eval + save; then the most steps whose run (its evals and saves) fits."""
    warm = out / "kiln-warmup"
    run_logged(kiln_cmd("train", *base, "--run.out_dir", str(warm), "--train.max_steps", "8", "--train.log_every",
                        "1", "--train.eval_every", "1000000", "--train.save_every", "4",
                        "--train.sample_tokens", "0", "--quiet"), out / "kiln-warmup.log")
    records = metrics(warm)
    el = {r["step"]: r["elapsed_sec"] for r in records if r.get("kind", "train") == "train" and "elapsed_sec" in r}
    gaps = {s: el[s] - el[s - 1] for s in range(2, 9) if s in el and s - 1 in el}
    step = statistics.median([g for s, g in gaps.items() if s not in (4, 5)])  # one of these holds the save
    save = max(max(gaps.get(4, step), gaps.get(5, step)) - step, 0.0)
    first = max(el[1] - step, 0.0)  # set-up, the initial eval and the first step's one-off costs
    saved = sorted((warm / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    last = max(el)
    evaluation = max((checkpoint_clock(saved[-1], records, last) if saved else el[last]) - el[last] - save, 0.0)
    n, points = 0, max(args.curve_points, 1)
    for cand in range(1, int(budget_s / max(step, 1e-9)) + 2):
        cost = first + cand * step + (cand // cfg.train.eval_every + 1) * evaluation + (points + 1) * save
        if cost > budget_s * 0.98:
            break
        n = cand
    if n <= cfg.optim.warmup_steps:
        raise SystemExit(f"kiln: budget {budget_s:.0f} s fits {n} steps of {step:.2f} s; raise --budget")
    print(f"kiln plan: {step:.3f} s/step, set-up + initial eval {first:.1f} s, eval {evaluation:.1f} s, save "
          f"{save:.2f} s -> --train.max_steps {n}", flush=True)
    return ["--train.max_steps", str(n), "--train.save_every", str(max(1, n // points))]


def run_kiln(args: argparse.Namespace, out: Path, budget_s: float, *, name: str = "kiln",
             points: int | None = None) -> dict[str, Any]:
    """Train kiln through its CLI for the budget; its checkpoints with their wall-clock times."""
    base = [args.kiln_preset, *shlex.split(args.kiln_args), "--run.seed", str(args.seed), "--train.keep_last", "0"]
    cfg = load_config(args.kiln_preset, shlex.split(args.kiln_args))
    plan = args.kiln_plan if args.kiln_plan != "auto" else ("budget" if kiln_has_time_budget() else "steps")
    n_points = args.curve_points if points is None else points
    if plan == "budget":
        minutes = budget_s / max(n_points, 1) / 60
        extra = ["--train.time_budget", f"{budget_s:g}s", "--train.save_every_minutes", f"{minutes:.4f}"]
    else:
        extra = plan_steps(args, base, out, budget_s, cfg)
    run = out / name
    wall = run_logged(kiln_cmd("train", *base, *extra, "--run.out_dir", str(run)), out / f"{name}.log")
    records, log = metrics(run), (out / f"{name}.log").read_text()
    ckpts = sorted((int(p.name.split("_")[1]), p) for p in (run / "checkpoints").glob("step_*")
                   if (p / "meta.json").is_file())
    points = [{"step": s, "path": str(p), "elapsed_s": checkpoint_clock(p, records, s)} for s, p in ckpts]
    final = points[-1]
    t = cfg.train
    return {"plan": "train.time_budget" if plan == "budget" else "measured train.max_steps",
            "cmd": shlex.join(kiln_cmd("train", *base, *extra, "--run.out_dir", str(run))),
            "steps": final["step"], "train_s": final["elapsed_s"], "process_s": wall,
            "tokens": final["step"] * t.global_batch_size * t.seq_len, "n_params": count_params(cfg.model),
            "run_dir": str(run), "checkpoints": points, "overrun": "went over its train.time_budget" in log}


def pick(points: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """At most n checkpoints spread evenly over the run's clock, the final one always."""
    if len(points) <= n:
        return points
    end = points[-1]["elapsed_s"]
    chosen = {len(points) - 1}
    for k in range(1, n):
        target = end * k / n
        chosen.add(min(range(len(points)), key=lambda i: abs(points[i]["elapsed_s"] - target)))
    return [points[i] for i in sorted(chosen)]


def score_kiln(kiln: dict[str, Any], texts: list[str], out: Path, *, n: int, window: int,
               name: str = "kiln") -> None:
    """Export and score kiln's checkpoints (the final one through `kiln export` as a user types it)."""
    final = kiln["checkpoints"][-1]
    final_dir = out / f"{name}-export" / f"step_{final['step']}"
    run_logged(kiln_cmd("export", "--checkpoint", kiln["run_dir"], "--out", str(final_dir)),
               out / f"{name}-export.log")
    for pt in pick(kiln["checkpoints"], n):
        d = final_dir if pt is final else out / f"{name}-export" / f"step_{pt['step']}"
        if pt is not final:
            export_checkpoint(pt["path"], d)  # what `kiln export` runs, without a process per checkpoint
        pt.update(score_bpb(d, texts, window=window))
        print(f"  kiln step {pt['step']:>6}  {pt['elapsed_s']:7.1f} s  bpb {pt['bpb']:.4f}", flush=True)
    kiln["bpb"], kiln["score"] = final["bpb"], {k: final[k] for k in ("nats", "tokens", "bytes", "bits_per_token")}
    kiln["export_dir"] = str(final_dir)


def score_also(also_texts: dict[str, list[str]], kiln: dict[str, Any], hf: dict[str, Any] | None, *,
               window: int) -> list[dict[str, Any]]:
    """Both final models (kiln's export, HF's model folder) on each `--also-score` text."""
    rows = []
    for path, texts in also_texts.items():
        row = {"path": path, "sha256": sha256(Path(path)), "bytes": sum(len(t.encode()) for t in texts),
               "kiln_bpb": score_bpb(kiln["export_dir"], texts, window=window)["bpb"],
               "hf_bpb": score_bpb(hf["model_dir"], texts, window=window)["bpb"] if hf else None}
        row["bpb_ratio"] = row["kiln_bpb"] / row["hf_bpb"] if hf else None
        rows.append(row)
        print(f"  also {path}: kiln bpb {row['kiln_bpb']:.4f}"
              + (f", HF {row['hf_bpb']:.4f}, kiln/HF {row['bpb_ratio']:.3f}" if hf else ""), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# HF


def run_hf(spec: dict[str, Any], out: Path, texts: list[str], *, window: int) -> dict[str, Any]:
    """The HF Trainer run in a child process (bench/quality_hf.py), then its final model scored."""
    hf_out = Path(spec["out_dir"])
    hf_out.mkdir(parents=True, exist_ok=True)
    (hf_out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    run_logged([sys.executable, str(Path(__file__).resolve()), "--hf-child", str(hf_out / "spec.json")],
               out / "hf.log")
    res = json.loads((hf_out / "hf_result.json").read_text())
    res.update(settings=settings_of(spec), reused_from=None)
    s = score_bpb(res["model_dir"], texts, window=window)
    res["bpb"], res["score"] = s["bpb"], {k: s[k] for k in ("nats", "tokens", "bytes", "bits_per_token")}
    print(f"  HF   step {res['steps']:>6}  {res['train_s']:7.1f} s  bpb {res['bpb']:.4f}", flush=True)
    return res


def reuse_hf(path: str, spec: dict[str, Any], heldout_sha: str, window: int) -> dict[str, Any]:
    """The HF side of an earlier record with the same settings, budget, held-out text and scoring window
    (one whose HF run really ran, so `reused_from` names where the numbers were measured)."""
    p = Path(path)
    text = p.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()] if p.suffix == ".jsonl" \
        else [json.loads(text)]
    want = settings_of(spec)
    for rec in reversed(records):
        hf = rec.get("hf")
        if hf and not hf.get("reused_from") and hf.get("settings") == want \
                and rec.get("heldout", {}).get("sha256") == heldout_sha \
                and rec.get("window") == window:
            return {**hf, "reused_from": f"{p} ({rec.get('date', '?')} {rec.get('time', '')})".strip()}
    raise SystemExit(f"--hf-result {path}: no record with this budget, HF settings and held-out text "
                     f"(budget {spec['budget_s']:g} s, seed {spec['seed']}); run without --hf-result once")


# ---------------------------------------------------------------------------------------------
# Report


def time_to(points: list[dict[str, Any]], bpb: float) -> dict[str, Any] | None:
    """The first scored checkpoint at or below `bpb`."""
    hit = next((p for p in points if "bpb" in p and p["bpb"] <= bpb), None)
    return None if hit is None else {"step": hit["step"], "elapsed_s": hit["elapsed_s"], "bpb": hit["bpb"]}


def table(rec: dict[str, Any]) -> str:
    k, hf = rec["kiln"], rec.get("hf")
    rows = [("kiln " + rec["kiln_preset"] + f" ({k['plan']})", k)]
    if hf:
        rows.append(("HF Trainer + LlamaForCausalLM" + (" (reused)" if hf.get("reused_from") else ""), hf))
    lines = ["| system | params | steps | train s | process s | tokens | tokens/s | held-out bpb |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['n_params']:,} | {r['steps']:,} | {r['train_s']:.0f} | {r['process_s']:.0f} | "
                     f"{r['tokens']:,} | {r['tokens'] / r['train_s']:,.0f} | {r['bpb']:.4f} |")
    if hf:
        t = rec["kiln_time_to_hf"]
        lines.append("")
        lines.append(f"kiln/HF: bpb {rec['bpb_ratio']:.3f} (lower is better), tokens/s "
                     f"{(k['tokens'] / k['train_s']) / (hf['tokens'] / hf['train_s']):.2f}x; kiln reached HF's final "
                     + (f"{hf['bpb']:.4f} at {t['elapsed_s']:.0f} s (step {t['step']}, first scored checkpoint "
                        f"at or below it)" if t else f"{hf['bpb']:.4f}: not within its run"))
        short = rec.get("kiln_short")
        if short:
            lines.append(f"kiln with {short['fraction']:.2f} of HF's train time (train.time_budget "
                         f"{short['budget_s']:.0f}s): {short['steps']:,} steps in {short['train_s']:.0f} s, bpb "
                         f"{short['bpb']:.4f}: " + ("at or below" if short["reaches_hf"] else "above")
                         + f" HF's final {hf['bpb']:.4f}")
        if hf.get("reused_from"):
            lines.append(f"HF side reused from {hf['reused_from']}")
    return "\n".join(lines)


def markdown_row(rec: dict[str, Any]) -> str:
    hf, t = rec.get("hf"), rec.get("kiln_time_to_hf")
    cells = [rec["machine"], rec["date"], rec["commit"], f"{rec['budget_s']:g} s", f"{rec['kiln']['bpb']:.4f}",
             f"{hf['bpb']:.4f}" + (" (reused)" if hf.get("reused_from") else "") if hf else "-",
             f"{rec['bpb_ratio']:.3f}" if hf else "-",
             f"{t['elapsed_s']:.0f} s" if t else ("not reached" if hf else "-"),
             (f"{rec['kiln_short']['bpb']:.4f} in {rec['kiln_short']['train_s']:.0f} s"
              if rec.get("kiln_short") else "-"),
             f"{rec['load'][0]:.1f} -> {rec['load'][1]:.1f}", rec["kiln_preset"] + (f" {rec['kiln_args']}" if rec["kiln_args"] else "")]
    return "| " + " | ".join(cells) + " |"


ROW_HEADER = ("| machine | date | commit | budget | kiln bpb | HF bpb | kiln/HF | kiln time to HF bpb | kiln short run "
              "| load | kiln run |\n|---|---|---|---:|---:|---:|---:|---:|---:|---|---|")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hf_child:
        return hf_main(args.hf_child)
    try:
        return compare(args)
    except KilnError as e:  # a bad preset, override or duration: one line, as the kiln CLI prints it
        print(f"bench/quality.py: error: {e}", file=sys.stderr)
        return 2


def compare(args: argparse.Namespace) -> int:
    """Both runs, the scores, the table and the record (see the module docstring)."""
    budget_s = parse_duration(args.budget, key="--budget", where="bench/quality.py")
    if args.skip_hf and args.hf_result:
        raise SystemExit("--skip-hf and --hf-result: choose one")
    load_config(args.kiln_preset, shlex.split(args.kiln_args))  # a bad override fails now, not after a run
    out = Path(args.out_dir or ROOT / "runs" / "quality" / time.strftime("%Y%m%d-%H%M%S"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; choose another --out-dir")
    texts, heldout_sha = load_texts(args.heldout), sha256(Path(args.heldout))
    for f in args.also_score:  # a missing file fails now, not after the runs
        if not Path(f).is_file():
            raise SystemExit(f"--also-score {f}: no such file")
    also_texts = {f: load_texts(f) for f in args.also_score}
    hf_cfg = load_config(args.hf_preset or args.kiln_preset, shlex.split(args.hf_args))
    spec = hf_spec(hf_cfg, budget_s=budget_s, seed=args.seed, corpus=args.corpus, out=out / "hf")
    hf = reuse_hf(args.hf_result, spec, heldout_sha, args.window) if args.hf_result else None  # before any training
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    kiln = run_kiln(args, out, budget_s)
    score_kiln(kiln, texts, out, n=args.curve_points, window=args.window)
    hf_error = None
    if hf is None and not args.skip_hf:
        try:
            hf = run_hf(spec, out, texts, window=args.window)
        except SystemExit as e:  # keep kiln's side: its record is written, and the exit status says it failed
            hf_error = str(e)
            print(hf_error, file=sys.stderr)
    short, short_error = None, None
    if hf and args.short_fraction > 0:  # time to HF's quality for a user who plans the shorter run
        short_s = hf["train_s"] * args.short_fraction
        try:
            short = run_kiln(args, out, short_s, name="kiln-short", points=1)
            score_kiln(short, texts, out, n=1, window=args.window, name="kiln-short")
            short.update(budget_s=short_s, fraction=args.short_fraction, reaches_hf=short["bpb"] <= hf["bpb"])
        except SystemExit as e:  # the comparison above stands; the record says why this part is missing
            short, short_error = None, str(e)
            print(short_error, file=sys.stderr)
    if hf:
        print(f"parameters: kiln {kiln['n_params']:,}, HF {hf['n_params']:,}"
              + ("" if kiln["n_params"] == hf["n_params"] else "  (different: kiln trains its preset's shape, HF the "
                                                                 "baseline's)"))
        used = hf["train_s"] / budget_s
        if used < 0.9:
            print(f"note: the HF run trained for {hf['train_s']:.0f} s, {used:.0%} of its {budget_s:.0f} s budget "
                  "(its step count came from its warm-up's timing): the ratio flatters kiln; run again")
        if spec["n_params_kiln"] != hf["n_params"]:
            raise SystemExit(f"the HF model has {hf['n_params']:,} parameters, kiln's config of the same shape "
                             f"{spec['n_params_kiln']:,}: the HF mirror of the shape is wrong")
    also = score_also(also_texts, kiln, hf, window=args.window)
    rec = {"bench": "quality", "date": time.strftime("%Y-%m-%d"), "time": time.strftime("%H:%M:%S"),
           "machine": f"{cpu_name()}, {os.cpu_count()} cores ({platform.node()})",
           "commit": git_describe(ROOT) or "unknown", "budget_s": budget_s, "seed": args.seed,
           "kiln_preset": args.kiln_preset, "kiln_args": args.kiln_args, "window": args.window,
           "heldout": {"path": str(args.heldout), "sha256": heldout_sha, "bytes": sum(len(t.encode()) for t in texts)},
           "kiln": kiln, "hf": hf, "bpb_ratio": kiln["bpb"] / hf["bpb"] if hf else None,
           "kiln_time_to_hf": time_to(kiln["checkpoints"], hf["bpb"]) if hf else None,
           "kiln_short": short, "kiln_short_error": short_error,
           "also": also, "load": [load0, os.getloadavg()[0]], "out_dir": str(out), "hf_error": hf_error}
    print("\n" + table(rec) + "\n\nfor bench/RESULTS.md:\n" + ROW_HEADER + "\n" + markdown_row(rec))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"\nrecord appended to {results}" + (" (kiln only: the HF run failed)" if hf_error else ""))
    return 1 if hf_error else 0


if __name__ == "__main__":
    raise SystemExit(main())
