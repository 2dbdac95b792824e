"""Deterministic, resumable, rank- and worker-disjoint packed batches from weighted text sources.

`PackedLoader` is the training batch source of one data-parallel rank (kiln.data.batchsource's contract:
next_batch(), state_dict(), load_state_dict()). It runs the text pipeline of
kiln.data.mixing in max(num_workers, 1) shards per rank:
  * num_workers=0: one shard, in this process;
  * num_workers=N: N shards, one per torch DataLoader worker process, tokenizing in parallel. The
    DataLoader reads its workers round robin, in order, so batch k of this rank comes from worker
    k mod N. Each batch travels with its worker's state after producing it; this process keeps the
    latest state of every worker and the count of batches consumed. A resumed loader restarts each
    worker from its own state and rotates the workers so that the one due next is read first.
Each shard shuffles its packed rows in seeded windows of `row_shuffle` rows (kiln.data.rowshuffle), so
a batch holds rows of many documents, not consecutive rows of one; shards stay disjoint.
The order of batches depends on the number of shards (ranks x max(num_workers, 1)): resuming text
sources with another data-parallel size or another num_workers raises a DataError that says so, as
does another tokenizer (by tokenizer_digest) or changed files (names and document counts; for
streams, names, sizes and mtimes).
Pre-tokenized shards (kiln.data.shards) resume exactly under any of them.

Batches are pinned (page-locked) when CUDA is available, so `.to(device, non_blocking=True)` overlaps
the copy with compute.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from kiln.config import OnExhausted, Remainder, SourceConfig
from kiln.data.batchsource import BatchSource
from kiln.data.mixing import ROW_SHUFFLE, TextStream
from kiln.data.packing import Batch, Packer, batch_from_arrays, make_batch
from kiln.data.sources import load_documents, open_stream, stream_error
from kiln.data.tokenizer import Tokenizer, tokenizer_digest
from kiln.errors import DataError, KilnError
from kiln.paths import absolute_if_local

STATE_VERSION = 3  # 3: the tokenizer's digest; streams' file sizes and mtimes; skip/take by document

# A job runs in a worker: job(worker, num_workers) yields (arrays, state after the batch), forever; arrays
# are (B, T+1) int32 tokens and doc ids (packing.stack_rows), made into a Batch in the main process.
Arrays = tuple[np.ndarray, np.ndarray]
Job = Callable[[int, int], Iterator[tuple[Arrays, Any]]]


def _identity(x: Any) -> Any:
    return x


def _init_worker(_: int) -> None:
    import os
    import sys

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; N workers use N cores
    torch.set_num_threads(1)
    if "fsspec" in sys.modules:  # datasets streaming used fsspec before the fork: its IO thread and lock
        import fsspec.asyn  # stayed in the parent, and the forked worker hangs at exit on them (as datasets

        fsspec.asyn.reset_lock()  # itself does in its DataLoader workers)


class _Failure:
    """A user error raised in a worker, sent to the main process to be raised there as one line."""

    def __init__(self, cls: type, message: str) -> None:
        self.cls, self.message = cls, message


class _JobDataset(torch.utils.data.IterableDataset):
    """DataLoader worker w runs job((w + first) mod N): rotating lets a resume start with any worker."""

    def __init__(self, job: Job, num_workers: int, first: int) -> None:
        self.job, self.num_workers, self.first = job, num_workers, first

    def __iter__(self) -> Iterator[tuple[int, Any, Any]]:
        info = torch.utils.data.get_worker_info()
        assert info is not None and info.num_workers == self.num_workers
        logical = (info.id + self.first) % self.num_workers
        try:
            for batch, state in self.job(logical, self.num_workers):
                yield logical, batch, state
        except KilnError as e:  # DataLoader would re-raise it with the worker's traceback as the message
            yield logical, _Failure(type(e), str(e)), None


class WorkerPool:
    """`num_workers` DataLoader processes running `job`, read round robin, starting with worker `first`."""

    def __init__(self, job: Job, *, num_workers: int, first: int = 0, pin_memory: bool = False) -> None:
        assert num_workers > 0
        self.num_workers, self._expect, self._pin = num_workers, first, pin_memory
        self._loader = torch.utils.data.DataLoader(
            _JobDataset(job, num_workers, first), batch_size=None, num_workers=num_workers, collate_fn=_identity,
            worker_init_fn=_init_worker, prefetch_factor=4)
        self._it: Any = iter(self._loader)

    def next(self) -> tuple[int, Batch, Any]:
        """(worker, batch, the worker's state after it), in round robin order."""
        worker, arrays, state = next(self._it)
        if isinstance(arrays, _Failure):
            raise arrays.cls(arrays.message)
        assert worker == self._expect, (worker, self._expect)  # DataLoader keeps the round robin order
        self._expect = (worker + 1) % self.num_workers
        batch = batch_from_arrays(*arrays)
        return worker, batch.pin_memory() if self._pin else batch, state

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = None


def pin_default() -> bool:
    return torch.cuda.is_available()


class _TextJob:
    """Picklable worker job: build this rank's shard for the worker and run it from its saved state."""

    def __init__(self, args: dict[str, Any], rank: int, states: list[Any]) -> None:
        self.args, self.rank, self.states = args, rank, states

    def __call__(self, worker: int, num_workers: int) -> Iterator[tuple[Arrays, Any]]:
        stream = TextStream(**self.args, shard=self.rank * num_workers + worker)
        if self.states[worker] is not None:
            stream.load_state_dict(self.states[worker])
        while True:
            arrays = stream.next_arrays()
            yield arrays, stream.state_dict()


class PooledLoader(BatchSource):
    """Base of the loaders that may own a WorkerPool (`self._pool`): stopping it, also on collection."""

    _pool: WorkerPool | None = None

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage collected)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the pool may already be gone
            pass


