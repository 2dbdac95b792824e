"""`kiln average`: one checkpoint from several of a run, by a uniform or an exponential moving average.

Averaging the checkpoints of a constant-LR stretch (the stable phase of a WSD run) approximates the
model a learning-rate decay would reach, without the decay run (Sanyal et al. 2023, "Early weight
averaging meets high learning rates"; Megatron / NVIDIA Nemotron report it for WSD runs):

    uniform   w = mean_i w_i
    ema       w = sum_i d^(K-i) w_i / sum_i d^(K-i)    over the K checkpoints in step order

The EMA is bias-corrected (as Adam's moments are): the newest checkpoint weighs most, and the oldest does
not stand in for the whole history before it (with K=3 and d=0.9: 0.37, 0.33, 0.30; a moving average
started at the oldest would give it 0.81).

With `--weights ema` each checkpoint contributes the moving average its run kept (train.ema_decay)
instead of its weights; one checkpoint is then enough: `kiln average CKPT --weights ema --out DIR` makes
the run's average a checkpoint of its own.

The checkpoints may be written by any layout (the weights are read under whole-model names). They
must share the architecture and the tokenizer; the result is a weights-only checkpoint in a run folder
(OUT/checkpoints/step_<last step>) that generate, eval, export, sft, dpo, rlvr and --run.init_from take.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from kiln.cliargs import user_path
from kiln.config import to_dict
from kiln.errors import CheckpointError, ConfigError
from kiln.model import build_model
from kiln.paths import first_missing
from kiln.train import checkpoint as ckpt_io


def expand(paths: list[str], *, last: int = 0, notes: list[str] | None = None) -> list[Path]:
    """Checkpoint folders from checkpoint or run folders: a run folder means its last `last` checkpoints
    (its latest when `last` is 0; all of them, with a line in `notes`, when it has fewer). Sorted by step,
    duplicates removed."""
    out: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()  # a quoted '~/run': no shell expanded the ~
        if last > 0 and not (path / "meta.json").exists():
            found = ckpt_io.list_checkpoints(path)
            if not found:
                raise CheckpointError(f"{path}: no complete checkpoint found (expected {path}/checkpoints/step_<N>)")
            if len(found) < last and notes is not None:  # a younger run than planned: not an error, not silent
                n = len(found)
                notes.append(f"note: --last {last}: the run {path} has {n} checkpoint{'s' if n > 1 else ''}; "
                             f"averaging {f'all {n}' if n > 1 else 'it'}")
            out += found[-last:]
        else:
            out.append(ckpt_io.resolve_checkpoint(path))
    unique = {c.resolve(): c for c in out}
    # oldest first (an EMA weighs the newest most): by step, from meta.json where a copy has another name
    return sorted(unique.values(), key=lambda c: int(ckpt_io.read_meta(c).get("step", 0)))


def check_compatible(ckpts: list[Path]) -> None:
    """Same architecture (the attention backend aside) and tokenizer, or one line naming the first difference."""
    first = ckpt_io.read_config(ckpts[0])
    a = to_dict(first.model)
    a.pop("attention")
    for c in ckpts[1:]:
        cfg = ckpt_io.read_config(c)
        b = to_dict(cfg.model)
        b.pop("attention")
        diff = [k for k in a if a[k] != b[k]]
        if diff:
            k = diff[0]
            raise CheckpointError(f"cannot average {ckpts[0]} and {c}: model.{k} is {a[k]} in one and {b[k]} in the "
                                  "other; average checkpoints of one architecture (one run)")
        if cfg.data.tokenizer != first.data.tokenizer:
            raise CheckpointError(f"cannot average {ckpts[0]} and {c}: tokenizers '{first.data.tokenizer}' and "
                                  f"'{cfg.data.tokenizer}' differ")


def average_weights(ckpts: list[Path], *, ema: float = 0.0, weights: str = "model") -> dict[str, torch.Tensor]:
    """The uniform mean (ema 0) or the EMA with decay `ema` of the checkpoints' fp32 weights ("model") or of
    their runs' moving averages ("ema"), in step order; one checkpoint's weights in memory besides the result."""
    avg: dict[str, torch.Tensor] = {}
    total = 0.0  # the weights so far: each new checkpoint gets 1 against the earlier ones' decayed sum
    for c in ckpts:
        w = ckpt_io.read_model_state(c, weights=weights)
        total = total * ema + 1.0 if ema > 0 else total + 1.0
        if not avg:
            avg = {k: v.clone() for k, v in w.items()}
            continue
        for k, v in w.items():  # a running weighted mean: avg += (v - avg) / total
            avg[k].add_(v.sub(avg[k]), alpha=1.0 / total)
    return avg


def average(paths: list[str], out: str | Path, *, ema: float = 0.0, last: int = 0, weights: str = "model") -> Path:
    """Average checkpoints (see the module docstring) into the run folder `out`; the new checkpoint's path."""
    if not 0 <= ema < 1:
        raise ConfigError(f"--ema: the decay must be within [0, 1), got {ema}")
    if weights not in ("model", "ema"):
        raise ConfigError(f"--weights: expected model or ema, got {weights!r}")
    notes: list[str] = []
    ckpts = expand(paths, last=last, notes=notes)
    if len(ckpts) < (1 if weights == "ema" else 2):
        raise ConfigError(f"kiln average needs at least two checkpoints, got {len(ckpts)} "
                          f"({', '.join(map(str, ckpts))}); pass several, or a run folder with --last K "
                          "(one is enough with --weights ema: its run's moving average)")
    check_compatible(ckpts)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a folder; pass a new --out folder")
    if ckpt_io.list_checkpoints(out):
        raise CheckpointError(f"{out}: already holds checkpoints; pass a new --out folder")
    inside = next((p for p in (out, *out.parents) if (p / "meta.json").exists()), None)
    if inside is not None:  # a checkpoint's rotation or a --fresh run would take the average with it
        raise CheckpointError(f"{out}: lies inside the checkpoint {inside}; pass a new --out folder outside it")
    made = first_missing(out)  # removed again if the averaging is refused (a run without --weights ema's average)
    try:  # before the averaging, which reads every checkpoint
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder ({e.strerror or e}); pass a writable --out") from None
    try:
        return _average_into(out, ckpts, notes=notes, ema=ema, weights=weights)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def _average_into(out: Path, ckpts: list[Path], *, notes: list[str], ema: float, weights: str) -> Path:
    for note in notes:  # once every refusal above has passed: an error stays one line
        print(note, file=sys.stderr)
    cfg = ckpt_io.read_config(ckpts[-1])
    model = build_model(cfg.model, device="cpu", seed=0)
    avg = average_weights(ckpts, ema=ema, weights=weights)
    own = model.state_dict()
    with torch.no_grad():
        for k, v in avg.items():
            own[k].copy_(v)
    cfg.run.out_dir, cfg.run.init_from = str(out), ""
    last = ckpt_io.read_meta(ckpts[-1])
    meta = {"averaged_from": [str(c) for c in ckpts], "method": "ema" if ema > 0 else "uniform",
            "weights": weights, "tokens_seen": last.get("tokens_seen")}
    if last.get("tokenizer_digest"):  # kiln.train.checkpoint.check_tokenizer_digest
        meta["tokenizer_digest"] = last["tokenizer_digest"]
    if ema > 0:
        meta["ema_decay"] = ema
    return ckpt_io.save_checkpoint(out / "checkpoints", int(last.get("step", 0)), model=model, cfg=cfg, meta=meta)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln average", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("checkpoints", nargs="*", metavar="CKPT",
                   help="checkpoint folders, or run folders (their latest, or --last K)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="CKPT", dest="flagged",
                   help="a checkpoint or run folder, as the other commands take it (repeatable; with or instead "
                        "of the positional CKPTs)")
    p.add_argument("--out", required=True, type=user_path, metavar="DIR",
                   help="a new run folder for the averaged checkpoint")
    p.add_argument("--ema", type=float, default=None, metavar="D",
                   help="EMA decay D in (0, 1) over the checkpoints in step order (default: the uniform mean)")
    p.add_argument("--last", type=int, default=None, metavar="K",
                   help="take the last K checkpoints of each run folder given (default: its latest)")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="each checkpoint's weights, or the moving average its run kept (train.ema_decay)")
    args = p.parse_args(argv)
    if not args.checkpoints and not args.flagged:
        p.error("the checkpoints to average are missing: pass CKPT CKPT ... or --checkpoint CKPT (repeatable)")
    if args.last is not None and args.last < 1:
        raise ConfigError(f"--last: the number of checkpoints to take from each run folder must be at least 1, "
                          f"got {args.last}")
    if args.ema is not None and not 0 < args.ema < 1:  # 0 would keep the newest checkpoint alone, not the mean
        raise ConfigError(f"--ema: the decay must be within (0, 1), got {args.ema:g}; leave --ema out for the "
                          "uniform mean")
    path = average([*args.checkpoints, *args.flagged], args.out, ema=args.ema or 0.0, last=args.last or 0, weights=args.weights)
    meta = ckpt_io.read_meta(path)
    n = len(meta["averaged_from"])
    if args.weights == "ema" and n == 1:
        print(f"wrote the moving average of {meta['averaged_from'][0]} into {path}")
    else:
        what = "the moving averages of " if args.weights == "ema" else ""
        print(f"averaged {what}{n} checkpoints ({meta['method']}) into {path}")
    return 0
