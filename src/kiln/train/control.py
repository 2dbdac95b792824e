"""Job control: `kiln control list | save | stop | abort [JOB]` for runs on this machine.

A training job (rank 0) registers itself in `<kiln cache>/jobs/<job_id>.json` and keeps a status
file `<run_dir>/control/status.json` up to date. `kiln control CMD JOB` drops a request file into
`<run_dir>/control/`; the trainer looks for it at every step boundary (one stat call), tells every
rank (one small collective when distributed), acts, then acknowledges in `ack.json` (with the step
and checkpoint), which `kiln control` waits for:

    save   write a checkpoint now and keep training
    stop   write a checkpoint and exit cleanly (resume later with the same command)
    abort  exit at once without saving (a failed experiment); the existing checkpoints stay

JOB is a job id (`kiln control list`), a run name, a run folder (or its name) or a pid. Files, not
signals, so it works for torchrun jobs with many processes and for run folders on shared storage.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import socket
import sys
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from kiln.cache import cache_root
from kiln.errors import KilnError

COMMANDS = ("save", "stop", "abort")


class Stop(str, enum.Enum):
    """Why a run ended before its plan's last step. The value is what the summary, status.json and the
    log say (a str, so those read as before)."""

    AT_STEP = "train.stop_at_step"  # planned: exits 0, the next command resumes
    TARGET = "target"  # reached train.target_loss: ends as a finished run
    DATA_RAN_DRY = "data ran dry"  # data.on_exhausted=stop found its data used up: ends as a finished run
    BUDGET = "train.time_budget"  # went past its budget by more than 10%: saved, exits 0
    SIGNAL = "signal"  # SIGINT / SIGTERM: saved, exits 130
    CONTROL_STOP = "kiln control stop"  # saved, exits 130
    CONTROL_ABORT = "kiln control abort"  # not saved, exits 1

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @property
    def finishes(self) -> bool:
        """Ends as the plan's last step would: the final eval, checkpoint and sample."""
        return self in (Stop.TARGET, Stop.DATA_RAN_DRY)

    @property
    def saves(self) -> bool:
        return self is not Stop.CONTROL_ABORT

    @property
    def exit_code(self) -> int:
        """130: saved and stopped early (rerun to resume); 1: ended without saving; 0: ended as planned."""
        return {Stop.SIGNAL: 130, Stop.CONTROL_STOP: 130, Stop.CONTROL_ABORT: 1}.get(self, 0)


DATA_RAN_DRY = Stop.DATA_RAN_DRY.value  # a final state in status.json (logs reads it)


@dataclass(frozen=True)
class Requests:
    """What this step was asked to do besides training, agreed on every rank (any rank's request counts)."""

    signal: bool = False  # SIGTERM / SIGINT: save and exit
    save: bool = False  # kiln control save: checkpoint now, keep training
    stop: bool = False  # kiln control stop: save and exit
    abort: bool = False  # kiln control abort: exit without saving
    clock_save: bool = False  # train.save_every_minutes passed since the last save (rank 0's clock)

    def flags(self) -> list[float]:
        """As numbers, for the step's one all-reduce."""
        return [float(v) for v in astuple(self)]

    @classmethod
    def from_flags(cls, flags: list[bool]) -> Requests:
        return cls(*flags)


def jobs_dir() -> Path:
    """The registry of running jobs: $KILN_JOBS_DIR, else <kiln cache>/jobs."""
    if os.environ.get("KILN_JOBS_DIR"):
        return Path(os.environ["KILN_JOBS_DIR"])
    return cache_root() / "jobs"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write (temp + rename), so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except OSError as e:  # a full disk: leave no temp file, and name the file (a failed write names none)
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gone(status: dict[str, Any]) -> bool:
    """A status.json with no final state whose process, on this machine, is no longer there (kill -9, out of
    memory, a lost machine's reboot): nothing is running to finish the run."""
    pid = status.get("pid")
    return ("state" not in status and status.get("host") == socket.gethostname() and isinstance(pid, int)
            and not _alive(pid))


LOCK = ".kiln-lock"  # in the run folder: held by the process that trains there


