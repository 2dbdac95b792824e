"""AdamW's step alone, per implementation (for-loop, foreach, fused), on a preset's real parameters.

    .venv/bin/python bench/optim_step.py tiny llama-30m [--device cpu] [--steps 10]

kiln builds AdamW with `fused=True` on CUDA and CPU (kiln.optim.builder); this is the before/after.
Prints a markdown table; gradients are random, the timed steps follow 3 untimed ones (state allocated).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kiln.config import load_config
from kiln.model import build_model
from kiln.optim.builder import param_groups


def time_step(model: torch.nn.Module, device: torch.device, steps: int, **flags: bool) -> float:
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, **flags)
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("presets", nargs="+")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    variants = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; median ms of "
          f"{args.steps} steps\n")
    print("| preset | parameters | " + " | ".join(variants) + " | fused vs foreach |")
    print("|---|---:|" + "---:|" * len(variants) + "---:|")
    for name in args.presets:
        model = build_model(load_config(name, []).model, seed=0).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        ms = {k: time_step(model, device, args.steps, **v) for k, v in variants.items()}
        n = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {n / 1e6:.1f}M | " + " | ".join(f"{v:.1f}" for v in ms.values())
              + f" | {ms['foreach'] / ms['fused']:.1f}x |")
        del model


if __name__ == "__main__":
    main()
