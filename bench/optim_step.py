"""AdamW's step alone, per implementation (for-loop, foreach, fused), on a preset's real parameters.

    .venv/bin/python bench/optim_step.py tiny llama-30m [--device cpu] [--steps 10]
    .venv/bin/python bench/optim_step.py demo --muon [--rounds 5]

kiln builds AdamW with `fused=True` on CUDA and CPU (kiln.optim.builder); this is the before/after.
`--muon`: the whole step of Muon (the preset's optim settings, optim.name muon) with its AdamW groups (embeddings,
head, norms) in torch's fused kernel, as kiln runs it, against the per-tensor update it had before;
the two alternate step by step on one optimizer, `--rounds` x `--steps` steps each.
Prints a markdown table; gradients are random, the timed steps follow 3 untimed ones (state allocated).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import kiln.optim.muon as muon_mod
from kiln.config import load_config
from kiln.device import autocast_dtype
from kiln.model import build_model
from kiln.optim.builder import build_optimizer, param_groups


def timed_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    """Seconds of one opt.step(), the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def time_step(model: torch.nn.Module, device: torch.device, steps: int, **flags: bool) -> float:
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, **flags)
    for _ in range(3):
        opt.step()
    return statistics.median(timed_step(opt, device) for _ in range(steps)) * 1000


def muon_step_ms(name: str, device: torch.device, steps: int, rounds: int) -> tuple[float, float]:
    """Median ms of the preset's Muon step with the fused AdamW part, and with the per-tensor one."""
    cfg = load_config(name, [])
    model = build_model(cfg.model, seed=0).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    # Newton-Schulz in the dtype the trainer picks for this preset
    opt = build_optimizer(model, dataclasses.replace(cfg.optim, name="muon"), device_type=device.type,
                          autocast_dtype=autocast_dtype(cfg.train.dtype, device))
    fusable = muon_mod._fusable
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i in range(2 * (3 + steps * rounds)):  # 3 untimed steps of each first
            fused = i % 2 == 0
            muon_mod._fusable = fusable if fused else (lambda params: False)
            t = timed_step(opt, device)
            if i >= 6:
                times[fused].append(t)
    finally:
        muon_mod._fusable = fusable
    return statistics.median(times[True]) * 1000, statistics.median(times[False]) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("presets", nargs="+")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--muon", action="store_true", help="the preset's Muon step, AdamW part fused vs per-tensor")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.muon:
        print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; median ms of "
              f"{args.steps * args.rounds} steps each, alternating\n")
        print("| preset | Muon step, AdamW part fused | per-tensor | speed-up |\n|---|---:|---:|---:|")
        for name in args.presets:
            fused, loop = muon_step_ms(name, device, args.steps, args.rounds)
            print(f"| {name} | {fused:.1f} | {loop:.1f} | {loop / fused:.1f}x |")
        return
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
