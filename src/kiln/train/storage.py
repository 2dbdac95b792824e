"""A checkpoint's files on disk: checksums written at save and verified before any load, and what a
failed write means.

Integrity. The completion marker (`meta.json`, written last) lists every other file of the checkpoint
with its size and XXH3-128 checksum (`xxh128sum FILE` prints the same hex), plus a checksum of that
list itself. Every loader verifies all of them first (`verify`), so a truncated shard, bytes
overwritten in place (same size), a deleted file or a damaged marker is refused with one line naming
the file, instead of loading wrong weights. XXH3 is not cryptographic: it detects damage, not
tampering.

At save time the shards are hashed on their way to the OS (`summing_writer`, DCP's file writer with
a stream that hashes what passes through it), in the writer's own thread, so nothing is read twice:
hashing the files again after the save re-read a third of a 12.5 GB state from disk on a 23 GB
machine (the state itself fills the memory the page cache would use) and cost 16% of the save.
Each rank leaves its sums in a small file that rank 0 merges into the marker (`collect_digests`), so
asynchronous saves need no collective; the small files (DCP's .metadata, state/*.pt, config.yaml) are
hashed from the page cache afterwards, several in parallel threads (xxhash releases the GIL).
At load time the files are read with plain reads, where an I/O error stays an OSError (through mmap a
bad sector is a SIGBUS). Measured cost: bench/RESULTS.md, "Checkpoint checksums".

Failed writes. A full disk reaches the checkpoint code in several disguises: an OSError, the
RuntimeError of torch.save's zip writer ("unexpected pos ...", the OSError only in its __context__),
or either inside DCP's CheckpointException (one per rank). `write_error` finds the OSError in that
chain, and, when none is there, asks the file system how much space is left. Before that, `check_room`
refuses a save whose tensors alone exceed the free space, so the disk is not filled in the first place.
"""

from __future__ import annotations

import errno
import functools
import json
import mmap
import os
import re
import sys
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xxhash

from kiln.errors import CheckpointError

