"""`kiln ARGS` as a process, without paying for torch's import in every one.

The suite runs ~200 `kiln` commands; each fresh interpreter spends ~3.5 s importing torch and the libraries
below before kiln does anything. `run_kiln` forks each
command from a server process that imported those once and ran nothing (so it holds no threads to fork badly):
the child is a new process with its own pid, memory, working folder, environment, exit code and stdout/stderr,
runs `kiln.cli.main` (what the `kiln` script runs) on the arguments as typed, and ends as an interpreter does
(threads joined, atexit handlers run). kiln itself is imported fresh in every child.

Where the fork could differ from a fresh interpreter it is not used and `run_kiln` runs the real one: an
environment that changes what torch reads at import (thread counts, PYTHON*, TORCH*, ...) or options this module
does not mimic. Tests that signal or kill a live run use subprocess.Popen directly, and tests/test_startup.py
times real interpreters.
"""

from __future__ import annotations

import locale
import multiprocessing
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping

# imported once in the server (~3.5 s on 2 cores): torch; what every checkpoint save and load imports (DTensor);
# torch._dynamo, which torch.optim's optimizers import when built; datasets and transformers (data sources, export)
PRELOAD = ["torch", "torch.distributed.checkpoint", "torch._dynamo", "datasets", "transformers",
           "transformers.models.llama"]
# variables read when those modules are imported: a command whose environment changes one runs for real
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "GOMP_", "TORCH", "PYTORCH", "CUDA", "NCCL", "LD_", "PYTHON", "MALLOC",
                   "HF_", "TRANSFORMERS", "DATASETS", "TOKENIZERS", "XDG_")
# ...but not these two: torch sets them in the test process when it loads inductor, and reads them later
RUNTIME_ENV = {"TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK"}

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
    cmd = kiln_cmd(*args)
    env = dict(os.environ if env is None else env)
    if other or not capture_output or not _forkable(env):
        return subprocess.run(cmd, capture_output=capture_output, text=text, cwd=cwd, env=env, input=input,
                              timeout=timeout, check=check, **other)
    with tempfile.TemporaryDirectory(prefix="kiln-run-") as tmp:
        paths = [os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")]
        data = input.encode(locale.getpreferredencoding(False)) if isinstance(input, str) else input
        for path, content in zip(paths, (data or b"", b"", b"")):
            with open(path, "wb") as f:
                f.write(content)
        proc = _ctx.Process(target=_child, args=(list(args), os.fspath(cwd or os.getcwd()), env, paths,
                                                 input is not None))
        proc.start()
        proc.join(timeout)
        timed_out = proc.exitcode is None
        if timed_out:
            proc.kill()
            proc.join()
        out, err = (open(p, "rb").read() for p in paths[1:])
    if text:
        enc = locale.getpreferredencoding(False)
        out, err = out.decode(enc), err.decode(enc)
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
    res = subprocess.CompletedProcess(cmd, proc.exitcode, out, err)
    if check:
        res.check_returncode()
    return res


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
