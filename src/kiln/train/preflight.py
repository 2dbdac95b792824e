"""Before a run starts: the run folder, whether a checkpoint can be resumed with this config, whether the
tokenizer fits the model, and `kiln train --dry-run`'s plan."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln.bench import run_bench
from kiln.config import Config, parse_duration, to_dict
from kiln.data.factory import check_prepared_sources, train_sources, uses_shards
from kiln.data.sources import is_prepared, resolve_files
from kiln.data.stages import describe as describe_stages
from kiln.data.stages import stage_starts
from kiln.data.tokenizer import Tokenizer, load_tokenizer, portable_spec, tokenizer_digest
from kiln.errors import CheckpointError, DataError, KilnError
from kiln.estimate import estimate_memory
from kiln.eval.suite import load_tasks
from kiln.model.attention import check_training_backend
from kiln.model.loss import check_loss_impl
from kiln.optim import describe_schedule
from kiln.parallel.mesh import Layout
from kiln.train.budget import BudgetTooShort, Costs, fit_steps
from kiln.train.checkpoint import (
    check_tokenizer_digest,
    checkpoint_step,
    list_checkpoints,
    read_config,
    resolve_checkpoint,
    weights_only,
)
from kiln.train.mirror import mirror_for
from kiln.train.plan import Plan


def pin_paths(cfg: Config) -> None:
    """The files a checkpoint's config names and later commands load (the tokenizer, a chat template) as
    absolute paths: `kiln generate`, `kiln export` or a resume in another folder read the saved config."""
    cfg.data.tokenizer = portable_spec(cfg.data.tokenizer)
    template = cfg.posttrain.chat_template
    if template not in ("auto", "kiln") and Path(template).expanduser().is_file():  # else a name, or refused later
        cfg.posttrain.chat_template = str(Path(template).expanduser().resolve())


def check_tokenizer(tok: Tokenizer, cfg: Config, where: str, *, main: bool = True) -> None:
    """The tokenizer's ids must fit model.vocab_size; a model far larger than them is said in one line (by the
    `main` process)."""
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"{where}: tokenizer '{cfg.data.tokenizer}' has {tok.vocab_size} ids but model.vocab_size is "
                        f"{cfg.model.vocab_size}; set --model.vocab_size {tok.vocab_size} or use a matching tokenizer")
    note = unused_vocab_note(tok, cfg)
    if note and main:
        print(note, file=sys.stderr)


def unused_vocab_note(tok: Tokenizer, cfg: Config) -> str | None:
    """A warning when model.vocab_size exceeds the tokenizer's ids by more than rounding them up to a multiple
    of 128 (padding for GPU shapes or tensor parallelism): those embedding and head rows are never an input or
    a target, yet the head computes their logits every step."""
    v, m = tok.vocab_size, cfg.model.vocab_size
    if m <= math.ceil(v / 128) * 128:
        return None
    rows = (m - v) * cfg.model.d_model * (1 if cfg.model.tie_embeddings else 2)
    return (f"warning: model.vocab_size is {m} but tokenizer '{cfg.data.tokenizer}' has {v} ids, so {m - v} "
            f"embedding/head rows ({rows:,} parameters) are never used; set --model.vocab_size {v}")


# what a run folder holds from its start (kiln.train.trainer): one of them marks a folder as a kiln run's
RUN_MARKERS = ("config.yaml", "run.json", "metrics.jsonl", "checkpoints")


def check_run_folder(out: Path) -> None:
    """A run.out_dir that holds other files and no kiln run (a home, data or project folder) is refused: a run
    would write into it, and --fresh would move the whole folder aside. Hidden files alone do not count."""
    if not out.is_dir() or any((out / m).exists() for m in RUN_MARKERS):
        return
    other = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise KilnError(f"run.out_dir {out}: holds files that are not a kiln run ({shown}); pass a new or empty "
                        "folder as --run.out_dir")


def prepare_out_dir(out: Path, *, fresh: bool) -> None:
    """Create the run folder; with --fresh, move an existing one aside (never delete checkpoints)."""
    if fresh and out.exists() and any(out.iterdir()):
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            out.rename(aside)
        except OSError as e:  # a name at the filesystem's length limit, a read-only folder
            raise KilnError(f"--fresh: cannot move {out} aside to {aside.name} ({e.strerror or e}); move or rename "
                            "it yourself, or pass another --run.out_dir") from None
        print(f"--fresh: moved the previous run to {aside} (`kiln train {aside}/config.yaml` resumes it there)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise KilnError(f"run.out_dir {out}: not writable ({e.strerror}); pass --run.out_dir DIR") from None
    if (ckpts := out / "checkpoints").exists() and not ckpts.is_dir():  # found at the first save, after training
        raise KilnError(f"run.out_dir {out}: its checkpoints is a file, not a folder; move it away or pass another "
                        "--run.out_dir")


# model keys that only say how fresh weights are drawn: a run that loads its weights may differ in them
INIT_KEYS = ("init", "init_std", "init_zero_out")


def check_resume_point(ckpt: Path, cfg: Config, *, tokenizer: Tokenizer) -> None:
    """The checkpoint a run resumes (the run and its dry run alike): one with an optimizer and data state
    (not kiln average's or kiln import's weights alone) that takes this config (check_resumable)."""
    if weights_only(ckpt):
        raise CheckpointError(
            f"{ckpt}: a weights-only checkpoint (kiln average / kiln import), with no optimizer or data state to "
            f"resume; start a new run from it: --run.init_from {ckpt} --run.out_dir NEW_DIR")
    check_resumable(read_config(ckpt), cfg, ckpt, tokenizer=tokenizer)


def check_resumable(saved: Config, cfg: Config, ckpt: Path, *, tokenizer: Tokenizer, init_from: bool = False) -> None:
    """Architecture and tokenizer (`tokenizer`: cfg.data.tokenizer's, loaded) must match the checkpoint (resumed,
    or `init_from`: its weights start this run); schedule, budget, layout, intervals and how fresh weights would
    be drawn may change."""
    a, b = to_dict(saved.model), to_dict(cfg.model)
    for key in ("attention", *INIT_KEYS):  # the backend and the init do not change loaded weights
        a.pop(key), b.pop(key)
    fix = ("run.init_from takes weights of the same architecture: set the model keys to the checkpoint's "
           f"(or start from {ckpt}/config.yaml)" if init_from else
           "resume with the same architecture, or pass --fresh to start over (the old run is moved aside)")
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        k = diff[0]
        raise CheckpointError(f"{ckpt}: saved with model.{k}={a[k]} but the config says {b[k]}; {fix}")
    if not init_from and saved.optim.name != cfg.optim.name:  # its state would not load (once: "corrupt or unreadable")
        raise CheckpointError(f"{ckpt}: saved with optim.name={saved.optim.name} but the config says {cfg.optim.name}; "
                              f"resume with --optim.name {saved.optim.name}, start a new run from its weights with "
                              f"--run.init_from {ckpt} and another --run.out_dir, or pass --fresh")
    if not _same_tokenizer(saved.data.tokenizer, cfg.data.tokenizer, tokenizer):
        raise CheckpointError(f"{ckpt}: trained with tokenizer '{saved.data.tokenizer}', config says "
                              f"'{cfg.data.tokenizer}'; " + ("use the same tokenizer" if init_from else
                                                             "use the same tokenizer or --fresh"))
    check_tokenizer_digest(ckpt, cfg, tokenizer)  # the same name, but retrained or edited in place since


# keys a resume may change that move the LR schedule or the tokens per step from the resumed step on
SCHEDULE_KEYS = (("train", "max_steps"), ("train", "total_tokens"), ("train", "global_batch_size"),
                 ("train", "seq_len"), *(("optim", k) for k in (
                     "lr", "lr_scaling", "schedule", "warmup_steps", "decay_fraction", "decay_shape", "min_lr_ratio",
                     "constant_lr_ratio", "cooldown_ratio", "min_cooldown_tokens", "anneal_steps")))


def changed_schedule_note(saved: Config, cfg: Config, ckpt: Path) -> str | None:
    """One line when a resume changes what its LR schedule or token count follow (allowed: raising
    train.max_steps trains further; but the LR at the resumed step moves with it, which should not pass
    unsaid). A time budget's plan is saved in the checkpoint and does not move."""
    if cfg.train.time_budget:
        return None
    changed = [f"{sec}.{key} {getattr(getattr(saved, sec), key)} -> {getattr(getattr(cfg, sec), key)}"
               for sec, key in SCHEDULE_KEYS if getattr(getattr(saved, sec), key) != getattr(getattr(cfg, sec), key)]
    if not changed:
        return None
    return (f"note: resuming {ckpt.name} with {', '.join(changed)}: the LR schedule and the tokens per step follow "
            "the new values from here (the steps taken keep theirs)")