ALGO = "xxh3_128"
MARKER = "meta.json"  # a checkpoint's completion marker, written last (locally and on a mirror)
STEP_RE = re.compile(r"^step_(\d+)$")  # a checkpoint folder's name
SUMS_SUFFIX = ".sums.json"  # dcp/__<rank>_.sums.json: one rank's shard sums, until rank 0 merges them
READ_CHUNK = 16 << 20  # per thread, for verification reads
LOW_SPACE = 64 << 20  # free bytes under which a failed write is taken for a full disk
_FULL = (errno.ENOSPC, errno.EDQUOT)
_verified: dict[str, tuple[Any, ...]] = {}  # checkpoint -> the file stats it verified with (once per process)
_unverifiable: set[str] = set()  # checkpoints without checksums already noted


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its marker, or whose marker is missing or garbled."""

    def __init__(self, ckpt: Path, file: str, problem: str) -> None:
        self.ckpt, self.file, self.problem = Path(ckpt), file, problem
        if file == MARKER and problem.startswith("missing"):
            what = f"{self.ckpt.name} is not a complete checkpoint (its save did not finish) and was not used"
            fix = f"Pass a complete one{_earlier(self.ckpt).rstrip(',')}"
        else:
            what = f"checkpoint {self.ckpt.name} is damaged and was not used, nothing changed"
            fix = (f"Pass an earlier one{_earlier(self.ckpt)} or restore the file from a copy; `kiln train` sets a "
                   "damaged latest checkpoint aside and resumes from the one before")
        super().__init__(f"{self.ckpt / file}: {problem}; {what}. {fix}")

    def short(self) -> str:
        """'dcp/__0_0.distcp: truncated (...)', for a notice that names the checkpoint itself."""
        return f"{self.file}: {self.problem}"


def checkpoint_step(ckpt: Path | str) -> int:
    """The step of a checkpoint folder step_<N> (also step_<N>.suspect / .corrupt, one set aside);
    ValueError for any other name."""
    m = STEP_RE.match(Path(ckpt).name.split(".", 1)[0])
    if m is None:
        raise ValueError(f"{ckpt}: not a checkpoint folder (step_<N>)")
    return int(m.group(1))


def _earlier(ckpt: Path) -> str:
    """', such as <the newest complete checkpoint before ckpt>,' or '' when there is none (any command's way to
    name a checkpoint: --checkpoint, kiln average's arguments, run.init_from)."""
    try:
        step: int | None = checkpoint_step(ckpt)
    except ValueError:
        step = None
    older = sorted((checkpoint_step(p), p) for p in ckpt.parent.glob("step_*")
                   if STEP_RE.match(p.name) and (p / MARKER).is_file() and (step is None or checkpoint_step(p) < step))
    return f", such as {older[-1][1]}," if older else ""


def _hash_mapped(path: Path) -> str:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_128(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return xxhash.xxh3_128(m).hexdigest()


def _hash_read(path: Path) -> str:
    h, buf = xxhash.xxh3_128(), bytearray(READ_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


def _threads(n_files: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, n_files))


def digest_files(root: Path, *, skip: Collection[str] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: {"size": bytes, ALGO: hex}} for every file under `root` except `skip` and the
    marker; for files just written (hashed from the page cache, several in parallel)."""
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    rels = [r for r in rels if r not in skip and r != MARKER]
    with ThreadPoolExecutor(_threads(len(rels))) as pool:
        sums = list(pool.map(lambda r: _hash_mapped(root / r), rels))
    return {r: {"size": (root / r).stat().st_size, ALGO: s} for r, s in zip(rels, sums)}


class _Summing:
    """A write-only stream that checksums the bytes passing through it. DCP and torch.save write
    sequentially; a seek marks the sum unusable (the file is then hashed from disk instead)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.hash, self.size, self.sequential = raw, xxhash.xxh3_128(), 0, True

    def write(self, b: Any) -> int:
        view = memoryview(b)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = self.raw.write(view)
        self.hash.update(view[:n])
        self.size += n
        return n

    def seek(self, *args: Any) -> int:
        self.sequential = False
        return self.raw.seek(*args)

    def __getattr__(self, name: str) -> Any:  # tell, fileno, flush, close, ...
        return getattr(self.raw, name)


@functools.cache
def _writer_class() -> type:
    # DCP is imported when the first checkpoint is written (its import takes ~2 s)
    from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter

    class SummingFileSystem(FileSystem):
        def __init__(self) -> None:
            super().__init__()
            self.sums: dict[str, dict[str, Any]] = {}

        @contextmanager
        def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
            with super().create_stream(path, mode) as raw:
                if "w" not in mode:
                    yield raw
                    return
                stream = _Summing(raw)
                yield stream
            if stream.sequential:
                self.sums[Path(path).name] = {"size": stream.size, ALGO: stream.hash.hexdigest()}

    class SummingWriter(FileSystemWriter):
        def __init__(self, path: str) -> None:
            super().__init__(path)
            self.fs = SummingFileSystem()

        def write_data(self, plan: Any, planner: Any) -> Any:
            done = super().write_data(plan, planner)  # written by now (DCP's file writer is synchronous)
            mine = {k: v for k, v in self.fs.sums.items() if k.startswith(plan.storage_data.prefix)}
            (Path(self.path) / f"{plan.storage_data.prefix}{SUMS_SUFFIX}").write_text(json.dumps(mine))
            return done  # before the coordinator finishes, so rank 0 finds every rank's sums

    return SummingWriter


def summing_writer(path: Path) -> Any:
    """DCP's FileSystemWriter for `path`, checksumming each shard as it writes it and leaving this
    rank's sums in `path/<prefix>.sums.json` before its part of the save is reported done."""
    return _writer_class()(str(path))


def collect_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """Rank 0, once every rank's files are written: every file's size and checksum. Shard sums come
    from the writers' sums files (merged, then removed; a sum is used only where the file still has
    the size it was hashed at); everything else is hashed now."""
    known: dict[str, dict[str, Any]] = {}
    for sums in sorted(folder.rglob(f"*{SUMS_SUFFIX}")):
        for name, entry in json.loads(sums.read_text()).items():
            rel = (sums.parent / name).relative_to(folder).as_posix()
            if (folder / rel).is_file() and (folder / rel).stat().st_size == entry.get("size"):
                known[rel] = entry
        sums.unlink()
    return {**known, **digest_files(folder, skip=set(known))}


def list_digest(files: dict[str, dict[str, Any]]) -> str:
    """The checksum of the file list itself, so a damaged marker is told apart from a damaged file."""
    return xxhash.xxh3_128(json.dumps(files, sort_keys=True).encode()).hexdigest()


def marker_digest(meta: dict[str, Any]) -> str:
    """The checksum of every other field of `meta.json` (step, tokens, eval scores, the tokenizer's digest), so an
    edited or bit-flipped number is told apart from the truth: `meta_checksum`, in checkpoints since it existed."""
    rest = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return xxhash.xxh3_128(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def marker_fields(files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What `meta.json` carries for `verify`."""
    return {"checksum": ALGO, "files": files, "files_checksum": list_digest(files)}


def read_marker(ckpt: Path) -> dict[str, Any]:
    """meta.json as a dict; DamagedCheckpoint when it is missing or garbled."""
    path = Path(ckpt) / MARKER
    if not path.is_file():
        raise DamagedCheckpoint(ckpt, MARKER, "not a file" if path.exists() else "missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DamagedCheckpoint(ckpt, MARKER, f"garbled (not readable JSON: {str(e).splitlines()[0][:80]})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(ckpt, MARKER, "garbled (not a JSON object)")
    return meta


def _stats(ckpt: Path, rels: Collection[str]) -> tuple[Any, ...]:
    out = []
    for r in [MARKER, *rels]:
        s = (ckpt / r).stat()
        out.append((r, s.st_size, s.st_mtime_ns, s.st_ino))
    return tuple(out)


def verify(ckpt: Path) -> bool:
    """Check every file listed in `ckpt`'s marker against its saved size and checksum, or raise
    DamagedCheckpoint naming the first that differs. True when verified; False for a checkpoint
    written before checksums existed, which loads unchecked (said once on stderr). Remembered per
    process until a file's size or mtime changes, so the several loads of one command hash once."""
    ckpt, key = Path(ckpt), str(Path(ckpt).resolve())
    meta = read_marker(ckpt)
    files = meta.get("files")
    if files is None and "checksum" not in meta:
        if "kiln_version" not in meta:  # every kiln wrote it: `{}` or another file's JSON is no older checkpoint
            raise DamagedCheckpoint(ckpt, MARKER, "garbled (no list of files, and no kiln_version of an older kiln)")
        if key not in _unverifiable:
            _unverifiable.add(key)
            print(f"note: {ckpt} was written before kiln checkpoints carried checksums, so it cannot be verified; "
                  "loading it unchecked (re-save it with this kiln to protect it)", file=sys.stderr)
        return False
    if not isinstance(files, dict) or meta.get("checksum") != ALGO or meta.get("files_checksum") != list_digest(files):
        raise DamagedCheckpoint(ckpt, MARKER, "garbled (its list of files does not match its own checksum)")
    if "meta_checksum" in meta and meta["meta_checksum"] != marker_digest(meta):
        raise DamagedCheckpoint(ckpt, MARKER, "garbled (its step, counts or scores do not match its own checksum)")
    rels = sorted(files)
    for r in rels:  # sizes first: cheap, and they catch truncation and deletion without reading anything
        want = files[r].get("size")
        path = ckpt / r
        if not path.is_file():
            raise DamagedCheckpoint(ckpt, r, f"missing (meta.json lists it with {want} bytes)")
        have = path.stat().st_size
        if have != want:
            what = "truncated" if isinstance(want, int) and have < want else "wrong size"
            raise DamagedCheckpoint(ckpt, r, f"{what} ({have} bytes, saved with {want})")
    stats = _stats(ckpt, rels)
    if _verified.get(key) == stats:
        return True
    with ThreadPoolExecutor(_threads(len(rels))) as pool:
        sums = list(pool.map(lambda r: _read_sum(ckpt, r), rels))
    for r, s in zip(rels, sums):
        if s != files[r].get(ALGO):
            raise DamagedCheckpoint(ckpt, r, f"checksum mismatch ({ALGO} {s}, saved as {files[r].get(ALGO)}): "
                                             "its bytes changed since the save")
    _verified[key] = stats
    return True


def _read_sum(ckpt: Path, rel: str) -> str:
    try:
        return _hash_read(ckpt / rel)
    except PermissionError:  # not damage: a resume must not set the checkpoint aside as corrupt
        raise CheckpointError(f"{ckpt / rel}: not readable by this user (permission denied); fix its permissions "
                              "(chmod / chown) and run the same command again") from None
    except OSError as e:
        raise DamagedCheckpoint(ckpt, rel, f"unreadable ({e.strerror or e})") from None


# ---- failed writes -----------------------------------------------------------------------------


def _chain(e: BaseException) -> list[BaseException]:
    """e, its causes and contexts, and the per-rank failures inside DCP's CheckpointException."""
    seen: list[BaseException] = []
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or any(x is s for s in seen):
            continue
        seen.append(x)
        todo += [x.__cause__, x.__context__]
        for failure in (getattr(x, "failures", None) or {}).values():
            inner = failure[0] if isinstance(failure, tuple) else getattr(failure, "exc", failure)
            if isinstance(inner, BaseException):
                todo.append(inner)
    return seen


def free_bytes(path: Path) -> int:
    """Bytes this process may still write on `path`'s file system (root may use the reserved blocks)."""
    st = os.statvfs(path)
    return st.f_frsize * (st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail)


def _full_error(where: Path, detail: str = "") -> CheckpointError:
    return CheckpointError(f"{where}: cannot write the checkpoint (the disk is full{detail}); earlier checkpoints are "
                           "untouched. Free space, lower train.keep_last (the oldest checkpoint goes only after a new "
                           "one is written: keep_last N needs room for N + 1) or set run.out_dir elsewhere, and run "
                           "the same command to resume")


def _local_bytes(tree: Any) -> int:
    """Bytes of this rank's tensors in a (nested) state dict: a DTensor counts its local shard."""
    if isinstance(tree, dict):
        return sum(_local_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_local_bytes(v) for v in tree)
    local = tree.to_local() if hasattr(tree, "to_local") else tree
    return local.numel() * local.element_size() if hasattr(local, "element_size") else 0


def check_room(where: Path, state: dict[str, Any]) -> None:
    """Refuse a save that cannot fit before writing a byte of it: this rank's tensors need at least
    their size on `where`'s file system (a doomed write would fill the disk for every other writer
    meanwhile: the run's logs, an asynchronous save's training steps, other processes). File systems
    that report no size (some FUSE mounts) are not checked; a write that fails anyway is `write_error`'s."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st, free = os.statvfs(probe), free_bytes(probe)
    except OSError:
        return
    need = _local_bytes(state)
    if st.f_blocks > 0 and free < need:
        raise _full_error(Path(where), f": the checkpoint needs {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")


def write_error(e: BaseException, where: Path) -> CheckpointError | None:
    """The one-line error for a checkpoint write that failed with `e`, or None when the failure is not
    about storage (re-raise it). Call it before removing the temporary folder: its files are what filled
    the disk."""
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return None
    oserrors = [x for x in _chain(e) if isinstance(x, OSError)]
    full = any(x.errno in _FULL for x in oserrors)
    if not full and not oserrors:
        try:
            full = free_bytes(where) < LOW_SPACE
        except OSError:
            return None
    if not full and not oserrors:
        return None
    if full:
        return _full_error(where)
    reason = oserrors[0].strerror or str(oserrors[0])
    return CheckpointError(f"{where}: cannot write the checkpoint ({reason}); earlier checkpoints are untouched. "
                           "Fix that (or set run.out_dir elsewhere) and run the same command to resume")