def lock_run_folder(run_dir: Path) -> IO[str]:
    """Hold `<run_dir>/.kiln-lock` for as long as the returned file stays open (an fcntl lock: the system
    releases it when the process ends, however it ends), so that a second kiln process on the same run folder
    is refused instead of writing the same checkpoints and metrics. A filesystem without locks is not guarded."""
    import fcntl

    try:
        f = open(Path(run_dir) / LOCK, "a+")  # noqa: SIM115 (the caller closes it)
    except OSError as e:  # a read-only folder: the run could write nothing there either
        raise KilnError(f"run.out_dir {run_dir}: not writable ({e.strerror or e}); pass --run.out_dir DIR") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip()
        f.close()
        job = next((j["job_id"] for j in list_jobs() if str(j["pid"]) == pid), None)
        who = f"kiln job {job} (pid {pid})" if job else f"another kiln process (pid {pid or '?'})"
        stop = f"`kiln control stop {job}` ends it" if job else "wait for it to end"
        raise KilnError(f"{run_dir} is in use by {who}; {stop}, or pass another --run.out_dir") from None
    except OSError:
        return f
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class JobControl:
    """The trainer's side: register, publish status, and poll for requests (rank 0 only)."""

    def __init__(self, run_dir: Path, *, name: str) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.dir = self.run_dir / "control"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.job_id = f"{name}-{os.getpid()}"
        self.closed = False
        self.entry: Path | None = jobs_dir() / f"{self.job_id}.json"
        for stale in self.dir.glob("request*.json"):  # requests addressed to a previous process
            stale.unlink(missing_ok=True)
        try:
            _write_json(self.entry, {"job_id": self.job_id, "pid": os.getpid(), "host": socket.gethostname(),
                                     "run_dir": str(self.run_dir), "name": name, "started": time.time()})
        except OSError as e:  # a read-only cache: the run trains, out of kiln control's reach
            print(f"note: kiln control will not find this run: {self.entry.parent} is not writable "
                  f"({e.strerror or e}); set KILN_JOBS_DIR (or KILN_CACHE) to a writable folder", file=sys.stderr)
            self.entry = None

    def poll(self) -> dict[str, Any] | None:
        """The pending request ({"command": 'save' | 'stop' | 'abort', "id": ...}) or None. Consumes it."""
        req = self.dir / "request.json"
        if not req.exists():
            return None
        data = _read_json(req) or {}
        req.unlink(missing_ok=True)
        return data if data.get("command") in COMMANDS else None

    def ack(self, request: dict[str, Any] | None, **result: Any) -> None:
        """Tell the requester its command has been carried out (step, checkpoint, ...)."""
        if request is not None:
            _write_json(self.dir / "ack.json", {"id": request.get("id"), "command": request["command"],
                                                "time": time.time(), **result})

    def status(self, **fields: Any) -> None:
        _write_json(self.dir / "status.json", {"job_id": self.job_id, "pid": os.getpid(), "host": socket.gethostname(),
                                                "time": time.time(), **fields})

    def close(self, state: str) -> None:
        """Record the final state and leave the registry (only the first call counts)."""
        if self.closed:
            return
        self.closed = True
        self.status(state=state)
        if self.entry is not None:
            self.entry.unlink(missing_ok=True)


# ---- the user's side (kiln control) -------------------------------------------------------


def list_jobs() -> list[dict[str, Any]]:
    """Live jobs on this machine, with their latest status; stale entries are removed."""
    out = []
    root = jobs_dir()
    if not root.is_dir():
        return out
    host = socket.gethostname()
    for f in sorted(root.glob("*.json")):
        job = _read_json(f)
        if not job:
            continue
        if job.get("host") == host and not _alive(int(job["pid"])):
            f.unlink(missing_ok=True)
            continue
        job["status"] = _read_json(Path(job["run_dir"]) / "control" / "status.json") or {}
        out.append(job)
    return out