def changed_optimizer_note(saved: Config, cfg: Config, ckpt: Path) -> str | None:
    """One line when a resume changes the optimizer's settings (betas, eps, weight_decay, Muon's momentum, ...):
    the optimizer takes them from this step, its state (moments, step counts) from the checkpoint."""
    a, b = to_dict(saved.optim), to_dict(cfg.optim)
    skip = {"name", *(key for sec, key in SCHEDULE_KEYS if sec == "optim")}  # another optimizer is refused
    changed = [f"optim.{k} {a[k]} -> {b[k]}" for k in a if k not in skip and a[k] != b.get(k)]
    if not changed:
        return None
    return (f"note: resuming {ckpt.name} with {', '.join(changed)}: the optimizer follows the new values from here "
            "(its moments and step counts are the checkpoint's)")


# post-training keys a resume checks against the saved data itself (a run on other data is refused)
POSTTRAIN_DATA_KEYS = ("data", "val_data", "split", "val_split")


def changed_stage_note(saved: Config, cfg: Config, ckpt: Path) -> str | None:
    """One line when a resumed sft/dpo/rlvr run changes what its objective follows (posttrain.beta, .loss,
    .group_size, ...): allowed, as a deliberate change of beta is, but not unsaid."""
    a, b = to_dict(saved.posttrain), to_dict(cfg.posttrain)
    changed = [f"posttrain.{k} {a[k]} -> {b[k]}" for k in a if k not in POSTTRAIN_DATA_KEYS and a[k] != b.get(k)]
    if not changed:
        return None
    return (f"note: resuming {ckpt.name} with {', '.join(changed)}: the stage follows the new values from here (the "
            "steps taken keep theirs)")


