"""Paths as a run saves them: a saved config and a saved data position name local files absolute, so a run
resumes, exports and generates from any folder, whatever folder the command that started it ran in."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from kiln.config import Config, to_dict


def absolute_if_local(p: str) -> str:
    """`p` made absolute when it names something on this machine (a file or folder, or a glob that matches
    one), relative to this process's folder; anything else (an HF dataset name, a bundled: corpus, a URL, a
    path that is not there) as it is. Saved configs and data positions name local data this way."""
    if not p or ":" in p.split("/")[0]:
        return p
    path = os.path.expanduser(p)
    local = os.path.exists(path) or (any(c in p for c in "*?[") and bool(glob.glob(path)))
    return os.path.abspath(path) if local else p


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what a command that writes `path` creates, and
    removes again when it fails), or None."""
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def saved_dict(cfg: Config) -> dict[str, Any]:
    """to_dict(cfg) as a run folder and its checkpoints save it: run.out_dir, run.init_from and the local data
    paths absolute, so `kiln train RUN/config.yaml` (and generate, export, a resume) from another folder
    reads the same files and resumes the same run. Paths are taken as the command that wrote them saw them."""
    tree = to_dict(cfg)
    pin = absolute_if_local
    run, data, post = tree["run"], tree["data"], tree["posttrain"]
    run["out_dir"] = os.path.abspath(os.path.expanduser(run["out_dir"])) if run["out_dir"] else ""
    run["init_from"] = pin(run["init_from"])
    for src in [*data["train"], *data["val"], *(s for st in data["stages"] for s in st["train"])]:
        src["path"] = pin(src["path"])
    data["shards"], post["data"], post["val_data"] = pin(data["shards"]), pin(post["data"]), pin(post["val_data"])
    return tree
