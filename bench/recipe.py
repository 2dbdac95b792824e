"""Which recipe gives the best model for a wall-clock budget on this machine: one ablation table.

    python bench/recipe.py --budget 300s                      # every variant below, one after the other
    python bench/recipe.py --budget 300s --only base,v4k      # some of them
    python bench/recipe.py --list

Each variant is `kiln train` through the CLI with `--train.time_budget BUDGET` (the run times its warmup
and fixes the steps that fit, so a faster step buys more steps), then `kiln export` and the held-out
scorer of bench/quality.py (bits per byte on bench/heldout: Carroll and Melville, not in the training
corpus; each model with its own tokenizer, so vocabularies compare fairly). The runs go one after the
other in one invocation on the same machine; the table keeps each run's steps and tokens/s, so a run
the machine slowed down shows. One JSON record per variant goes to --results.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from quality_hf import load_texts, score_bpb  # noqa: E402

from kiln.runinfo import git_describe  # noqa: E402

HELDOUT = ROOT / "bench" / "heldout" / "heldout.jsonl.gz"

# name -> overrides on top of the tiny preset. {tok4096} etc. name tokenizers trained by
# `kiln tokenizer train --source bundled:train --vocab-size N --out DIR/tokN` (--tokenizers DIR).
VARIANTS: dict[str, str] = {
    "base": "",
    "v2k": "--data.tokenizer {tok2048} --model.vocab_size 2048",
    "v4k": "--data.tokenizer {tok4096} --model.vocab_size 4096",
    "v8k": "--data.tokenizer {tok8192} --model.vocab_size 8192",
    "v4k-d256": "--data.tokenizer {tok4096} --model.vocab_size 4096 --model.d_model 256 --model.ffn_dim 768",
    "v4k-d192L6": "--data.tokenizer {tok4096} --model.vocab_size 4096 --model.d_model 192 --model.n_layers 6 "
                  "--model.n_heads 6 --model.n_kv_heads 2 --model.ffn_dim 512",
    "v4k-lr4e-3": "--data.tokenizer {tok4096} --model.vocab_size 4096 --optim.lr 4e-3",
    "v4k-wsd": "--data.tokenizer {tok4096} --model.vocab_size 4096 --optim.schedule wsd --optim.decay_fraction 0.3 "
               "--optim.min_lr_ratio 0.0",
    "v4k-muon": "--data.tokenizer {tok4096} --model.vocab_size 4096 --optim.name muon",
    "v4k-b16": "--data.tokenizer {tok4096} --model.vocab_size 4096 --train.micro_batch_size 16 "
               "--train.global_batch_size 16",
    "v4k-qknorm": "--data.tokenizer {tok4096} --model.vocab_size 4096 --model.qk_norm true --optim.lr 4e-3",
    "v4k-untied": "--data.tokenizer {tok4096} --model.vocab_size 4096 --model.tie_embeddings false",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="300s", help="train.time_budget of every variant")
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--extra", action="append", default=[], help="NAME=OVERRIDES: another variant")
    p.add_argument("--tokenizers", default="/tmp", help="folder holding tok2048, tok4096, tok8192")
    p.add_argument("--out", default="/tmp/kiln-recipe", help="run folders")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "recipe.jsonl"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--list", action="store_true")
    return p.parse_args(argv)


def kiln(*args: str, log: Path) -> float:
    """Run `python -m kiln ARGS` with its output in `log`; the wall seconds. A failure raises with the tail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        res = subprocess.run([sys.executable, "-m", "kiln", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if res.returncode:
        raise RuntimeError(f"kiln {' '.join(args[:2])} failed: see {log}")
    return time.perf_counter() - t0


def run_variant(name: str, overrides: str, args: argparse.Namespace, texts: list[str]) -> dict:
    out = Path(args.out) / name
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    over = shlex.split(overrides.format(**{f"tok{v}": str(Path(args.tokenizers) / f"tok{v}")
                                           for v in (2048, 4096, 8192)}))
    wall = kiln("train", args.preset, "--run.out_dir", str(out / "run"), "--train.time_budget", args.budget,
                "--train.sample_tokens", "0", "--train.save_every", "100000", *over, log=out / "log.txt")
    kiln("export", "--checkpoint", str(out / "run"), "--out", str(out / "hf"), log=out / "log.txt")
    score = score_bpb(out / "hf", texts)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    tps = sorted(r["tokens_per_sec"] for r in train)
    return {"variant": name, "overrides": overrides, "budget": args.budget, "steps": train[-1]["step"],
            "tokens": train[-1]["tokens_seen"], "elapsed_sec": train[-1]["elapsed_sec"], "wall_sec": wall,
            "tokens_per_sec_median": tps[len(tps) // 2], "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "heldout_bpb": score["bpb"], "commit": git_describe(ROOT), "date": time.strftime("%Y-%m-%d %H:%M"),
            "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = dict(VARIANTS)
    for spec in args.extra:
        name, _, over = spec.partition("=")
        variants[name] = over
    if args.list:
        for k, v in variants.items():
            print(f"{k:14} {v}")
        return 0
    names = [n for n in (args.only.split(",") if args.only else variants) if n]
    texts = load_texts(HELDOUT)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        rec = run_variant(name, variants[name], args, texts)
        rows.append(rec)
        with open(args.results, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(f"{name:14} steps {rec['steps']:>6}  tok/s {rec['tokens_per_sec_median']:>8,.0f}  "
              f"eval {rec['final_eval_loss'] or float('nan'):.4f}  held-out bpb {rec['heldout_bpb']:.4f}  "
              f"(load {rec['load']:.1f})", flush=True)
    print("\n| variant | overrides | steps | tok/s | held-out bpb |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | `{r['overrides'] or '(tiny)'}` | {r['steps']} | {r['tokens_per_sec_median']:,.0f} | "
              f"{r['heldout_bpb']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