def dropped_val_note(saved: Config, cfg: Config, ckpt: Path) -> str | None:
    """One line when a resumed sft/dpo/rlvr run has no posttrain.val_data where its run had one (the command
    without --val-data): its evals stop, which would pass unsaid."""
    was = saved.posttrain.val_data
    if not was or cfg.posttrain.val_data:
        return None
    return (f"note: resuming {ckpt.name} without posttrain.val_data, which the run evaluated on ({was}): no evals "
            f"from here; pass --val-data {was} to keep them")


def val_note(cfg: Config) -> str | None:
    """One line when pretraining on data of the user's own is still evaluated on the preset's bundled:val."""
    d = cfg.data
    if cfg.posttrain.data or [s.path for s in d.val] != ["bundled:val"]:
        return None
    if any(s.path.startswith("bundled:") for s in (*train_sources(d), *(s for st in d.stages for s in st.train))):
        return None
    return ("note: data.val is still the preset's bundled:val (Shakespeare and Austen) while this run trains on "
            "other data, so its eval loss is on that text; pass --data.val FILE for held-out text of your own")


def resume_notes(saved: Config, cfg: Config, ckpt: Path) -> list[str]:
    """What a resume changes that the user should hear: the schedule's keys, the optimizer's settings, a stage's
    objective keys, a stage's validation data left out."""
    notes = (changed_schedule_note(saved, cfg, ckpt), changed_optimizer_note(saved, cfg, ckpt),
             changed_stage_note(saved, cfg, ckpt), dropped_val_note(saved, cfg, ckpt))
    return [n for n in notes if n]


def reshard_error(saved_dp: int, dp: int) -> DataError:
    """A text data position saved on `saved_dp` data-parallel ranks, resumed on `dp`: what the run says."""
    ranks = f"rank{'s' if saved_dp != 1 else ''}"
    return DataError(f"the data position was saved with {saved_dp} data-parallel {ranks} and this run has {dp}; this "
                     "data source resumes only on the same data-parallel size (pre-tokenized shards, "
                     "data.format=shards, reshard freely); resume with the same layout or pass --fresh")


def check_data_layout(ckpt: Path, cfg: Config, layout: Layout) -> None:
    """--dry-run: a text data position saved on another data-parallel size is refused by the run (its loader
    cannot reshard it); read from the checkpoint's rank-0 state. A damaged state is the run's to set aside."""
    f = ckpt / "state" / "rank_0.pt"
    if uses_shards(cfg.data) or not f.is_file():
        return
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 (torch raises several types for a damaged pickle)
        return
    if isinstance(state, dict) and state.get("loader") is not None and state.get("dp_size", 1) != layout.dp_size:
        raise reshard_error(state.get("dp_size", 1), layout.dp_size)


