"""Training on any layout: setup, then one loop that reads top to bottom.

    for each optimizer step:
        lr <- schedule(step)
        forward + backward over the step's micro-batches (loss / the step's global count)
        clip -> NaN guard -> spike guard -> optimizer step
        divergence guard, log, eval, checkpoint, job control

The layout (single process, DDP, FSDP2, TP, PP and their combinations, from torchrun) lives in
kiln.train.engine; the objective (pretraining, SFT, DPO, ...) in kiln.train.objective.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from kiln.config import Config, to_dict
from kiln.data.tokenizer import Tokenizer, load_tokenizer
from kiln.errors import CheckpointError, DataError, KilnError
from kiln.model import Transformer, count_params
from kiln.optim import describe_schedule, lr_factor, scaled_lr
from kiln.parallel.mesh import Layout, init_layout, shutdown
from kiln.train import checkpoint as ckpt_io
from kiln.train.control import JobControl
from kiln.train.engine import Engine
from kiln.train.metrics import MetricsLogger, StepMonitor, format_duration, run_info
from kiln.train.mirror import mirror_for
from kiln.train.objective import Objective
from kiln.train.progress import Progress, StopOnSignal
from kiln.train.stability import DivergenceDetector, SpikeDetector


class TrainingDiverged(KilnError):
    """Loss or gradient norm became NaN/Inf, or the loss diverged; nothing poisoned was saved."""


@dataclass
class Plan:
    """How long the run is and how often things happen, derived from the config and the model size."""

    n_params: int
    tokens_per_step: int
    accum_steps: int  # micro-batches per optimizer step on each data-parallel rank
    total_steps: int
    total_tokens: int
    budget_source: str
    peak_lr: float
    log_every: int
    eval_every: int
    save_every: int


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise KilnError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype training uses: bf16 on CUDA by default, none (fp32) on CPU unless
    train.dtype=bf16. The one place this decision is made."""
    dtype = cfg.train.dtype
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_for(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for `autocast_dtype` (a no-op context without one)."""
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_plan(cfg: Config, *, dp_size: int = 1) -> Plan:
    t = cfg.train
    n_params = count_params(cfg.model)
    per_pass = t.micro_batch_size * dp_size
    if t.global_batch_size % per_pass:
        raise KilnError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                        f"train.micro_batch_size x data-parallel ranks ({t.micro_batch_size} x {dp_size})")
    tokens_per_step = t.global_batch_size * t.seq_len
    if t.max_steps > 0:
        steps, source = t.max_steps, "train.max_steps"
    elif t.total_tokens > 0:
        steps, source = math.ceil(t.total_tokens / tokens_per_step), "train.total_tokens"
    else:
        steps, source = math.ceil(20 * n_params / tokens_per_step), "Chinchilla default (20 x parameters)"

    def cadence(n: int) -> int:
        return max(1, round(n * t.step_cadence))

    return Plan(n_params, tokens_per_step, t.global_batch_size // per_pass, steps, steps * tokens_per_step, source,
                scaled_lr(cfg.optim, t.global_batch_size), cadence(t.log_every), cadence(t.eval_every),
                cadence(t.save_every))


def check_tokenizer(tok: Tokenizer, cfg: Config, where: str) -> None:
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"{where}: tokenizer '{cfg.data.tokenizer}' has {tok.vocab_size} ids but model.vocab_size is "
                        f"{cfg.model.vocab_size}; set --model.vocab_size {tok.vocab_size} or use a matching tokenizer")


def prepare_out_dir(out: Path, *, fresh: bool) -> None:
    """Create the run folder; with --fresh, move an existing one aside (never delete checkpoints)."""
    if fresh and out.exists() and any(out.iterdir()):
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        print(f"--fresh: moved the previous run to {aside}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise KilnError(f"run.out_dir {out}: not writable ({e.strerror}); pass --run.out_dir DIR") from None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resumable(saved: Config, cfg: Config, ckpt: Path) -> None:
    """Architecture and tokenizer must match the checkpoint; schedule, budget, layout and intervals may change."""
    a, b = to_dict(saved.model), to_dict(cfg.model)
    a.pop("attention"), b.pop("attention")  # the backend does not change the weights
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        k = diff[0]
        raise CheckpointError(f"{ckpt}: saved with model.{k}={a[k]} but the config says {b[k]}; resume with the "
                              "same architecture, or pass --fresh to start over (the old run is moved aside)")
    if saved.data.tokenizer != cfg.data.tokenizer:
        raise CheckpointError(f"{ckpt}: trained with tokenizer '{saved.data.tokenizer}', config says "
                              f"'{cfg.data.tokenizer}'; use the same tokenizer or --fresh")


def _agree(value: Any, layout: Layout) -> Any:
    """Rank 0's value on every rank (decisions that read the file system)."""
    if not layout.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def dry_run(cfg: Config, plan: Plan, layout: Layout) -> dict[str, Any]:
    """Print what the run would do (config, size, budget, LR curve, memory estimate) and return it."""
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    print(f"\nparameters       {plan.n_params:,} ({plan.n_params / 1e6:.2f}M)")
    print(f"layout           {layout.describe()}")
    print(f"tokens/step      {plan.tokens_per_step:,} (global batch {cfg.train.global_batch_size} x "
          f"{cfg.train.seq_len}, {plan.accum_steps} micro-batches of {cfg.train.micro_batch_size} per rank)")
    print(f"steps            {plan.total_steps:,} = {plan.total_tokens:,} tokens ({plan.budget_source})")
    print(f"intervals        log {plan.log_every}, eval {plan.eval_every}, save {plan.save_every} steps")
    for line in describe_schedule(plan.total_steps, cfg.optim, plan.tokens_per_step, peak_lr=plan.peak_lr):
        print(line)
    summary: dict[str, Any] = {"dry_run": True, "n_params": plan.n_params, "total_steps": plan.total_steps,
                               "tokens_per_step": plan.tokens_per_step, "peak_lr": plan.peak_lr}
    try:
        from kiln.estimate import estimate_memory

        est = estimate_memory(cfg)
        summary["memory_bytes"] = est.total_bytes
        print(f"memory estimate  {est.total_bytes / 2**30:.2f} GiB per device ({est.summary()})")
    except ImportError:  # the estimator is optional here
        pass
    return summary


def train(cfg: Config, *, objective: Objective | None = None, fresh: bool = False, quiet: bool = False,
          dry: bool = False) -> dict[str, Any]:
    """Run (or resume) training as configured: pretraining by default, or another `objective`
    (SFT, DPO, ...) through the same loop. Returns a summary of the final state. Under torchrun
    every process calls this; the layout comes from `parallel.*`."""
    layout = init_layout(cfg, cfg.run.device)
    cleanup: list[Any] = []  # close() of what _train opened (data workers), also on errors
    try:
        plan = make_plan(cfg, dp_size=layout.dp_size)
        if dry:
            return dry_run(cfg, plan, layout) if layout.is_main else {"dry_run": True}
        return _train(cfg, layout, plan, objective or Objective(), fresh=fresh, quiet=quiet or not layout.is_main,
                      cleanup=cleanup)
    finally:
        for close in reversed(cleanup):
            close()
        shutdown(layout)


def _train(cfg: Config, layout: Layout, plan: Plan, objective: Objective, *, fresh: bool, quiet: bool,
           cleanup: list[Any]) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------
    device, main, out = layout.device, layout.is_main, Path(cfg.run.out_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_tokenizer(tokenizer, cfg, where="config")
    mirror = mirror_for(cfg.train.checkpoint_url)
    existing = [] if fresh else ckpt_io.list_checkpoints(out)
    if not existing and not fresh and mirror is not None and main:  # a fresh disk: resume from the mirror
        downloaded = mirror.download_latest(out / "checkpoints")
        existing = [downloaded] if downloaded is not None else []
    resume_from = _agree(ckpt_io.latest_intact(out, is_main=main) if existing else None, layout)  # verified
    if resume_from is not None:  # validate before touching anything
        check_resumable(ckpt_io.read_config(resume_from), cfg, resume_from)
    init_from = None
    if resume_from is None and cfg.run.init_from:
        init_from = ckpt_io.resolve_checkpoint(cfg.run.init_from)
        check_resumable(ckpt_io.read_config(init_from), cfg, init_from)
    if main:
        prepare_out_dir(out, fresh=fresh)
    if layout.distributed:
        dist.barrier()

    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    engine = Engine(cfg, layout, objective, seed=cfg.run.seed)
    if engine.micro_batches_per_step() != plan.accum_steps:  # the call also checks the pipeline's split
        raise AssertionError("engine and plan disagree on micro-batches per step")
    if init_from is not None:  # start from another run's weights (fine-tuning, continued pretraining)
        state = engine.state_dict(optimizer=False)
        ckpt_io.load_training(init_from, state=state)
        engine.load_state_dict(state, optimizer=False)
    if engine.pipe is None:
        objective.setup(engine.model, device=device)
    loader = objective.train_data(cfg, tokenizer, rank=layout.dp_rank, world_size=layout.dp_size) \
        if engine.reads_data else None
    if hasattr(loader, "close"):
        cleanup.append(loader.close)
    val_sets = objective.val_data(cfg, tokenizer)  # small; every pipeline stage joins the same eval steps
    autocast = autocast_for(cfg, device)
    divergence = DivergenceDetector(threshold=cfg.train.divergence_threshold)
    spikes = SpikeDetector(z_threshold=cfg.train.spike_z or 6.0)
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    best_evals: list[float] = []  # eval losses so far, for keep_best's "among the best K" decision
    if resume_from is not None:
        state = engine.state_dict()
        common, ranks = ckpt_io.load_training(resume_from, state=state)
        engine.load_state_dict(state)
        step, tokens_seen, elapsed_before = common["step"], common["tokens_seen"], common.get("elapsed", 0.0)
        divergence.load_state_dict(common["divergence"])
        spikes.load_state_dict(common["spikes"])
        best_evals = list(common.get("best_evals", []))
        _restore_rank_state(ranks, layout, loader, engine, seed=cfg.run.seed, step=step)

    info = run_info(device)
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (out / "run.json").write_text(json.dumps({**info, "layout": layout.describe()}, indent=2))
    metrics = MetricsLogger(out, cfg=cfg, purge_step=step) if main else None
    control = JobControl(out, name=cfg.run.name) if main else None
    if metrics is not None and control is not None:  # also on errors; both closes are idempotent
        cleanup.extend([metrics.close, lambda: control.close("failed")])

    def after_save(path: Path) -> None:  # rank 0, once a checkpoint is complete
        ckpt_io.rotate(out / "checkpoints", keep_last=cfg.train.keep_last, keep_best=cfg.train.keep_best)
        if mirror is not None:
            mirror.upload(path)
            mirror.retain({p.name for p in ckpt_io.list_checkpoints(out)})

    checkpointer = ckpt_io.Checkpointer(out / "checkpoints", rank=layout.rank, is_main=main,
                                        asynchronous=cfg.train.async_checkpoint, on_saved=after_save)
    cleanup.append(checkpointer.close)  # an error exit still completes a background write
    monitor = StepMonitor(cfg, layout, plan, elapsed_before=elapsed_before)
    progress = Progress(plan.total_steps, start=step, quiet=quiet)
    progress.print(f"kiln train {cfg.run.name}: {plan.n_params / 1e6:.2f}M parameters on {device} "
                   f"({layout.describe()}; torch {info['torch']}, git {info['git_sha']})")
    progress.print(f"  {plan.tokens_per_step:,} tokens/step (global batch {cfg.train.global_batch_size} x "
                   f"{cfg.train.seq_len}, {plan.accum_steps} micro-batches per rank), {plan.total_steps:,} steps = "
                   f"{plan.total_tokens:,} tokens from {plan.budget_source}")
    for line in describe_schedule(plan.total_steps, cfg.optim, plan.tokens_per_step, peak_lr=plan.peak_lr):
        progress.print("  " + line)
    progress.print(f"  run folder {out}" + (f"; resumed from {resume_from.name}" if resume_from else "")
                   + (f"; weights from {init_from}" if init_from else ""))

    def run_eval() -> float | None:
        if not val_sets:
            return None
        record: dict[str, Any] = {"kind": "eval", "step": step, "tokens_seen": tokens_seen}
        record.update(_evaluate(engine, objective, val_sets, cfg, autocast))
        if metrics is not None:
            metrics.log(record)
        parts = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in record.items() if k.startswith("eval_loss/"))
        progress.print(f"step {step:>6}  eval_loss {record['eval_loss']:.4f}"
                       + (f"  ppl {record['eval_ppl']:.1f}" if "eval_ppl" in record else "")
                       + (f"  ({parts})" if len(val_sets) > 1 else ""))
        return record["eval_loss"]

    def save(eval_loss: float | None = None, *, wait: bool = False) -> Path:
        nonlocal saved_at
        common = {"step": step, "tokens_seen": tokens_seen, "elapsed": monitor.elapsed(),
                  "divergence": divergence.state_dict(), "spikes": spikes.state_dict(),
                  "best_evals": best_evals, "world_size": layout.world_size}
        reader = loader is not None and layout.tp_rank == 0 and (engine.pipe is None or engine.pipe.has_first)
        rank_state = {"rank": layout.rank, "world_size": layout.world_size, "dp_rank": layout.dp_rank,
                      "dp_size": layout.dp_size, "rng": rng_state(), "loader": loader.state_dict() if reader else None,
                      "optim_extra": engine.optimizer.extra_state(), "layout": layout.describe()}
        meta = {"tokens_seen": tokens_seen, "layout": layout.describe()}
        if eval_loss is not None:
            meta["eval_loss"] = eval_loss
        path = checkpointer.save(step, state=engine.state_dict(), cfg=cfg, common=common, rank_state=rank_state,
                                 meta=meta, wait=wait)
        monitor.saved()
        saved_at = step
        return path

    # ---- loop --------------------------------------------------------------------------------
    engine.train()
    if step == 0:
        run_eval()  # the loss at initialisation anchors every curve
    saved_at = step if resume_from is not None else -1
    complete = step >= plan.total_steps and resume_from is not None  # nothing left to train
    if complete:
        progress.print(f"the run is already complete at step {step}; raise train.max_steps or train.total_tokens "
                       "to train further, or pass --fresh to start over")
    stopped: str | None = None  # why the run ended before its last step
    pending: dict[str, Any] | None = None  # the job-control request being carried out
    with StopOnSignal() as stop:
        while step < plan.total_steps:
            if 0 < cfg.train.stop_at_step <= step:
                stopped = "train.stop_at_step"
                break
            lr = plan.peak_lr * lr_factor(step, total_steps=plan.total_steps, cfg=cfg.optim,
                                          tokens_per_step=plan.tokens_per_step)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            request = control.poll() if control is not None else None
            command = request["command"] if request else None
            flags = [float(stop.requested), float(command == "save"), float(command == "stop"),
                     float(command == "abort"), float(main and monitor.time_to_save())]
            if request:
                pending = request  # acknowledged once carried out

            micro = [loader.next_batch().to(device) for _ in range(plan.accum_steps)] if loader is not None else []
            loss_sum, count, extras = engine.forward_backward(micro, autocast)
            max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            norm = float(engine.clip_grad_norm(max_norm))  # the pre-clip norm, global over shards and stages
            loss, extra_means, (sig_stop, want_save, want_stop, want_abort, time_save) = \
                engine.reduce(loss_sum, count, extras, flags)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                checkpointer.wait()  # a save still being written is of a good state: complete it
                last = ckpt_io.list_checkpoints(out)
                raise TrainingDiverged(
                    f"step {step + 1}: loss={loss} grad_norm={norm}; the update was not applied and nothing was "
                    f"saved (last good checkpoint: {last[-1] if last else 'none'}); lower optim.lr or raise "
                    "optim.warmup_steps, then resume")
            spike = False
            if cfg.train.spike_z > 0:
                spike, z_loss, z_grad = spikes.check(loss, norm)
                if spike:
                    progress.print(f"step {step + 1}: spike (loss {loss:.4f} z={z_loss:.1f}, grad norm {norm:.3g} "
                                   f"z={z_grad:.1f})" + ("; update skipped" if cfg.train.skip_spikes else ""))
            if not (spike and cfg.train.skip_spikes):
                engine.step()
            engine.optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += plan.tokens_per_step
            checkpointer.poll()  # rank 0: a finished background write becomes step_<N>

            if cfg.train.divergence_threshold > 0 and divergence.update(step, loss):
                checkpointer.wait()  # complete it first, so a suspect one is set aside with the others
                _diverged(out, divergence, step, main)
            record = monitor.step(step, loss=loss, lr=lr, grad_norm=norm, tokens_seen=tokens_seen, extras=extra_means,
                                  spike=spike)
            if step % plan.log_every == 0 or step == plan.total_steps:
                if metrics is not None:
                    metrics.log(record)
                progress.update(step, loss=record["loss"], lr=lr, tok_s=record["tokens_per_sec"])
                if control is not None:
                    control.status(step=step, total_steps=plan.total_steps, loss=record["loss"],
                                   tokens_per_sec=record["tokens_per_sec"], eta=format_duration(record["eta_sec"]))
            else:
                progress.update(step)
            eval_loss = None
            if step % plan.eval_every == 0 and step != plan.total_steps:
                eval_loss = run_eval()
            best = (eval_loss is not None and cfg.train.keep_best > 0
                    and len([b for b in best_evals if b <= eval_loss]) < cfg.train.keep_best)
            if eval_loss is not None:
                best_evals.append(eval_loss)
            if want_abort:
                stopped = "kiln control abort"
                break
            periodic = step % plan.save_every == 0 and step != plan.total_steps
            if periodic or best or want_save or time_save:
                saved = save(eval_loss, wait=bool(want_save))  # the acknowledgement names a complete checkpoint
                if want_save and control is not None:
                    control.ack(pending, step=step, checkpoint=str(saved))
            if want_stop or sig_stop:  # saved below
                stopped = "kiln control stop" if want_stop else "signal"
                break

    # ---- end ---------------------------------------------------------------------------------
    checkpointer.wait()
    final_eval = run_eval() if step > 0 and not stopped and not complete else None
    last = ckpt_io.list_checkpoints(out)
    path = last[-1] if last and saved_at == step else None
    if step > 0 and stopped != "kiln control abort" and saved_at != step:
        path = save(final_eval, wait=True)
    progress.close()
    summary = {"step": step, "tokens_seen": tokens_seen, "final_eval_loss": final_eval, "stopped": stopped,
               "checkpoint": str(path) if path else None, "elapsed": format_duration(monitor.elapsed())}
    if control is not None:
        if stopped in ("kiln control stop", "kiln control abort"):
            control.ack(pending, step=step, checkpoint=str(path) if path else None)
        control.close(stopped or "finished")
    if stopped:
        if metrics is not None:
            metrics.close()
        if main:
            what = f"saved {path}" if path else "nothing saved (the last checkpoint stays)"
            print(f"stopped by {stopped} at step {step}: {what}; run the same command again to resume")
        return summary
    if main and not quiet and cfg.train.sample_tokens > 0 and not layout.distributed:
        from kiln.generate import generate_text

        model = engine.model
        model.eval()
        text = generate_text(model, tokenizer, cfg.train.sample_prompt, max_new_tokens=cfg.train.sample_tokens,
                             temperature=0.8, top_k=50, top_p=1.0, seed=cfg.run.seed)
        summary["sample"] = text
        print(f"\nsample: {cfg.train.sample_prompt}{text}\n")
    if metrics is not None:
        metrics.close()
    if main:
        print(f"done: {step} steps, {tokens_seen:,} tokens in {summary['elapsed']}; checkpoint {path}")
    return summary


def _restore_rank_state(ranks: list[dict[str, Any]], layout: Layout, loader: Any, engine: Engine, *, seed: int,
                        step: int) -> None:
    """RNG and data position for this rank from the saved rank states (any earlier layout)."""
    mine = next((r for r in ranks if r.get("rank") == layout.rank and r.get("layout") == layout.describe()), None)
    if mine is not None and mine.get("rng") is not None:
        set_rng_state(mine["rng"])
        engine.optimizer.load_extra_state(mine.get("optim_extra") or [])
    else:  # another layout: a fresh, deterministic stream per rank
        torch.manual_seed(seed + 7919 * step + layout.rank)
    if loader is None:
        return
    saved = {r["dp_rank"]: r["loader"] for r in ranks if r.get("loader") is not None}
    if not saved:
        return  # a weights-only checkpoint
    old_dp = ranks[0].get("dp_size", 1) if ranks else 1
    if old_dp == layout.dp_size:
        loader.load_state_dict(saved[layout.dp_rank])
        return
    reshard = getattr(loader, "load_resharded_state", None)
    if reshard is None:
        raise DataError(f"the data position was saved with {old_dp} data-parallel ranks and this run has "
                        f"{layout.dp_size}; this data source resumes only on the same data-parallel size "
                        "(pre-tokenized shards, data.format=shards, reshard freely); resume with the same layout "
                        "or start fresh")
    reshard([saved[i] for i in sorted(saved)])


def _evaluate(engine: Engine, objective: Objective, val_sets: dict[str, list[Any]], cfg: Config,
              autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """The objective's eval record; for a pipeline, per-source loss through the schedule."""
    if engine.pipe is None:
        return objective.evaluate(engine.model, val_sets, cfg=cfg, device=engine.layout.device, autocast=autocast)
    record: dict[str, float] = {}
    nats_all, count_all = 0.0, 0.0
    for name in sorted(val_sets):
        nats, count = engine.reduce_eval(*engine.pipeline_eval(val_sets[name]))
        record[f"eval_loss/{name}"] = nats / max(count, 1)
        record[f"eval_ppl/{name}"] = math.exp(min(record[f"eval_loss/{name}"], 50.0))
        nats_all, count_all = nats_all + nats, count_all + count
    record["eval_loss"] = nats_all / max(count_all, 1)
    record["eval_ppl"] = math.exp(min(record["eval_loss"], 50.0))
    return record


def _diverged(out: Path, detector: DivergenceDetector, step: int, main: bool) -> None:
    """Set aside checkpoints written since the excursion began, then abort with the last good one named."""
    onset = detector.onset if detector.onset is not None else step
    # step_N holds the weights after update N, whose loss is first seen at step N + 1: the update that
    # produced the onset's loss is onset - 1, so that checkpoint and later ones are suspect
    suspect = [p for p in ckpt_io.list_checkpoints(out) if int(p.name.split("_")[1]) >= onset - 1]
    if main:
        for p in suspect:
            p.rename(p.with_name(p.name + ".suspect"))
    good = [p for p in ckpt_io.list_checkpoints(out) if p not in suspect]
    raise TrainingDiverged(
        f"step {step}: the loss diverged (fast EMA {detector.fast:.3f} > slow EMA {detector.slow:.3f} + "
        f"{detector.threshold:g}, rising since step {onset}); stopped without saving"
        + (f", set aside {len(suspect)} checkpoint(s) as *.suspect" if suspect else "")
        + f"; last good checkpoint: {good[-1] if good else 'none'}. Lower optim.lr (or raise optim.warmup_steps) "
        "and run again to resume from it")


def load_model_for_cli(path: str, *, device: str = "auto") -> tuple[Transformer, Config, Path]:
    """Model + config + checkpoint path for generate / eval / chat."""
    return ckpt_io.load_for_inference(path, device=pick_device(device))

