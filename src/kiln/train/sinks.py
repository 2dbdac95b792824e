"""Optional metric sinks beyond JSONL and TensorBoard: Weights & Biases.

A sink has `log(record)` and `close()`; `record` is the same dict MetricsLogger writes to
metrics.jsonl ({"kind": "train" | "eval", "step": ..., <scalars>}). Scalars go out under the same
names TensorBoard uses: "<kind>/<key>" (train/loss, eval/eval_loss, eval/eval_loss/<source>).

wandb is imported only when a sink is built, so kiln runs without it. WANDB_MODE=offline (or
run.wandb_mode: offline) writes the run under <run_dir>/wandb/ for a later `wandb sync`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from kiln.config import Config, to_dict
from kiln.errors import KilnError

WANDB_ID_FILE = "wandb_id.txt"  # in the run folder: a resumed kiln run continues the same W&B run


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {"<kind>/<key>": value}) for the finite numbers of a metrics record (TensorBoard's names)."""
    kind = record.get("kind", "train")
    out: dict[str, float] = {}
    for k, v in record.items():
        if k in ("step", "kind") or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            out[f"{kind}/{k}"] = v
    return int(record.get("step", 0)), out


def wandb_enabled(cfg: Config) -> bool:
    """True when the config asks for W&B (run.wandb, or a run.wandb_project)."""
    return bool(cfg.run.wandb or cfg.run.wandb_project)


def import_wandb() -> Any:
    """The wandb module, or a one-line KilnError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise KilnError("run.wandb is on but the wandb package is not installed: pip install wandb "
                        "(or pip install 'kiln[wandb]'), or set --run.wandb false") from None
    return wandb


class WandbSink:
    """Mirrors metrics records to a W&B run.

    The W&B run id is kept in <run_dir>/wandb_id.txt, so resuming a kiln run resumes the same W&B
    run. W&B refuses steps below its current step; records a resumed kiln run logs again (steps
    between the checkpoint and a crash, or many more after a resume from an older checkpoint) are
    skipped here, and one line on stderr says how many once logging catches up (or at close()).
    """

    def __init__(self, run_dir: Path, *, project: str, name: str, config: dict[str, Any] | None = None,
                 mode: str = "auto", entity: str = "") -> None:
        wandb = import_wandb()
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        kwargs: dict[str, Any] = {"project": project or "kiln", "name": name, "dir": str(run_dir),
                                  "config": config or {}}
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        if entity:
            kwargs["entity"] = entity
        if mode != "auto":  # auto: wandb decides from WANDB_MODE / login state
            kwargs["mode"] = mode
        try:
            self._run = wandb.init(**kwargs)
        except Exception as e:  # wandb raises many types (UsageError, CommError, ...) for login/network
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KilnError(f"W&B could not start ({msg}); run `wandb login`, or set WANDB_MODE=offline "
                            "(or --run.wandb_mode offline) to log locally") from None
        if run_id is None:
            id_file.write_text(self._run.id + "\n")
        self._last_step = int(getattr(self._run, "step", 0) or 0)
        self._skipped: list[int] = []  # [count, first step, last step] of records W&B is already past

    @property
    def run(self) -> Any:
        """The underlying wandb Run (for its dir, id, url)."""
        return self._run

    def log(self, record: dict[str, Any]) -> None:
        """Log a metrics record's scalars at its step."""
        step, values = scalars(record)
        if not values:
            return
        if step < self._last_step:
            n, lo, hi = self._skipped or [0, step, step]
            self._skipped = [n + 1, min(lo, step), max(hi, step)]
            return
        self._report_skipped()
        self._run.log(values, step=step)
        self._last_step = step

    def _report_skipped(self) -> None:
        """One stderr line for the records dropped since the resume (then nothing until a next gap)."""
        if not self._skipped:
            return
        n, lo, hi = self._skipped
        print(f"kiln: W&B run {self._run.id} was already at step {self._last_step}: {n} metrics record(s) at "
              f"steps {lo}-{hi} logged again after the resume are not in W&B (metrics.jsonl and TensorBoard "
              "have them)", file=sys.stderr, flush=True)
        self._skipped = []

    def close(self) -> None:
        """Flush and finish the W&B run (idempotent)."""
        if self._run is not None:
            self._report_skipped()
            self._run.finish()
            self._run = None


def wandb_sink(cfg: Config, run_dir: Path) -> WandbSink | None:
    """A WandbSink when the config asks for one, else None. Call it on rank 0 only."""
    if not wandb_enabled(cfg):
        return None
    r = cfg.run
    return WandbSink(run_dir, project=r.wandb_project or os.environ.get("WANDB_PROJECT", "") or "kiln",
                     name=r.name, config=to_dict(cfg), mode=r.wandb_mode, entity=r.wandb_entity)