def _same_tokenizer(a: str, b: str, tokenizer_b: Tokenizer) -> bool:
    """The same spec, or two that give the same ids (an exported or imported copy of mistral-v3, a moved
    folder): kiln.data.tokenizer.tokenizer_digest. One that no longer loads is not the same."""
    if a == b:
        return True
    try:
        return tokenizer_digest(load_tokenizer(a)) == tokenizer_digest(tokenizer_b)
    except KilnError:
        return False


def run_folder_plan(cfg: Config, *, fresh: bool = False, out: Path | None = None) -> str:
    """What `kiln train` would do with run.out_dir, without touching it: start, move an old run aside (--fresh),
    or resume its newest checkpoint, which must take this config (else check_resumable's CheckpointError). The
    newest is not verified here: at start a damaged one is set aside and the one before it resumed."""
    out = Path(out or cfg.run.out_dir)
    check_run_folder(out)
    ckpts = list_checkpoints(out)
    if not ckpts:
        return f"{out} (new)" if not (out.exists() and any(out.iterdir())) else f"{out} (no checkpoints yet)"
    if fresh:
        return f"{out} (--fresh: its {len(ckpts)} checkpoint(s) would be moved aside, not deleted)"
    check_resume_point(ckpts[-1], cfg, tokenizer=load_tokenizer(cfg.data.tokenizer))
    return f"{out} (resumes from {ckpts[-1].name})"


def check_startup(cfg: Config, tokenizer: Tokenizer, device: torch.device, *, resuming: bool) -> None:
    """What the run's setup refuses from the config alone, said before it (by --dry-run and kiln doctor): an
    attention backend or loss kernel this machine cannot train with, a checkpoint_url whose backend is missing,
    a run.init_from that is not there or does not fit (unless the run resumes), eval tasks that do not load."""
    check_training_backend(cfg.model.attention, device.type)
    check_loss_impl(cfg.train.loss_impl, device)
    mirror_for(cfg.train.checkpoint_url)
    if cfg.run.init_from and not resuming:
        try:
            init_from = resolve_checkpoint(cfg.run.init_from)
        except KilnError as e:
            raise type(e)(f"run.init_from: {e}") from None
        check_resumable(read_config(init_from), cfg, init_from, tokenizer=tokenizer, init_from=True)
    load_tasks(cfg.train.eval_tasks, limit=cfg.train.eval_tasks_limit, seed=cfg.run.seed)


