"""Pretraining on one device: setup, then one loop that reads top to bottom.

    for each optimizer step:
        lr <- schedule(step)
        for each micro-batch: forward -> loss (sum / tokens in the whole step) -> backward
        clip -> NaN guard -> optimizer step
        log / eval / checkpoint
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from kiln.config import Config, to_dict
from kiln.data.tokenizer import Tokenizer, load_tokenizer
from kiln.errors import CheckpointError, DataError, KilnError
from kiln.model import Transformer, build_model, count_params
from kiln.optim import build_optimizer, lr_factor
from kiln.train import checkpoint as ckpt_io
from kiln.train.metrics import MetricsLogger, format_duration, run_info
from kiln.train.objective import Objective
from kiln.train.progress import Progress, StopOnSignal


class TrainingDiverged(KilnError):
    """Loss or gradient norm became NaN/Inf; nothing was saved from the poisoned state."""


@dataclass
class Plan:
    """How long the run is, derived from the config and the model size."""

    n_params: int
    tokens_per_step: int
    accum_steps: int
    total_steps: int
    total_tokens: int
    budget_source: str


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise KilnError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_for(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default; fp32 on CPU unless train.dtype=bf16 is asked for."""
    dtype = cfg.train.dtype
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_plan(cfg: Config, *, world_size: int = 1) -> Plan:
    t = cfg.train
    n_params = count_params(cfg.model)
    per_pass = t.micro_batch_size * world_size
    if t.global_batch_size % per_pass:
        raise KilnError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                        f"train.micro_batch_size x data-parallel ranks ({per_pass})")
    accum = t.global_batch_size // per_pass
    tokens_per_step = t.global_batch_size * t.seq_len
    if t.max_steps > 0:
        steps, source = t.max_steps, "train.max_steps"
    elif t.total_tokens > 0:
        steps, source = math.ceil(t.total_tokens / tokens_per_step), "train.total_tokens"
    else:
        steps, source = math.ceil(20 * n_params / tokens_per_step), "Chinchilla default (20 x parameters)"
    return Plan(n_params, tokens_per_step, accum, steps, steps * tokens_per_step, source)


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
    """Architecture and tokenizer must match the checkpoint; schedule, budget and intervals may change."""
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


