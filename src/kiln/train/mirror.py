"""Checkpoints on any fsspec URL (s3://, gs://, hdfs://, memory://, file://, ...).

A checkpoint is always written locally first, atomically (kiln.train.checkpoint). Rank 0 then
mirrors it to `train.checkpoint_url`: every file of `step_<N>/` is uploaded, `meta.json` last. Object
stores have no atomic rename, so `meta.json` is the completion marker there too: a folder without it
(an interrupted upload) is ignored and overwritten. Retention applies to the mirror's own checkpoints as to
the local folder's. A run that finds no local checkpoint but a complete one at the URL (a fresh machine, an
ephemeral disk) downloads the latest first and resumes from it.

The remote protocol's backend must be installed (`pip install s3fs` for s3://, `gcsfs` for gs://);
otherwise the run stops at start with one line naming the package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kiln.errors import ConfigError
from kiln.train.checkpoint import best_score, retained
from kiln.train.storage import MARKER, STEP_RE


class Mirror:
    """The remote side of a run's checkpoints."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError:
            raise ConfigError("train.checkpoint_url needs fsspec: pip install fsspec") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"train.checkpoint_url {url}: {str(e).splitlines()[0]} (install the protocol's fsspec "
                              "backend, e.g. pip install s3fs for s3://)") from None
        self.url, self.root = url, root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def complete(self) -> list[tuple[int, str]]:
        """(step, name) of the complete checkpoints at the URL, oldest first."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for e in entries:
            name = e.rstrip("/").rsplit("/", 1)[-1]
            m = STEP_RE.match(name)
            if m and self.fs.exists(self._path(name, MARKER)):
                found.append((int(m.group(1)), name))
        return sorted(found)

    def upload(self, ckpt: Path) -> None:
        """Copy a complete local checkpoint folder; meta.json last, so a partial upload never counts."""
        dest = self._path(ckpt.name)
        if self.fs.exists(dest):
            self.fs.rm(dest, recursive=True)
        files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MARKER)
        for f in [*files, ckpt / MARKER]:
            target = self._path(ckpt.name, *f.relative_to(ckpt).parts)
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(f), target)

    def download_latest(self, ckpt_root: Path) -> Path | None:
        """The latest complete remote checkpoint, downloaded into `ckpt_root` (atomically), or None."""
        complete = self.complete()
        if not complete:
            return None
        _, name = complete[-1]
        tmp = ckpt_root / f".{name}.download"
        final = ckpt_root / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        src = self._path(name)
        for remote in sorted(self.fs.find(src)):
            rel = remote[len(src):].lstrip("/")
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(local))
        tmp.rename(final)
        return final

    def retain(self, *, keep_last: int, keep_best: int = 0) -> None:
        """The local folder's retention, applied to the mirror's own complete checkpoints (a run resumed from
        the mirror on a fresh disk holds fewer locally); partial uploads are deleted."""
        complete = self.complete()
        scores = [best_score(json.loads(self.fs.cat_file(self._path(name, MARKER)))) if keep_best > 0 else None
                  for _, name in complete]
        keep = {complete[i][1] for i in retained(scores, keep_last=keep_last, keep_best=keep_best)}
        for e in self.fs.ls(self.root, detail=False):
            name = e.rstrip("/").rsplit("/", 1)[-1]
            if STEP_RE.match(name) and name not in keep:
                self.fs.rm(self._path(name), recursive=True)


def mirror_for(url: str) -> Mirror | None:
    return Mirror(url) if url else None
