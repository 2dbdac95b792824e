"""Terminal progress (a rich bar on a TTY, plain lines otherwise) and graceful stop on signals."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
from rich.progress import Progress as RichProgress


class Progress:
    """Step progress with loss, lr, tokens/s and ETA. Plain log lines when stdout is not a terminal."""

    def __init__(self, total: int | None, *, start: int = 0, quiet: bool = False) -> None:
        """`total` None: not known yet (a time budget fixes it after the warmup)."""
        self.total, self.start, self.quiet = total, start, quiet
        self.fields = {"loss": "-", "lr": "-", "tok_s": "-", "eta": "?"}  # shown; "-" until the first train record
        self._bar = None
        if not quiet and sys.stdout.isatty():
            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tok_s]} tok/s  "
                           "eta {task.fields[eta]}"), transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, **self.fields)
            self._bar.start()

    def set_total(self, total: int) -> None:
        """The run's length changed (a time budget fixed it)."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def print(self, msg: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(msg, highlight=False, markup=False)
        else:
            print(msg, flush=True)

    def update(self, step: int, **fields: float | str) -> None:
        """`eta` is the train record's (its window's pace, evals and saves included), so the bar, the plain lines,
        metrics.jsonl and `kiln control list` say one thing."""
        shown = {"loss": "{:.4f}", "lr": "{:.2e}", "tok_s": "{:,.0f}"}
        self.fields.update({k: shown[k].format(v) if k in shown and isinstance(v, int | float) else str(v)
                            for k, v in fields.items()})
        if self._bar is not None:
            self._bar.update(self._task, completed=step, **self.fields)
        elif fields and not self.quiet:
            f = self.fields
            print(f"step {step:>6}/{self.total or '?'}  loss {f['loss']}  lr {f['lr']}  {f['tok_s']} tok/s  "
                  f"eta {f['eta']}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class StopOnSignal:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested:  # a second SIGTERM (a dying launcher's, with the kernel's PDEATHSIG): said once already
            return
        self.requested = True
        if os.environ.get("RANK", "0") == "0":  # torchrun signals every worker: one line, from rank 0
            again = "Ctrl-C again" if signum == signal.SIGINT else "Ctrl-C (SIGINT)"
            when = "this step" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else \
                "the step every rank agrees on it (this one or the next)"
            print(f"\nreceived {signal.Signals(signum).name}: saving at the end of {when} ({again} to abort "
                  "without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
