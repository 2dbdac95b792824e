"""`kiln ARGS` as a process, without paying for torch's import in every one.

The suite runs ~200 `kiln` commands; each fresh interpreter spends ~3.5 s importing torch and the libraries
below before kiln does anything. `run_kiln` forks each command from a server process (one per pytest worker)
that imported those once and ran nothing, so it holds no threads to fork badly. The child is a new process with
its own pid, memory, working folder, environment, exit code and stdout/stderr; it runs `kiln.cli.main` (what the
`kiln` script runs) on the arguments as typed, and ends as an interpreter does (threads joined, atexit handlers
run). kiln itself is imported fresh in every child.

`start_kiln` starts one to signal, kill or wait for (subprocess.Popen's methods). Where the fork could differ
from a fresh interpreter it is not used and the real one runs: an environment that changes what those imports read
(thread counts, PYTHON*, TORCH*, HF_*, ...) or options this module does not mimic. tests/test_startup.py and
tests/test_e2e.py run real interpreters; KILN_TESTS_REAL_PROCESSES=1 makes every command one.
"""

from __future__ import annotations

import locale
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Mapping, Sequence

# imported once in the server (~3.5 s on 2 cores): torch; what every checkpoint save and load imports (DTensor);
# torch._dynamo, which torch.optim's optimizers import when built; datasets and transformers (data sources, export)
PRELOAD = ["torch", "torch.distributed.checkpoint", "torch._dynamo", "datasets", "transformers",
           "transformers.models.llama"]
# variables read when those modules are imported: a command whose environment changes one runs for real
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "GOMP_", "TORCH", "PYTORCH", "CUDA", "NCCL", "LD_", "PYTHON", "MALLOC",
                   "HF_", "TRANSFORMERS", "DATASETS", "TOKENIZERS", "XDG_")
# ...but not these: torch sets the first two in the test process when it loads inductor, and reads them later;
# lm_eval sets the third when imported, and it only tunes downloads (the tests make none)
RUNTIME_ENV = {"TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK", "HF_XET_HIGH_PERFORMANCE"}

_ctx = None
_server_env: dict[str, str] | None = None  # the server's environment, fixed when it starts (the first command)


def kiln_cmd(*args: str) -> list[str]:
    """The command line of a real interpreter running the kiln CLI."""
    return [sys.executable, "-m", "kiln", *args]


def _forkable(env: Mapping[str, str]) -> bool:
    """Whether a child forked from the server sees what a fresh interpreter with `env` would."""
    global _ctx, _server_env
    if os.environ.get("KILN_TESTS_REAL_PROCESSES"):
        return False
    if _server_env is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
        _server_env = dict(os.environ)  # the server inherits this at its start, just below
    keys = {k for k in (*env, *_server_env) if k.startswith(IMPORT_TIME_ENV) and k not in RUNTIME_ENV}
    differ = sorted(k for k in keys if env.get(k) != _server_env.get(k))
    if os.environ.get("KILN_TESTS_TRACE"):  # a file: one line per command, and why it ran for real
        with open(os.environ["KILN_TESTS_TRACE"], "a") as f:
            f.write(f"{'real' if differ else 'fork'} {os.environ.get('PYTEST_CURRENT_TEST', '?')} {differ}\n")
    return not differ


def run_kiln(*args: str, capture_output: bool = True, text: bool = False, cwd: str | os.PathLike | None = None,
             env: Mapping[str, str] | None = None, input: str | bytes | None = None, timeout: float | None = None,
             check: bool = False, **other) -> subprocess.CompletedProcess:
    """subprocess.run(kiln_cmd(*args), capture_output=True, ...), forked from the preloaded server."""
    env = dict(os.environ if env is None else env)
    if other or not capture_output or not _forkable(env):
        return subprocess.run(kiln_cmd(*args), capture_output=capture_output, text=text, cwd=cwd, env=env,
                              input=input, timeout=timeout, check=check, **other)
    data = input.encode(locale.getpreferredencoding(False)) if isinstance(input, str) else input
    proc = KilnProcess(args, cwd=cwd, env=env, input=data, text=text)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err) from None
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        res.check_returncode()
    return res


def start_kiln(*args: str, cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None):
    """subprocess.Popen(kiln_cmd(*args), stdout=PIPE, stderr=PIPE, text=True), forked from the preloaded server:
    a live run to signal, kill or wait for."""
    env = dict(os.environ if env is None else env)
    if not _forkable(env):
        return subprocess.Popen(kiln_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                env=env)
    return KilnProcess(args, cwd=cwd, env=env, input=None, text=True)


class KilnProcess:
    """A `kiln ARGS` process forked from the server, with the subprocess.Popen methods the tests use. Its
    stdout and stderr go to files; `stdout.read()` gives what it wrote so far."""

    def __init__(self, args: Sequence[str], *, cwd, env: dict[str, str], input: bytes | None, text: bool) -> None:
        self.args = kiln_cmd(*args)
        folder = tempfile.mkdtemp(prefix="kiln-run-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        paths = [os.path.join(folder, name) for name in ("stdin", "stdout", "stderr")]
        for path, content in zip(paths, (input or b"", b"", b"")):
            with open(path, "wb") as f:
                f.write(content)
        self._proc = _ctx.Process(target=_child, args=(list(args), os.fspath(cwd or os.getcwd()), env, paths,
                                                       input is not None))
        self._proc.start()
        self.pid = self._proc.pid
        enc = locale.getpreferredencoding(False)
        self.stdout, self.stderr = ((open(p, encoding=enc) if text else open(p, "rb")) for p in paths[1:])
        weakref.finalize(self, self.stdout.close)
        weakref.finalize(self, self.stderr.close)

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple:
        self.wait(timeout)
        return self.stdout.read(), self.stderr.read()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never a pid the system may have given to another process since
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _child(args: list[str], cwd: str, env: dict[str, str], paths: list[str], has_input: bool) -> None:
    """In the forked process: become `python -m kiln ARGS` as a fresh interpreter would run it."""
    import atexit
    import multiprocessing.process as mpp
    import threading
    import traceback

    # not a multiprocessing child any more: the default start method, process name and parent are a main process's
    multiprocessing.set_start_method(None, force=True)
    me = mpp.current_process()
    me._name, me._identity, me._parent_pid, mpp._parent_process, mpp._children = "MainProcess", (), None, None, set()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path, flags in ((0, paths[0] if has_input else os.devnull, os.O_RDONLY),
                            (1, paths[1], os.O_WRONLY), (2, paths[2], os.O_WRONLY)):
        new = os.open(path, flags)
        os.dup2(new, fd)
        os.close(new)
    sys.stdin = sys.__stdin__ = open(0, encoding=sys.stdout.encoding, closefd=False)
    sys.argv = [os.path.join(os.path.dirname(__import__("kiln").__file__), "__main__.py"), *args]
    sys.path.insert(0, cwd)  # `python -m` puts the working folder first
    code = 0
    try:
        from kiln.cli import main

        code = main(args)
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:  # what an interpreter does on its way out
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)