def dry_run(cfg: Config, plan: Plan, layout: Layout, *, fresh: bool = False) -> dict[str, Any]:
    """Print what the run would do (config, run folder, size, budget, LR curve, memory estimate) and return it.
    A run folder whose checkpoint this config cannot resume is the run's own error, said now; so is a tokenizer
    with more ids than model.vocab_size (and the warning for far fewer is printed, as the run prints it)."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_tokenizer(tokenizer, cfg, where="config", main=layout.is_main)
    check_prepared_sources(cfg.data, tokenizer)  # prepared with this tokenizer, as the run will check
    ckpts = [] if fresh else list_checkpoints(Path(cfg.run.out_dir))
    check_startup(cfg, tokenizer, layout.device, resuming=bool(ckpts))
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    print(f"\nrun folder       {run_folder_plan(cfg, fresh=fresh)}")
    if ckpts:
        check_data_layout(ckpts[-1], cfg, layout)  # the run's own refusal, said now
    done = ckpts and not plan.provisional and checkpoint_step(ckpts[-1]) >= plan.total_steps
    if done:
        print(f"                 nothing to train: it is complete at {ckpts[-1].name}; raise train.max_steps / "
              "train.total_tokens to train further")
    for note in [*(resume_notes(read_config(ckpts[-1]), cfg, ckpts[-1]) if ckpts and not done else ()),
                 *filter(None, [val_note(cfg)])]:
        print(f"                 {note}")
    print(f"parameters       {plan.n_params:,} ({plan.n_params / 1e6:.2f}M)")
    print(f"layout           {layout.describe()}")
    micro = f"micro-batch{'es' if plan.accum_steps != 1 else ''}"
    print(f"tokens/step      {plan.tokens_per_step:,} (global batch {cfg.train.global_batch_size} x "
          f"{cfg.train.seq_len}, {plan.accum_steps} {micro} of {cfg.train.micro_batch_size} per rank)")
    steps: int | None = plan.total_steps
    if plan.provisional and layout.distributed:  # it would have printed its placeholder: ~1,000,000,000 steps
        steps = None
        print(f"steps            fixed by the run after timing its warmup ({plan.budget_source}); a dry run under "
              "torchrun times no steps: run it in one process for an estimate")
    elif plan.provisional:  # a time budget: estimate the steps from a short benchmark of real steps here
        steps, step_s, eval_s = _budget_estimate(cfg, plan)
        if steps <= cfg.optim.warmup_steps:  # the run would refuse it after its timed warmup
            raise BudgetTooShort(f"train.time_budget {cfg.train.time_budget} is too short: about {steps} steps fit "
                                 f"(a step takes {step_s:.2f} s here, and an eval about {eval_s:.1f} s: the first, "
                                 f"one every {plan.eval_every} steps and the final one), and the run needs more than its warmup "
                                 f"(optim.warmup_steps {cfg.optim.warmup_steps}) and a final eval; raise the budget "
                                 "or lower optim.warmup_steps / train.eval_tokens")
        slows = ("; a zero-init untied head's steps slow down as the ids the data reaches get rows of their own "
                 "(demo: 180 -> 290 ms over 300 s), so expect fewer" if cfg.model.init_zero_out and
                 not cfg.model.tie_embeddings else "")
        print(f"steps            ~{steps:,} = {steps * plan.tokens_per_step:,} tokens ({plan.budget_source}; this "
              f"estimate times 3 steps on synthetic batches here, the run times its own warmup and fixes the count"
              f"{slows})")
    else:
        print(f"steps            {plan.total_steps:,} = {plan.total_tokens:,} tokens ({plan.budget_source})")
    print(f"intervals        log {plan.log_every}, eval {plan.eval_every}, save {plan.save_every} steps")
    if steps:  # the schedule and the stages' steps, where the step count is known
        starts = stage_starts(cfg.data.stages, total_steps=steps, tokens_per_step=plan.tokens_per_step)  # estimated
        for line in [*describe_schedule(steps, cfg.optim, plan.tokens_per_step, peak_lr=plan.peak_lr),
                     *describe_stages(cfg.data.stages, starts, tokens_per_step=plan.tokens_per_step)]:
            print(line)
    summary: dict[str, Any] = {"dry_run": True, "n_params": plan.n_params, "total_steps": steps,
                               "tokens_per_step": plan.tokens_per_step, "peak_lr": plan.peak_lr}
    est = estimate_memory(cfg)
    summary["memory_bytes"] = est.total_bytes
    print(f"memory estimate  {est.total_bytes / 2**30:.2f} GiB per device ({est.summary()})")
    return summary


def check_sources(cfg: Config) -> None:
    """Every local file or folder pretraining's data sources name (train, val, stages) resolves, as the loader
    will resolve it: a missing path, an empty glob, an unsupported file type or files of 0 bytes is one line
    naming the key, before anything is set up or written (and by --dry-run). Nothing is read; a name that is not
    local (an HF hub dataset) is not looked up. With data.format=shards the training sources must be finished prepared
    folders (their manifests are read; the shards are the loader's to open)."""
    d = cfg.data
    check_prepared_sources(d)
    keyed = [*((f"data.train[{i}]", s) for i, s in enumerate(d.train) if not uses_shards(d)),
             *((f"data.val[{i}]", s) for i, s in enumerate(d.val)),
             *((f"data.stages[{j}].train[{i}]", s) for j, st in enumerate(d.stages) for i, s in enumerate(st.train)
               if not uses_shards(d))]
    for key, src in keyed:
        if is_prepared(src.path):
            continue
        try:
            files = resolve_files(src)
        except DataError as e:
            raise DataError(f"{key}: {e}") from None
        if files and all(f.stat().st_size == 0 for f in files):  # the loader's "0 documents", said before the run
            raise DataError(f"{key}: {src.path}: empty source ({'every file is' if len(files) > 1 else 'the file is'} "
                            "0 bytes)")


def _budget_estimate(cfg: Config, plan: Plan) -> tuple[int, float, float]:
    """The steps a time budget would fit, a step's seconds and an eval's, from `kiln bench`'s timing of 3 steps (one
    process: under torchrun the run's own measurement decides). An eval's forward costs about a third of a
    training step per token; checkpoints are not estimated."""
    bench = run_bench(cfg, steps=3, warmup=1)
    step = bench["step_ms"] / 1e3
    eval_s = len(cfg.data.val) * cfg.train.eval_tokens / (3 * bench["tokens_per_sec"])
    return fit_steps(parse_duration(cfg.train.time_budget), elapsed=eval_s, done=0,
                     costs=Costs(step=step, eval=eval_s, save=0.0), eval_every=plan.eval_every,
                     save_every=plan.save_every, save_every_minutes=cfg.train.save_every_minutes), step, eval_s