class PackedLoader(PooledLoader):
    """Endless packed (batch_size, seq_len) batches over weighted text sources for one rank. Stateful."""

    def __init__(self, sources: list[SourceConfig], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1, encode_batch: int = 64,
                 num_workers: int = 0, shuffle_buffer: int = 10000, row_shuffle: int = ROW_SHUFFLE,
                 remainder: Remainder = "carry", on_exhausted: OnExhausted = "cycle",
                 pin_memory: bool | None = None) -> None:
        assert 0 <= rank < world_size and num_workers >= 0
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.seq_len, self.num_workers = seq_len, num_workers
        # what decides the rows besides the sources (encode_batch does not: any value resumes exactly)
        self.layout = {"remainder": remainder, "on_exhausted": on_exhausted, "shuffle_buffer": shuffle_buffer,
                       "row_shuffle": row_shuffle if shuffle and row_shuffle > 1 else 0, "tokenizer": tokenizer_digest(tokenizer)}
        self.tokenizer_name = tokenizer.name
        n = max(1, num_workers)
        self._args = {"sources": sources, "tokenizer": tokenizer, "seq_len": seq_len, "batch_size": batch_size,
                      "seed": seed, "shuffle": shuffle, "num_shards": world_size * n, "encode_batch": encode_batch,
                      "shuffle_buffer": shuffle_buffer, "row_shuffle": row_shuffle, "remainder": remainder,
                      "on_exhausted": on_exhausted}
        # this rank's first shard, built here so that source errors surface in this process;
        # with num_workers=0 it is the loader itself
        self._local = TextStream(**self._args, shard=rank * n)
        self.sources = self._local.docs
        self._pin = pin_default() if pin_memory is None else pin_memory
        self._states: list[Any] = [None] * n
        self._consumed = 0
        self._pool: WorkerPool | None = None

    @property
    def epoch(self) -> int:
        """Fewest passes completed by any shard of this rank (0 during the first pass)."""
        if self.num_workers == 0:
            return self._local.epoch
        return min((s["epoch"] for s in self._states if s is not None), default=0)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> Batch:
        """The next (batch_size, seq_len) batch of this rank."""
        if self.num_workers == 0:
            batch = self._local.next_batch()
            if self._pin:
                batch = batch.pin_memory()
        else:
            if self._pool is None:  # started lazily: after load_state_dict (litgpt #1712)
                job = _TextJob(self._args, self.rank, list(self._states))
                self._pool = WorkerPool(job, num_workers=self.num_workers, first=self._consumed % self.num_workers,
                                        pin_memory=self._pin)
            worker, batch, state = self._pool.next()
            self._states[worker] = state
        self._consumed += 1
        return batch

    # ---- Stateful ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain python data: layout, data identity, batches consumed, every shard's state."""
        workers = [self._local.state_dict()] if self.num_workers == 0 else list(self._states)
        return {"version": STATE_VERSION, "kind": "text", "seed": self.seed, "shuffle": self.shuffle,
                "rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
                "seq_len": self.seq_len, **self.layout, "sources": [d.identity() for d in self.sources],
                "consumed": self._consumed, "workers": workers}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue exactly where the saved loader stopped; DataError if the data or the layout changed.

        `state` is this rank's state, or the list of every rank's states (this rank's is taken)."""
        if isinstance(state, list):
            state = state[self.rank] if len(state) == self.world_size else state[0]
        if state.get("kind") == "shards":
            raise DataError("the checkpoint's data position is for pre-tokenized shards (data.format=shards); "
                            "this run reads text sources: use the same data.format, or pass --fresh")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}; pass --fresh")
        saved = (state["world_size"], state["num_workers"])
        if saved != (self.world_size, self.num_workers):
            raise DataError(
                f"data position was saved with {saved[0]} data-parallel rank{'s' if saved[0] != 1 else ''} x "
                f"data.num_workers={saved[1]}, this "
                f"run has {self.world_size} x {self.num_workers}; text sources resume exactly only on the same "
                "layout: use the same sizes, pre-tokenize with `kiln data prepare` (shards resume on any), or "
                "pass --fresh")
        if state["rank"] != self.rank:
            raise DataError(f"data position of rank {state['rank']} loaded on rank {self.rank}")
        if state["tokenizer"] != self.layout["tokenizer"]:
            raise DataError(f"data position was saved with another tokenizer (digest {state['tokenizer'][:12]}), this "
                            f"run's data.tokenizer '{self.tokenizer_name}' has digest {self.layout['tokenizer'][:12]}; "
                            "resume with the same data.tokenizer, or pass --fresh")
        for key, now in {"seed": self.seed, "shuffle": self.shuffle, "seq_len": self.seq_len, **self.layout}.items():
            old = state.get(key, 0 if key == "row_shuffle" else None)  # states before the row shuffle: none
            if old != now:
                name = {"seed": "run.seed", "seq_len": "train.seq_len"}.get(key, f"data.{key}")
                raise DataError(f"data position was saved with {name}={old!r}, this run has {now!r}; "
                                "resume with the same value, or pass --fresh")
        saved_src = state["sources"]
        if [absolute_if_local(s["path"]) for s in saved_src] != [absolute_if_local(d.cfg.path) for d in self.sources]:
            raise DataError(f"data sources changed under a resume: saved {[s['path'] for s in saved_src]}, "
                            f"now {[absolute_if_local(d.cfg.path) for d in self.sources]}; train on the same "
                            "sources (data.stages changes a mix at set points), or pass --fresh")
        for old, src in zip(saved_src, self.sources):
            now = src.identity()
            if old["files"] != now["files"] or old["documents"] != now["documents"]:
                what = (f"{len(old['files'])} files, {old['documents']} documents; now {len(now['files'])} files, "
                        f"{now['documents']} documents" if old["documents"] is not None else
                        f"{len(old['files'])} files; now {len(now['files'])}, or their sizes or times changed")
                raise DataError(f"{src.cfg.path}: data changed under a resume (was {what}); restore the data or "
                                "pass --fresh")
        moved = [f"{d.cfg.path} {s['weight']:g} -> {d.cfg.weight:g}" for s, d in zip(saved_src, self.sources)
                 if "weight" in s and s["weight"] != d.cfg.weight]  # positions saved before weights were: unknown
        if moved and self.rank == 0:  # allowed (the mix follows the new weights), but said: it was silent
            print(f"note: data.train weights changed since the checkpoint ({', '.join(moved)}): the mix follows the "
                  "new weights from this step on (data.stages sets such changes in advance)", file=sys.stderr)
        self.close()
        self._consumed = int(state["consumed"])
        if self.num_workers == 0:
            self._local.load_state_dict(state["workers"][0])
        else:
            self._states = list(state["workers"])


