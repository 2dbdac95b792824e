"""Checkpoint averaging against a learning-rate decay, on this machine (issue 12, part 4).

    python bench/averaging.py --steps 500 --every 25 --last 8

Two runs of one preset through the CLI, the same until the decay starts:
  constant   --optim.schedule constant (a WSD run's stable phase), a checkpoint every --every steps
  decayed    --optim.schedule wsd --optim.decay_fraction F: the same steps, the LR decayed linearly to 0
             over the last F of them
then `kiln average` of the constant run's last --last checkpoints (uniform, and EMA), and every model
scored by bench/quality.py's held-out scorer (bits per byte on bench/heldout). Training is fixed in
steps, so the result does not depend on the machine's load. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
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


def kiln(*args: str, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(log, "a") as fh:
        res = subprocess.run([sys.executable, "-m", "kiln", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if res.returncode:
        raise SystemExit(f"kiln {' '.join(args[:3])} failed: see {log}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--args", default="", help="extra overrides for both runs")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--every", type=int, default=25, help="checkpoint interval of the constant run")
    p.add_argument("--last", type=int, default=8, help="checkpoints averaged")
    p.add_argument("--decay-fraction", type=float, default=0.2)
    p.add_argument("--ema", type=float, default=0.75, help="decay of the EMA variant over the checkpoints")
    p.add_argument("--out", default="/tmp/kiln-averaging")
    a = p.parse_args(argv)
    out = Path(a.out)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    log = out / "log.txt"
    common = [a.preset, "--train.max_steps", str(a.steps), "--train.sample_tokens", "0", *a.args.split()]
    kiln("train", *common, "--run.out_dir", str(out / "constant"), "--optim.schedule", "constant",
         "--train.save_every", str(a.every), "--train.keep_last", "0", log=log)
    kiln("train", *common, "--run.out_dir", str(out / "decayed"), "--optim.schedule", "wsd",
         "--optim.decay_fraction", str(a.decay_fraction), "--optim.min_lr_ratio", "0", "--train.save_every",
         str(a.steps), log=log)
    kiln("average", str(out / "constant"), "--last", str(a.last), "--out", str(out / "avg"), log=log)
    kiln("average", str(out / "constant"), "--last", str(a.last), "--ema", str(a.ema), "--out", str(out / "ema"),
         log=log)
    texts = load_texts(HELDOUT)
    rows = {}
    for name in ("constant", "decayed", "avg", "ema"):
        kiln("export", "--checkpoint", str(out / name), "--out", str(out / f"{name}-hf"), log=log)
        rows[name] = score_bpb(out / f"{name}-hf", texts)["bpb"]
    record = {"bench": "averaging", "preset": a.preset, "args": a.args, "steps": a.steps, "every": a.every,
              "last": a.last, "decay_fraction": a.decay_fraction, "ema": a.ema, "heldout_bpb": rows,
              "commit": git_describe(ROOT), "date": time.strftime("%Y-%m-%d")}
    names = {"constant": "constant LR, last checkpoint", "decayed": f"WSD, linear decay over the last {a.decay_fraction:.0%}",
             "avg": f"uniform average of the constant run's last {a.last} (every {a.every} steps)",
             "ema": f"EMA ({a.ema}) of the same {a.last}"}
    print("| model | held-out bpb |\n|---|---:|")
    for k, v in rows.items():
        print(f"| {names[k]} | {v:.4f} |")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