def find_job(spec: str) -> dict[str, Any]:
    """A job by id, run name (run.name), run folder (a path, or its name) or pid; KilnError if none or several
    match."""
    jobs = list_jobs()
    path = str(Path(spec).resolve()) if Path(spec).exists() else None
    hits = [j for j in jobs if spec in (j["job_id"], j["name"], str(j["pid"]), Path(j["run_dir"]).name)
            or j["run_dir"] == path]
    if not hits:
        live = ", ".join(j["job_id"] for j in jobs) or "none"
        raise KilnError(f"no running kiln job matches '{spec}' (running: {live}); see kiln control list")
    if len(hits) > 1:
        raise KilnError(f"'{spec}' matches several jobs ({', '.join(j['job_id'] for j in hits)}); use a job id")
    return hits[0]


def send(spec: str, command: str, *, wait: float = 60.0) -> dict[str, Any]:
    """Ask a job to save / stop / abort and wait until it has done so (0: don't wait). Returns the job
    with its acknowledgement under "ack" (step, checkpoint) when waited for."""
    if command not in COMMANDS:
        raise KilnError(f"unknown control command '{command}'; use one of {', '.join(COMMANDS)}")
    job = find_job(spec)
    folder = Path(job["run_dir"]) / "control"
    request_id = f"{os.getpid()}-{time.time_ns()}"
    _write_json(folder / "request.json", {"command": command, "id": request_id, "time": time.time()})
    deadline = time.time() + wait
    while wait > 0:
        ack = _read_json(folder / "ack.json")
        if ack and ack.get("id") == request_id:
            job["ack"] = ack
            break
        if job.get("host") == socket.gethostname() and not _alive(int(job["pid"])):
            raise KilnError(f"job {job['job_id']} exited before carrying out '{command}'")
        if time.time() > deadline:
            raise KilnError(f"job {job['job_id']} has not carried out '{command}' within {wait:.0f} s (a step may "
                            "be long, or the job is hung); the request stays queued")
        time.sleep(0.1)
    return job


def main(argv: list[str]) -> int:
    """`kiln control list | save | stop | abort [JOB] [--no-wait]`."""
    p = argparse.ArgumentParser(prog="kiln control", description="List and steer training jobs on this machine.",
                                allow_abbrev=False)
    p.add_argument("command", choices=["list", *COMMANDS],
                   help="list: the running jobs; save: a checkpoint now; stop: save and exit; abort: exit unsaved")
    p.add_argument("job", nargs="?", help="job id, run name, run folder (or its name) or pid (see kiln control "
                   "list); may be left out while one job runs")
    p.add_argument("--no-wait", action="store_true", help="return at once instead of waiting for the job")
    args = p.parse_args(argv)
    if args.command == "list":
        jobs = list_jobs()
        if not jobs:
            print("no running kiln jobs")
            return 0
        header = ("job", "pid", "step", "loss", "tok/s", "eta", "run folder")
        rows = []
        for j in jobs:
            s = j["status"]
            rows.append((j["job_id"], str(j["pid"]), f"{s.get('step', '?')}/{s.get('total_steps') or '?'}",
                         f"{s['loss']:.4f}" if isinstance(s.get("loss"), float) else "-",
                         f"{s['tokens_per_sec']:,.0f}" if s.get("tokens_per_sec") else "-",
                         s.get("eta", "-"), j["run_dir"]))
        if not sys.stdout.isatty():  # scripts: one tab-separated line per job, nothing truncated
            print("\t".join(header))
            for r in rows:
                print("\t".join(r))
            return 0
        table = Table(*header)
        for r in rows:
            table.add_row(*r)
        Console(file=sys.stdout).print(table)
        return 0
    target = args.job
    if not target:  # the one running job, as `kiln control list` shows it
        jobs = list_jobs()
        if len(jobs) != 1:
            raise KilnError(f"kiln control {args.command}: " + ("no running kiln jobs" if not jobs else
                            f"{len(jobs)} jobs are running; name one: kiln control {args.command} JOB "
                            f"({', '.join(j['job_id'] for j in jobs)})"))
        target = jobs[0]["job_id"]
    job = send(target, args.command, wait=0.0 if args.no_wait else 600.0)
    ack = job.get("ack", {})
    done = (f"; done at step {ack['step']}" if "step" in ack else "") + (
        f", saved {ack['checkpoint']}" if ack.get("checkpoint") else "")
    print(f"{args.command}: sent to {job['job_id']} ({job['run_dir']})" + ("" if args.no_wait else done))
    return 0