def validation_batches(src: SourceConfig, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                       max_tokens: int) -> list[Batch]:
    """Fixed evaluation batches: the first documents in file order, packed as in training.

    At most max(max_tokens, seq_len) input tokens in full (B, seq_len) batches, the last one
    possibly smaller in B. If the source runs out first, its remainder is scored as one extra
    (1, t) batch with t < seq_len, so even a text shorter than one row gets scored. Never padded.
    """
    want = max(1, max_tokens // seq_len)
    packer = Packer(seq_len=seq_len, eos_id=tokenizer.eos_id)
    rows = []
    for texts in _doc_chunks(src, 64):
        packer.add(tokenizer.encode_batch([t or "" for t in texts]))
        while packer.ready and len(rows) < want:
            rows.append(packer.pop_row())
        if len(rows) == want:
            break
    return finish_validation(rows, packer.tail() if len(rows) < want else None, seq_len=seq_len,
                             batch_size=batch_size, max_tokens=max_tokens, where=src.path)


def _doc_chunks(src: SourceConfig, step: int) -> Iterator[list[str]]:
    """The source's documents in order, `step` at a time (a stream is read only as far as needed)."""
    if not src.streaming:
        ds = load_documents(src)
        for start in range(0, len(ds), step):
            yield ds[start:start + step]["text"]
        return
    chunk: list[str] = []
    try:
        for ex in open_stream(src):
            chunk.append(ex["text"])
            if len(chunk) == step:
                yield chunk
                chunk = []
    except DataError:
        raise
    except Exception as e:
        raise stream_error(e, src) from None
    if chunk:
        yield chunk


def finish_validation(rows: list, tail: Any, *, seq_len: int, batch_size: int, max_tokens: int,
                      where: str) -> list[Batch]:
    """Full rows in batches of batch_size, plus the source's remainder as one short (1, t) batch."""
    batches = [make_batch(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    if tail is not None:
        budget = max(max_tokens - len(rows) * seq_len, 0 if rows else 1)
        if budget > 0:
            tail.tokens, tail.doc_ids = tail.tokens[:budget + 1], tail.doc_ids[:budget + 1]
            batches.append(make_batch([tail]))
    if not batches:
        raise DataError(f"{where}: no tokens to evaluate")
    return batches