def train(cfg: Config, *, objective: Objective | None = None, fresh: bool = False,
          quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) training as configured: pretraining by default, or another `objective`
    (SFT, DPO, ...) through the same loop. Returns a summary of the final state."""
    # ---- setup -------------------------------------------------------------------------------
    objective = objective or Objective()
    device = pick_device(cfg.run.device)
    out = Path(cfg.run.out_dir)
    plan = make_plan(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_tokenizer(tokenizer, cfg, where="config")
    existing = [] if fresh else ckpt_io.list_checkpoints(out)
    resume_from = existing[-1] if existing else None
    if resume_from is not None:  # validate before touching anything
        check_resumable(ckpt_io.read_config(resume_from), cfg, resume_from)
    init_from = None
    if resume_from is None and cfg.run.init_from:
        init_from = ckpt_io.resolve_checkpoint(cfg.run.init_from)
        check_resumable(ckpt_io.read_config(init_from), cfg, init_from)
    prepare_out_dir(out, fresh=fresh)

    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, device=device, seed=cfg.run.seed)
    if init_from is not None:  # start from another run's weights (fine-tuning, continued pretraining)
        ckpt_io.load_model_weights(model, init_from)
    objective.setup(model, device=device)
    optimizer = build_optimizer(model, cfg.optim, device_type=device.type)
    loader = objective.train_data(cfg, tokenizer)
    val_sets = objective.val_data(cfg, tokenizer)
    autocast = autocast_for(cfg, device)
    step, tokens_seen, elapsed_before = 0, 0, 0.0

    if resume_from is not None:
        ckpt_io.load_model_weights(model, resume_from)
        state = ckpt_io.load_train_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state.get("elapsed", 0.0)

    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    info = run_info(device)
    (out / "run.json").write_text(json.dumps(info, indent=2))
    metrics = MetricsLogger(out)
    progress = Progress(plan.total_steps, start=step, quiet=quiet)
    progress.print(f"kiln train {cfg.run.name}: {plan.n_params / 1e6:.2f}M parameters on {device} "
                   f"(torch {info['torch']}, git {info['git_sha']})")
    progress.print(f"  {plan.tokens_per_step:,} tokens/step (global batch {cfg.train.global_batch_size} x "
                   f"{cfg.train.seq_len}, accumulation {plan.accum_steps}), {plan.total_steps:,} steps = "
                   f"{plan.total_tokens:,} tokens from {plan.budget_source}; peak lr {cfg.optim.lr:g} "
                   f"{cfg.optim.schedule}, warmup {cfg.optim.warmup_steps}")
    progress.print(f"  run folder {out}" + (f"; resumed from {resume_from.name}" if resume_from else "")
                   + (f"; weights from {init_from}" if init_from else ""))

    def run_eval() -> float | None:
        if not val_sets:
            return None
        record: dict[str, Any] = {"kind": "eval", "step": step, "tokens_seen": tokens_seen}
        record.update(objective.evaluate(model, val_sets, cfg=cfg, device=device, autocast=autocast))
        metrics.log(record)
        parts = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in record.items() if k.startswith("eval_loss/"))
        progress.print(f"step {step:>6}  eval_loss {record['eval_loss']:.4f}"
                       + (f"  ppl {record['eval_ppl']:.1f}" if "eval_ppl" in record else "")
                       + (f"  ({parts})" if len(val_sets) > 1 else ""))
        return record["eval_loss"]

    def save() -> Path:
        train_state = {"optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "rng": rng_state(),
                       "step": step, "tokens_seen": tokens_seen, "elapsed": elapsed_before + (time.time() - t_start)}
        path = ckpt_io.save_checkpoint(out / "checkpoints", step, model=model, cfg=cfg, train_state=train_state,
                                       meta={"tokens_seen": tokens_seen})
        ckpt_io.rotate(out / "checkpoints", cfg.train.keep_last)
        return path

    # ---- loop --------------------------------------------------------------------------------
    model.train()
    t_start = time.time()
    if step == 0:
        run_eval()  # the loss at initialisation anchors every curve
    window_loss, window_steps, window_tokens, t_window = 0.0, 0, 0, time.time()
    stopped: str | None = None  # why the run ended before its last step
    with StopOnSignal() as stop:
        while step < plan.total_steps:
            if stop.requested:  # SIGINT / SIGTERM: finish at a step boundary, save, exit
                stopped = "signal"
                break
            if 0 < cfg.train.stop_at_step <= step:
                stopped = "train.stop_at_step"
                break
            lr = cfg.optim.lr * lr_factor(step, total_steps=plan.total_steps, cfg=cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr

            micro_batches = [loader.next_batch().to(device) for _ in range(plan.accum_steps)]
            # normalise by the step's true count (target tokens for pretraining), not per micro-batch
            count = max(sum(objective.count(b) for b in micro_batches), 1)
            step_loss = torch.zeros((), device=device)
            extra_sums: dict[str, Tensor] = {}
            for batch in micro_batches:
                with autocast:
                    loss_sum, extras = objective.loss(model, batch, cfg=cfg)
                    loss = loss_sum / count
                loss.backward()
                step_loss += loss.detach()
                for k, v in extras.items():
                    extra_sums[k] = extra_sums.get(k, 0.0) + v.detach().float()

            max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # pre-clip norm
            loss_value, norm_value = step_loss.item(), grad_norm.item()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                last = ckpt_io.list_checkpoints(out)
                raise TrainingDiverged(
                    f"step {step + 1}: loss={loss_value} grad_norm={norm_value}; the update was not applied and "
                    f"nothing was saved (last good checkpoint: {last[-1] if last else 'none'}); "
                    "lower optim.lr or raise optim.warmup_steps, then resume")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += plan.tokens_per_step

            window_loss += loss_value
            window_steps += 1
            window_tokens += plan.tokens_per_step
            if step % cfg.train.log_every == 0 or step == plan.total_steps:
                dt = time.time() - t_window
                record = {"kind": "train", "step": step, "tokens_seen": tokens_seen, "loss": window_loss / window_steps,
                          "lr": lr, "grad_norm": norm_value, "tokens_per_sec": window_tokens / max(dt, 1e-9),
                          "elapsed_sec": elapsed_before + time.time() - t_start}
                record.update({k: float(v) / count for k, v in extra_sums.items()})  # this step's means
                if device.type == "cuda":
                    record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
                metrics.log(record)
                progress.update(step, loss=record["loss"], lr=lr, tok_s=record["tokens_per_sec"])
                window_loss, window_steps, window_tokens, t_window = 0.0, 0, 0, time.time()
            else:
                progress.update(step)
            if step % cfg.train.eval_every == 0 and step != plan.total_steps:
                run_eval()
            if step % cfg.train.save_every == 0 and step != plan.total_steps:
                save()

    # ---- end ---------------------------------------------------------------------------------
    final_eval = run_eval() if step > 0 and not stopped else None
    path = save() if step > 0 else None
    progress.close()
    total_time = elapsed_before + time.time() - t_start
    summary = {"step": step, "tokens_seen": tokens_seen, "final_eval_loss": final_eval, "stopped": stopped,
               "checkpoint": str(path) if path else None, "elapsed": format_duration(total_time)}
    if stopped:
        metrics.close()
        print(f"stopped by {stopped} at step {step}: saved {path}; run the same command again to resume")
        return summary
    if not quiet and cfg.train.sample_tokens > 0:
        from kiln.generate import generate_text

        model.eval()
        text = generate_text(model, tokenizer, cfg.train.sample_prompt, max_new_tokens=cfg.train.sample_tokens,
                             temperature=0.8, top_k=50, top_p=1.0, seed=cfg.run.seed)
        summary["sample"] = text
        print(f"\nsample: {cfg.train.sample_prompt}{text}\n")
    metrics.close()
    print(f"done: {step} steps, {tokens_seen:,} tokens in {summary['elapsed']}; checkpoint {path}")
    return summary


def load_model_for_cli(path: str, *, device: str = "auto") -> tuple[Transformer, Config, Path]:
    """Model + config + checkpoint path for generate / eval / chat."""
    return ckpt_io.load_for_inference(path, device=pick_device(device))


def clear_run(out: Path) -> None:
    """Remove a run folder (tests and `make clean`)."""
    shutil.rmtree(out, ignore_errors=True)
