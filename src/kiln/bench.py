"""`kiln bench PRESET [overrides]`: time real training steps and print one JSON line.

It runs what `kiln train` runs for a step (kiln.train.engine.Engine: the model on this process's
layout with activation checkpointing / compile / FSDP / TP / PP as configured, the configured
optimizer, the pretraining loss, gradient clipping), on synthetic packed batches of the configured
shape (random tokens, documents of random length, so document masking costs what it costs in
training). Warm-up steps (compilation, allocator growth) are not timed; each timed step ends with a
device synchronisation. Under torchrun every rank runs the same and rank 0 prints.

JSON fields: tokens_per_sec (all ranks), step_ms (median), mfu (null on CPU or an unknown GPU),
peak_memory_bytes (CUDA: max allocated on the busiest rank; CPU: peak bytes of live tensors over
one extra step, kiln.bench.PeakTensorMemory), estimate_bytes (kiln.estimate's prediction for the same
config), n_params (all parameters) and matmul_params (the N of MFU's 6N: blocks + the head once),
precision (the matmul precision MFU divides by: bf16 under bf16 autocast or with bf16 parameters),
git_sha (with "+dirty" when the working tree had uncommitted changes) and the device, layout and
fast paths used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import weakref
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from kiln.cliargs import parse_with_overrides
from kiln.config import Config, load_config, split_preset
from kiln.data.packing import Batch, Row, make_batch
from kiln.device import autocast_for, train_precision
from kiln.errors import ConfigError
from kiln.estimate import estimate_memory
from kiln.model import count_params
from kiln.model.loss import shared_rows
from kiln.optim import param_dtype
from kiln.parallel.mesh import init_layout, shutdown
from kiln.parallel.pipeline import microbatches
from kiln.perf import device_peak, flops_per_token, mfu
from kiln.runinfo import git_describe
from kiln.train.engine import Engine
from kiln.train.objective import Objective, RunSettings
from kiln.train.plan import make_plan


def synthetic_batches(cfg: Config, n: int, *, seed: int = 0) -> list[Batch]:
    """`n` packed micro-batches: random tokens in documents of random length (mean T/4)."""
    rng = np.random.default_rng(seed)
    T, B, V = cfg.train.seq_len, cfg.train.micro_batch_size, cfg.model.vocab_size
    out = []
    for _ in range(n):
        rows = []
        for _ in range(B):
            lengths = rng.geometric(min(1.0, 4.0 / T), size=T + 1)
            doc = np.repeat(np.arange(T + 1), lengths)[: T + 1]
            rows.append(Row(tokens=rng.integers(0, V, T + 1, dtype=np.int64), doc_ids=(doc - doc[0]).astype(np.int32)))
        out.append(make_batch(rows))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakTensorMemory:
    """Peak bytes of live tensor storages while active (a TorchDispatchMode; CPU has no allocator stats).

    Every op output's storage is counted once until it is freed; `existing` tensors (parameters,
    optimizer states) are counted from the start. Use it around a whole step, backward included.
    """

    def __init__(self, existing: Any = ()) -> None:
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    tracker._track(t)
                return out

        self._sizes = WeakIdKeyDictionary()
        self._mode = _Mode()
        self.current = self.peak = 0
        for t in existing:
            self._track(t)

    def _track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        if st in self._sizes or st.nbytes() == 0:
            return
        n = st.nbytes()
        self._sizes[st] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, n)

    def _free(self, n: int) -> None:
        self.current -= n

    def __enter__(self) -> PeakTensorMemory:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


def _state_tensors(engine: Any) -> list[torch.Tensor]:
    """Parameters, gradients and optimizer states alive before a step."""
    out = []
    for part in engine.parts:
        for p in part.parameters():
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
    for opt in engine.optimizer.optims:
        out += [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    out += [b for part in engine.parts for b in part.buffers()]
    return out


def profiled_peak_bytes(existing: Any, step_fn: Any) -> int:
    """Peak live CPU tensor bytes of `step_fn()` from the profiler's allocator events.

    For compiled code, where a TorchDispatchMode cannot run (torch.compile refuses one): the CPU
    allocator reports every allocation and free to the profiler, inductor's kernels included.
    `existing` tensors are counted from the start, as PeakTensorMemory does (the two agree within
    0.5% on an eager step, tested; the profiler also sees kernels' scratch allocations).
    """

    seen: dict[int, int] = {}
    for t in existing:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return sum(seen.values()) + peak


@contextlib.contextmanager
def _quiet_stderr() -> Any:
    """Silence the profiler's start/stop lines (kineto writes them to fd 2, not through Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(engine: Any, step_fn: Any) -> tuple[int, str]:
    """Peak tensor bytes of one more step on CPU, and how it was counted."""
    if engine.train_cfg.compile:  # compiled blocks refuse a dispatch mode; the profiler sees their allocations
        return profiled_peak_bytes(_state_tensors(engine), step_fn), "profiler allocator events (one extra step)"
    with PeakTensorMemory(_state_tensors(engine)) as tracker:
        step_fn()
    return tracker.peak, "live tensor bytes (one extra step)"


def _shared_head_rows(model: Any) -> int:
    """Head rows the loss computed as one (kiln.model.loss, "Shared rows"): those of ids the bench's few
    random batches never targeted. A real run's count is the vocabulary less the ids its data uses."""
    if not getattr(model, "share_head_rows", False) or model.head is None:
        return 0
    group = shared_rows(model.head.weight.detach())
    return group.size if group is not None else 0


def run_bench(cfg: Config, *, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Warm up, time `steps` training steps, measure peak memory; the result record."""
    layout = init_layout(cfg.parallel, cfg.model, cfg.run.device)
    device = layout.device
    torch.manual_seed(cfg.run.seed)
    objective = Objective()  # pretraining, with the configured train.loss_impl
    objective.configure(RunSettings.of(cfg))
    plan = make_plan(cfg.model, cfg.train, cfg.optim, dp_size=layout.dp_size,
                     pipeline_microbatches=microbatches(cfg.parallel) if layout.pp > 1 else 1)
    engine = Engine(model=cfg.model, optim=cfg.optim, train=cfg.train, parallel=cfg.parallel, doc_mask=cfg.data.doc_mask,
                    layout=layout, objective=objective, seed=cfg.run.seed, accum_steps=plan.accum_steps)
    engine.train()
    autocast = autocast_for(cfg.train.dtype, device)
    n_micro = plan.accum_steps
    batches = [b.to(device) for b in synthetic_batches(cfg, max(n_micro, 2), seed=cfg.run.seed + layout.dp_rank)]
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")

    def step() -> float:
        micro = batches[:n_micro] if engine.reads_data else []
        loss_sum, count, _ = engine.forward_backward(micro, autocast)
        engine.clip_grad_norm(max_norm)
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum) / max(count, 1.0)

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        losses.append(step())  # reading the loss syncs the host with the device
        _sync(device)
        times.append(time.perf_counter() - t0)

    if device.type == "cuda":
        peak, peak_source = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, peak_source = _cpu_peak_bytes(engine, step)
    if layout.distributed:
        t = torch.tensor([float(peak or 0)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = int(t.item())

    step_s = statistics.median(times)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    tps = tokens_per_step / step_s
    fl = flops_per_token(cfg.model, seq_len=cfg.train.seq_len)
    pk = device_peak(device, precision=train_precision(cfg.train.dtype, param_dtype(cfg.optim), device))
    est = estimate_memory(cfg, device=device.type)
    result = {
        "preset": cfg.run.name, "tokens_per_sec": round(tps, 1), "step_ms": round(step_s * 1000, 2),
        "mfu": mfu(tokens_per_sec=tps, flops_per_token=fl.total, peak_flops=pk.peak_flops,
                   n_devices=layout.world_size),
        "peak_memory_bytes": peak, "peak_memory_source": peak_source, "estimate_bytes": est.total,
        "estimate_ratio": round(peak / est.total, 3) if peak else None,
        "device": str(device), "device_name": pk.device_name, "world_size": layout.world_size,
        "precision": pk.precision, "peak_tflops": pk.peak_flops / 1e12 if pk.peak_flops else None,
        "peak_note": pk.note, "flops_per_token": fl.total, "matmul_params": fl.matmul_params,
        "n_params": count_params(cfg.model), "param_dtype": cfg.optim.param_dtype,
        "seq_len": cfg.train.seq_len, "micro_batch_size": cfg.train.micro_batch_size,
        "global_batch_size": cfg.train.global_batch_size, "accumulation": n_micro,
        "attention": cfg.model.attention, "doc_mask": cfg.data.doc_mask, "compile": cfg.train.compile,
        "compile_mode": cfg.train.compile_mode if cfg.train.compile else None,
        "activation_checkpointing": cfg.train.activation_checkpointing, "loss_impl": cfg.train.loss_impl,
        "optimizer": cfg.optim.name, "layout": {k: getattr(cfg.parallel, k) for k in ("dp_replicate", "dp_shard",
                                                                                     "tp", "pp")},
        "steps": steps, "warmup": warmup, "step_ms_min": round(min(times) * 1000, 2), "loss_last": losses[-1],
        "torch": torch.__version__, "git_sha": git_describe(), "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    result["shared_head_rows"] = _shared_head_rows(engine.model)
    result["is_main"] = layout.is_main
    shutdown(layout)
    return result


def main(argv: list[str]) -> int:
    """CLI entry: `kiln bench PRESET [--steps N] [--warmup N] [--section.key VALUE ...]`."""
    p = argparse.ArgumentParser(prog="kiln bench", description=__doc__.split("\n\n")[0],
                                epilog="PRESET: a preset name or YAML path (default tiny); any config key is "
                                "an override: --section.key VALUE (kiln train -h).",
                                usage="kiln bench [PRESET] [--steps N] [--warmup N] [--section.key VALUE ...]",
                                allow_abbrev=False)
    p.add_argument("--steps", type=int, default=10, metavar="N",
                   help="timed steps, median reported (default 10)")
    p.add_argument("--warmup", type=int, default=3, metavar="N",
                   help="untimed steps first; compilation happens here (default 3)")
    preset, argv = split_preset(argv)  # PRESET (a preset name or YAML path, default tiny) only as the first word
    args, overrides = parse_with_overrides(p, argv)
    cfg = load_config(preset or "tiny", overrides)
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("kiln bench: --steps must be >= 1 and --warmup >= 0")
    res = run_bench(cfg, steps=args.steps, warmup=args.warmup)
    if res.pop("is_main"):
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
