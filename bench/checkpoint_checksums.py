"""What checkpoint checksums cost: a preset's fp32 weights plus AdamW's two moments saved through
kiln's real save path (`save_training`: DCP, state files, meta.json with checksums, fsync, rename),
with and without the checksums, interleaved (A B A B ...), then what verification costs at load.

    PYTHONPATH=src .venv/bin/python bench/checkpoint_checksums.py --preset llama-1b --reps 3 --dir /tmp/ckbench

Needs the state in memory plus room to spare, and twice it on disk (llama-1b: 12.5 GB of state,
~20 GB RAM free). "without" writes with DCP's plain FileSystemWriter and lists no files in meta.json,
so the difference is the checksumming alone. Also timed: xxh3 over the state's tensors in memory
(the work the save adds), hashing the written files again from disk afterwards (the design this
replaced), and verification at load: "warm" right after the save, "cold" after dropping the
files' pages (posix_fadvise DONTNEED), like a load after a reboot; the inference load (DCP reading
the weights alone into existing tensors, cold) for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from kiln.config import load_config
from kiln.model import build_model
from kiln.train import checkpoint as ckpt_io
from kiln.train import storage


def training_state(preset: str) -> tuple[dict, object]:
    """{"model", "optim"} as Engine.state_dict() gives it, for the preset, with AdamW's moments filled."""
    cfg = load_config(preset, [])
    model = build_model(cfg.model, device="cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p) * 1e-3,
                        "exp_avg_sq": torch.rand_like(p) * 1e-6}
    msd = get_model_state_dict(model)
    if cfg.model.tie_embeddings:
        msd.pop("head.weight", None)
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    return {"model": msd, "optim": osd}, cfg


def drop_cache(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/kiln-ckbench")
    args = ap.parse_args()
    root = Path(args.dir) / "checkpoints"
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    state, cfg = training_state(args.preset)
    nbytes = sum(v.numel() * v.element_size() for part in state.values() for v in part.values()
                 if isinstance(v, torch.Tensor))
    print(f"{args.preset}: state {nbytes / 1e9:.2f} GB built in {time.perf_counter() - t:.0f}s", flush=True)
    tensors = [v for part in state.values() for v in part.values() if isinstance(v, torch.Tensor) and v.numel()]
    real = (ckpt_io.summing_writer, ckpt_io.collect_digests)
    plain = (lambda path: FileSystemWriter(str(path)), lambda folder: {})
    times: dict[str, list[float]] = {k: [] for k in ("with", "without", "memory", "rehash", "warm", "cold", "load")}

    def save(variant: str, step: int) -> tuple[Path, float]:
        ckpt_io.summing_writer, ckpt_io.collect_digests = real if variant == "with" else plain
        t = time.perf_counter()
        path = ckpt_io.save_training(root, step, state=state, rank=0, is_main=True, cfg=cfg, common={"step": step},
                                     rank_state={}, meta={})
        return path, time.perf_counter() - t

    def settle(path: Path) -> None:  # the next save starts on a quiet disk, whichever variant came before
        shutil.rmtree(path)
        os.sync()
        time.sleep(2)

    settle(save("with", 0)[0])  # warm-up: DCP's first call, allocator, file system
    order = [v for rep in range(args.reps) for v in (("with", "without") if rep % 2 == 0 else ("without", "with"))]
    for step, variant in enumerate(order, start=1):
        path, took = save(variant, step)
        times[variant].append(took)
        print(f"save {step} {variant}: {took:.1f}s", flush=True)
        settle(path)
    for step in range(len(order) + 1, len(order) + 1 + args.reps):  # what hashing and verifying cost alone
        path, _ = save("with", step)
        t = time.perf_counter()
        for v in tensors:
            xxhash.xxh3_128(v.view(-1).view(torch.uint8).numpy()).digest()
        times["memory"].append(time.perf_counter() - t)
        t = time.perf_counter()
        storage.digest_files(path)
        times["rehash"].append(time.perf_counter() - t)
        storage._verified.clear()
        t = time.perf_counter()
        storage.verify(path)
        times["warm"].append(time.perf_counter() - t)
        drop_cache(path)
        storage._verified.clear()
        t = time.perf_counter()
        storage.verify(path)
        times["cold"].append(time.perf_counter() - t)
        drop_cache(path)
        t = time.perf_counter()
        ckpt_io._quiet(ckpt_io._dcp().load, {"model": state["model"]}, checkpoint_id=str(path / "dcp"))
        times["load"].append(time.perf_counter() - t)
        print(f"xxh3 in memory {times['memory'][-1]:.2f}s, hash the files again {times['rehash'][-1]:.2f}s, verify "
              f"warm {times['warm'][-1]:.2f}s cold {times['cold'][-1]:.2f}s, weights-only DCP load cold "
              f"{times['load'][-1]:.2f}s", flush=True)
        settle(path)
    ckpt_io.summing_writer, ckpt_io.collect_digests = real
    med = {k: statistics.median(v) for k, v in times.items()}
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    out = {"preset": args.preset, "state_bytes": nbytes, "reps": args.reps, "git_sha": sha + ("+dirty" if dirty else ""),
           "median_s": med, "all_s": times, "overhead": (med["with"] - med["without"]) / med["without"],
           "memory_share": med["memory"] / med["with"], "rehash_share": med["rehash"] / med["with"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
