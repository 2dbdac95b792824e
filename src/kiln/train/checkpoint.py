"""Checkpoints: everything needed to resume exactly, written atomically, rotated.

Layout of one checkpoint (a folder):
    runs/<name>/checkpoints/step_<N>/
        model.safetensors   model weights (fp32; a tied head is stored once, as tok_emb.weight)
        train_state.pt      optimizer, scheduler, data position, RNG states, counters
        config.yaml         the resolved config
        meta.json           step, tokens_seen, versions; written last, so its presence means complete
A checkpoint is written to `.step_<N>.tmp`, fsynced, then renamed; a crash mid-save leaves the
previous checkpoints untouched and the temp folder is ignored (and removed on the next save).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kiln import __version__
from kiln.config import Config, config_from_dict, to_dict
from kiln.errors import CheckpointError, ConfigError
from kiln.model import Transformer, build_model

STEP_RE = re.compile(r"^step_(\d+)$")


def list_checkpoints(run_or_ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints under a run folder (or its checkpoints/ folder), oldest first."""
    root = Path(run_or_ckpt_dir)
    root = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "meta.json").exists()]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder meaning its latest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    if (p / "meta.json").exists():
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise CheckpointError(f"{p}: no complete checkpoint found (expected {p}/checkpoints/step_<N>/meta.json)")
    return ckpts[-1]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Weights as contiguous fp32 CPU tensors, keyed like the module tree."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(ckpt_root: Path, step: int, *, model: Transformer, cfg: Config,
                    train_state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write step_<step> atomically under ckpt_root and return its path."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        info = {"step": step, "kiln_version": __version__, "torch_version": torch.__version__, **meta}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a final save right after a periodic one)
            old = ckpt_root / f".step_{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def rotate(ckpt_root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all). Returns deleted paths."""
    ckpts = list_checkpoints(ckpt_root)
    doomed = ckpts[:-keep_last] if keep_last > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    for stale in ckpt_root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return doomed


def read_config(ckpt: Path) -> Config:
    try:
        tree = yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{ckpt}/config.yaml: unreadable ({e}); the checkpoint is corrupt") from None
    try:
        return config_from_dict(tree, where=f"{ckpt}/config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{e} (checkpoint written by another kiln version?)") from None


def load_model_weights(model: Transformer, ckpt: Path) -> None:
    """Copy the checkpoint's weights into `model`; a shape or key mismatch is a clear error."""
    f = ckpt / "model.safetensors"
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{f}: corrupt or unreadable ({e}); delete {ckpt} to fall back to an older "
                              "checkpoint, or pass --fresh") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or bad:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                else f"shape of {bad[0]}: checkpoint {tuple(state[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}")
        raise CheckpointError(f"{f}: does not fit this model's architecture ({what}); use a matching config or --fresh")
    model.load_state_dict(state)


def load_for_inference(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[Transformer, Config, Path]:
    """(model in eval mode, its config, the checkpoint folder) from a checkpoint or run folder."""
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    model = build_model(cfg.model, device=device, seed=0)
    load_model_weights(model, ckpt)
    model.eval()
    return model, cfg, ckpt


def load_train_state(ckpt: Path) -> dict[str, Any]:
    f = ckpt / "train_state.pt"
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or garbled pickles
        raise CheckpointError(f"{f}: corrupt or unreadable ({type(e).__name__}); delete {ckpt} to fall back "
                              "to an older checkpoint, or pass --fresh") from None
