"""Trained tokenizers against Mistral v3 for the CPU demo: training time, bytes per token, `kiln bench` speed.

For each vocabulary size, through the CLI as a user runs it (variants interleaved in every round, so
load on the shared machine hits them alike; medians over rounds):

  1. `kiln tokenizer train --source bundled:train --vocab-size N`: wall time of the command, the
     trainer's own seconds (word counting + merges, wall) and the command's CPU seconds (user + system);
  2. `kiln tokenizer stats --source bundled:val`: UTF-8 bytes per token, also for mistral-v3;
  3. `kiln bench tiny --model.vocab_size N --data.tokenizer DIR`: training tokens/s and parameters;
     separate processes, one per run, interleaved by run;
  4. the same steps in one process, one step of each vocabulary in turn (--step-rounds of them): on a
     loaded machine the fairer comparison, as wall tokens/s of the fastest step and as tokens per
     CPU-second (median; with --threads 1 insensitive to other work on the cores); text KB per CPU-s =
     tokens per CPU-s x bytes/token, the rate at which training reads the corpus.

    .venv/bin/python bench/tokenizer_vocab.py [--sizes 4096 8192 16384] [--rounds 3] [--out DIR]

Prints JSON lines per measurement and a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def kiln(*args: str) -> tuple[dict, float, float]:
    """Run the kiln CLI; (its last JSON line, wall seconds, CPU seconds of the command: user + system)."""
    t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise SystemExit(f"kiln {' '.join(args)} failed:\n{res.stderr}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return json.loads(res.stdout.strip().splitlines()[-1]), time.time() - t0, cpu


def interleaved_steps(vocabs: list[int], *, rounds: int, warmup: int = 2) -> dict[int, list[tuple[float, float]]]:
    """(wall, CPU) seconds per training step of `tiny` at each vocabulary, all in this process, one step of
    each in turn (A B C D A B C D ...): on a shared machine every variant sees the same load, step by step.
    What `kiln bench` times (kiln.bench.run_bench: Engine, synthetic packed batches, AdamW, clipping).
    CPU seconds (all threads) do not count the time the process waits for a core: with one thread
    (--threads 1) they measure the work itself, whatever else runs on the machine."""
    import torch

    from kiln.bench import synthetic_batches
    from kiln.config import load_config
    from kiln.device import autocast_for
    from kiln.parallel.mesh import init_layout
    from kiln.train.engine import Engine
    from kiln.train.objective import Objective

    class Pretrain(Objective):
        def loss(self, model, batch, *, cfg):
            from kiln.eval.loss import token_loss_sum

            return token_loss_sum(model, batch, doc_mask=cfg.data.doc_mask, impl=cfg.train.loss_impl), {}

    steps = {}
    for v in vocabs:
        cfg = load_config("tiny", ["--model.vocab_size", str(v)])
        layout = init_layout(cfg.parallel, cfg.model, cfg.run.device)
        torch.manual_seed(cfg.run.seed)
        engine = Engine(cfg, layout, Pretrain(), seed=cfg.run.seed, accum_steps=1)
        engine.train()
        batches = synthetic_batches(cfg, 1, seed=cfg.run.seed)
        autocast = autocast_for(cfg.train.dtype, layout.device)

        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")

        def step(engine=engine, batches=batches, autocast=autocast, clip=clip) -> None:
            engine.forward_backward(batches, autocast)
            engine.clip_grad_norm(clip)
            engine.optimizer.step()
            engine.optimizer.zero_grad(set_to_none=True)

        steps[v] = step
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[int, list[tuple[float, float]]] = {v: [] for v in vocabs}
    for _ in range(rounds):
        for v, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[v].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--rounds", type=int, default=3, help="rounds of tokenizer training and of kiln bench runs")
    p.add_argument("--steps", type=int, default=10, help="timed steps per kiln bench run")
    p.add_argument("--step-rounds", type=int, default=30, help="in-process interleaved steps per vocabulary")
    p.add_argument("--out", default="", help="where the tokenizers go (default: a temp folder)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the interleaved steps (0: default)")
    p.add_argument("--skip-train", action="store_true", help="reuse the tokenizers already in --out")
    p.add_argument("--skip-cli-bench", action="store_true", help="only the in-process interleaved steps")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kiln-tok-bench-"))
    load = [os.getloadavg()[0]]
    train: dict[int, list[tuple[float, float, float]]] = {n: [] for n in args.sizes}
    for r in range(0 if args.skip_train else args.rounds):
        for n in args.sizes:
            rec, wall, cpu_s = kiln("tokenizer", "train", "--source", "bundled:train", "--vocab-size", str(n),
                                    "--out", str(out / str(n)), "--quiet")
            train[n].append((wall, rec["train_seconds"], cpu_s))
            print(json.dumps({"what": "train", "round": r, "vocab": n, "wall_s": round(wall, 2),
                              "train_s": rec["train_seconds"], "cpu_s": round(cpu_s, 2),
                              "digest": rec["digest"][:12]}), flush=True)
    specs = {n: str(out / str(n)) for n in args.sizes} | {32768: "mistral-v3"}
    bpt = {}
    for n, spec in specs.items():
        rec, _, _ = kiln("tokenizer", "stats", "--tokenizer", spec, "--source", "bundled:val")
        bpt[n] = rec["bytes_per_token"]
        print(json.dumps({"what": "stats", **rec}), flush=True)
    load.append(os.getloadavg()[0])
    speed: dict[int, list[float]] = {n: [] for n in specs}
    for r in range(0 if args.skip_cli_bench else args.rounds):
        for n, spec in specs.items():
            rec, _, _ = kiln("bench", "tiny", "--steps", str(args.steps), "--model.vocab_size", str(n),
                          "--data.tokenizer", spec)
            speed[n].append(rec["tokens_per_sec"])
            print(json.dumps({"what": "bench", "round": r, "vocab": n, "tokens_per_sec": rec["tokens_per_sec"],
                              "step_ms": rec["step_ms"], "n_params": rec["n_params"], "git": rec["git_sha"]}),
                  flush=True)
    load.append(os.getloadavg()[0])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    per_step = interleaved_steps(list(specs), rounds=args.step_rounds)
    tokens_per_step = 8 * 256  # tiny: global batch 8 x seq 256
    # the fastest wall step is the least disturbed one; CPU seconds: the median
    inproc = {v: tokens_per_step / min(w for w, _ in t) for v, t in per_step.items()}
    cpu = {v: tokens_per_step / statistics.median(c for _, c in t) for v, t in per_step.items()}
    print(json.dumps({"what": "interleaved_steps", "threads": args.threads or "default",
                      "wall_ms": {v: [round(1000 * w, 1) for w, _ in t] for v, t in per_step.items()},
                      "cpu_ms": {v: [round(1000 * c, 1) for _, c in t] for v, t in per_step.items()}}), flush=True)
    load.append(os.getloadavg()[0])
    print(f"\nload average (1 min) at start / after training+stats / after kiln bench / end: "
          f"{' / '.join(f'{x:.1f}' for x in load)}\n")
    print("| tokenizer | vocab | train wall s | trainer s | train CPU s | bytes/token (bundled:val) | tiny params | kiln bench "
          "tokens/s (min-max) | interleaved: tokens/s (fastest step) | tokens per CPU-s | vs 32768 | text KB per "
          "CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    from kiln.config import load_config
    from kiln.model import count_params

    for n, spec in specs.items():
        med = {k: f"{statistics.median(v):.1f}" if v else "-"
               for k, v in (("wall", [x[0] for x in train.get(n, [])]), ("train", [x[1] for x in train.get(n, [])]),
                            ("cpu", [x[2] for x in train.get(n, [])]))}
        cli = (f"{statistics.median(speed[n]):.0f} ({min(speed[n]):.0f}-{max(speed[n]):.0f})" if speed[n] else "-")
        name = "mistral-v3" if spec == "mistral-v3" else f"trained {n}"
        params = count_params(load_config("tiny", ["--model.vocab_size", str(n)]).model)
        print(f"| {name} | {n} | {med['wall']} | {med['train']} | {med['cpu']} | {bpt[n]:.3f} | {params / 1e6:.2f}M | {cli} | "
              f"{inproc[n]:.0f} | {cpu[n]:.0f} | {cpu[n] / cpu[32768]:.2f}x | {cpu[n] * bpt[n] / 1e3:.1f} |")


if __name__ == "__main__":
    main()
