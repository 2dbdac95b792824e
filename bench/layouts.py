"""Step time and tokens/s of every parallel layout: `kiln bench` under torchrun, one line per layout.

    .venv/bin/python bench/layouts.py [--preset tiny] [--steps 5] [--nproc 2 4] [--write]

CPU (gloo) by default; on a GPU machine the same layouts run with NCCL (`--device cuda`). With
--write the table replaces the layouts block of bench/RESULTS.md. On a 2-core CPU this measures
overheads (communication, pipeline bubbles, process count > cores), not speed-ups.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    1: {"single": []},
    2: {"ddp": ["--parallel.dp_replicate", "2"], "fsdp": ["--parallel.dp_shard", "2"], "tp": ["--parallel.tp", "2"],
        "pp 1F1B": ["--parallel.pp", "2", "--parallel.pp_schedule", "1F1B"],
        "pp Interleaved1F1B": ["--parallel.pp", "2", "--parallel.pp_schedule", "Interleaved1F1B"],
        "pp ZBVZeroBubble": ["--parallel.pp", "2", "--parallel.pp_schedule", "ZBVZeroBubble"]},
    4: {"fsdp x tp": ["--parallel.dp_shard", "2", "--parallel.tp", "2"],
        "fsdp x pp": ["--parallel.dp_shard", "2", "--parallel.pp", "2"],
        "hsdp": ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"]},
}
BEGIN, END = "<!-- layouts:begin -->", "<!-- layouts:end -->"


def run(nproc: int, preset: str, args: list[str], steps: int, device: str) -> dict:
    base = [sys.executable, "-m", "kiln", "bench", preset, "--steps", str(steps), "--warmup", "2",
            "--run.device", device, "--train.global_batch_size", "16", "--train.micro_batch_size", "2", *args]
    if nproc > 1:
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *base[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    res = subprocess.run(base, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    rows = []
    for nproc in args.nproc:
        for name, extra in LAYOUTS[nproc].items():
            r = run(nproc, args.preset, extra, args.steps, args.device)
            rows.append((nproc, name, r))
            print(f"{nproc} x {name:<20} " + (f"{r['tokens_per_sec']:>10,.0f} tok/s  {r['step_ms']:>8,.0f} ms/step"
                                             if "error" not in r else f"failed: {r['error']}"), flush=True)
    device = rows[0][2].get("device", args.device) if rows else args.device
    lines = [f"`python bench/layouts.py --preset {args.preset} --steps {args.steps}` (global batch 16 x the "
             f"preset's seq_len, micro-batch 2, median step after 2 warm-up). Machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, device {device}; {datetime.date.today()}; commit {commit}{'+dirty' if dirty else ''}.",
             "", "| processes | layout | tokens/s | step ms |", "|---:|---|---:|---:|"]
    for nproc, name, r in rows:
        if "error" in r:
            lines.append(f"| {nproc} | {name} | failed | {r['error']} |")
        else:
            lines.append(f"| {nproc} | {name} | {r['tokens_per_sec']:,.0f} | {r['step_ms']:,.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        path = ROOT / "bench" / "RESULTS.md"
        text = path.read_text()
        block = f"{BEGIN}\n{table}\n{END}"
        if BEGIN in text:
            text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text += f"\n## Parallel layouts (bench/layouts.py)\n\n{block}\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
