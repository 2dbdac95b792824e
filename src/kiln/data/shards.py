"""Pre-tokenized shards: the on-disk format of `kiln data prepare`, and training / validation from it.

A prepared folder holds, per shard k (a run of consecutive documents of one source):
    shard-0000k.bin       the documents' tokens, each followed by EOS (the packer's stream), raw
                          little-endian uint16 when the vocabulary fits (<= 65536 ids), else uint32
    shard-0000k.idx.npy   int64 (documents + 1,) offsets: document i is bin[idx[i]:idx[i+1]] (EOS included)
    shard-0000k.json      the shard's record (counts, sha256), written last: the shard is complete
plus plan.json (what was asked) and manifest.json (plan + every shard's record, written when all
shards are done). Files are read through np.memmap: nothing is loaded into memory.

Training (`ShardLoader`): a folder is one source, its tokens one stream. Blocks are seq_len + 1
tokens at stride seq_len over that stream (packing.py's convention; doc ids from the index), and the
samples form one global sequence g = 0, 1, 2, ... decided by the seed alone:
  * source of sample g: a counter-based uniform draw hash(seed, g) against the weights (one source:
    always 0), so the draw of a position never depends on who reads it;
  * the k-th sample of source i is block perm_{i,e}(k mod n_i) of epoch e = k // n_i, where perm is
    a seeded pseudo-random permutation of the n_i blocks computed on the fly (`Permutation`: a
    Feistel network, O(1) memory, no array of n_i indices).
With W data-parallel ranks and micro-batch B, the ranks read the sequence in rounds of W x B
positions; rank r takes positions r, r + W, ..., r + (B - 1) W of each round. All ranks consume
whole rounds, so the loader state is global: (cursor, samples taken per source), the same on every
rank. A run resumed with another W (or B, or num_workers) continues the same global sequence, so
with the same train.global_batch_size every optimizer step sees the same samples.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kiln.config import SourceConfig
from kiln.data.loader import PooledLoader, WorkerPool, finish_validation, pin_default
from kiln.data.packing import Batch, Row, batch_from_arrays
from kiln.data.perm import Permutation, mix_key, uniform
from kiln.data.tokenizer import Tokenizer, tokenizer_digest
from kiln.errors import DataError, first_line

FORMAT, VERSION = "kiln-shards", 2  # 2: tokenizer_sha256 is tokenizer.tokenizer_digest (vocab, merges, added)
MANIFEST, PLAN = "manifest.json", "plan.json"
STATE_VERSION = 2
AHEAD = 64  # rounds of the global order planned at once
MAX_OPEN = 256  # memory-mapped shard files (tokens or index) kept open per ShardSet


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_stem(k: int) -> str:
    return f"shard-{k:05d}"


# ---- reading a prepared folder ---------------------------------------------------------------


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a prepared folder; DataError (one line) if it is missing, unfinished or foreign."""
    d = Path(path).expanduser()
    if d.is_file():  # a text source where a prepared folder goes (kiln data inspect a.jsonl)
        raise DataError(f"{path}: a file, not a prepared folder; prepare one from it with `kiln data prepare --source "
                        f"{path} --out DIR` (`kiln data verify {path}` checks the text itself)")
    if not d.is_dir():
        raise DataError(f"{path}: no such folder; prepare one with `kiln data prepare --source ... --out {path}`")
    f = d / MANIFEST
    if not f.is_file():
        if (d / PLAN).is_file():
            raise DataError(f"{path}: `kiln data prepare` did not finish here; run the same command again to resume")
        raise DataError(f"{path}: not a prepared folder (no {MANIFEST}); prepare it with `kiln data prepare`")
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{f}: unreadable manifest ({e}); prepare the folder again") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise DataError(f"{f}: format {m.get('format')!r} version {m.get('version')!r} is not {FORMAT} {VERSION}; "
                        "prepare the folder again with this kiln")
    return m


class ShardSet:
    """A prepared folder as one memory-mapped token stream with document boundaries."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.dtype = np.dtype(m["dtype"])
        self.eos_id, self.vocab_size = int(m["eos_id"]), int(m["vocab_size"])
        self.records = m["shards"]
        sizes = [int(r["tokens"]) for r in self.records]
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (S+1,) global token offsets
        self.n_tokens = int(self.bounds[-1])
        self.n_docs = int(sum(int(r["documents"]) for r in self.records))
        self._open: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()  # LRU of mapped files, see _mapped
        for r in self.records:  # sizes are checked up front; contents by `kiln data verify`
            f = self.path / r["file"]
            for g in (f, self.path / r["index"]):
                if not g.is_file():
                    raise DataError(f"{g}: shard file missing; prepare the folder again")
            if f.stat().st_size != int(r["tokens"]) * self.dtype.itemsize:
                raise DataError(f"{f}: {f.stat().st_size} bytes, the manifest says {int(r['tokens'])} tokens of "
                                f"{self.dtype.name}; the file is truncated or replaced: prepare the folder again")

    def __getstate__(self) -> dict[str, Any]:
        # sent to spawned DataLoader workers: reopen the memmaps there instead of pickling their contents
        return {**self.__dict__, "_open": OrderedDict()}

    def identity(self) -> dict[str, Any]:
        digest = hashlib.sha256("".join(r["sha256"] for r in self.records).encode()).hexdigest()[:16]
        return {"path": str(self.path), "tokens": self.n_tokens, "documents": self.n_docs, "digest": digest}

    def _mapped(self, kind: str, k: int) -> np.ndarray:
        """Shard k's tokens or index, memory-mapped. At most MAX_OPEN files stay mapped, least recently used
        dropped first: every mapping holds a file descriptor, and a folder may hold more shards than the
        process may open files. Dropping one only unmaps it once no array returned from it is alive."""
        key = (kind, k)
        arr = self._open.get(key)
        if arr is not None:
            self._open.move_to_end(key)
            return arr
        r = self.records[k]
        if kind == "idx":
            f = self.path / r["index"]
            try:
                arr = np.load(f, mmap_mode="r").view(np.ndarray)
            except (ValueError, OSError) as e:  # a cut or overwritten .npy: its header or data does not read
                raise DataError(f"{f}: unreadable ({first_line(e)}); the file is truncated or replaced: prepare the "
                                "folder again") from None
            if arr.shape != (int(r["documents"]) + 1,):
                raise DataError(f"{f}: {arr.shape[0] if arr.ndim == 1 else arr.shape} offsets, the manifest says "
                                f"{int(r['documents'])} documents (+1); the file is truncated or replaced: prepare the "
                                "folder again")
        elif not int(r["tokens"]):
            arr = np.zeros(0, dtype=self.dtype)  # a shard of empty documents: mmap refuses 0 bytes
        else:  # a plain ndarray view of the memmap: slicing a np.memmap costs a Python-level finalizer per slice
            arr = np.memmap(self.path / r["file"], dtype=self.dtype, mode="r").view(np.ndarray)
        self._open[key] = arr
        while len(self._open) > MAX_OPEN:
            self._open.popitem(last=False)
        return arr

    def tokens(self, k: int) -> np.ndarray:
        """(tokens,) shard k's token stream (memory-mapped)."""
        return self._mapped("tok", k)

    def index(self, k: int) -> np.ndarray:
        """(documents + 1,) shard k's document offsets (memory-mapped)."""
        return self._mapped("idx", k)

    def _shards_over(self, lo: int, hi: int) -> range:
        """Shards holding any token of [lo, hi)."""
        first = int(np.searchsorted(self.bounds, lo, side="right")) - 1
        last = int(np.searchsorted(self.bounds, hi - 1, side="right")) - 1
        return range(max(first, 0), min(last, len(self.records) - 1) + 1)

    def read(self, start: int, n: int) -> np.ndarray:
        """(n,) tokens [start, start + n) of the stream, across shard boundaries (a copy)."""
        assert 0 <= start and start + n <= self.n_tokens
        parts = []
        for k in self._shards_over(start, start + n):
            base = int(self.bounds[k])
            a, b = max(start - base, 0), min(start + n - base, int(self.bounds[k + 1]) - base)
            if b > a:
                parts.append(self.tokens(k)[a:b])
                if (top := int(parts[-1].max())) >= self.vocab_size:  # an overwritten shard: an embedding IndexError
                    raise DataError(f"{self.path / self.records[k]['file']}: token id {top} >= the vocabulary's "
                                    f"{self.vocab_size}; the shard is damaged: `kiln data verify {self.path}` checks "
                                    "every shard, or prepare the folder again")
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def doc_starts(self, lo: int, hi: int) -> np.ndarray:
        """Global positions p of document starts with lo < p <= hi."""
        out = []
        for k in self._shards_over(lo + 1, hi + 1):
            base = int(self.bounds[k])
            starts = self.index(k)[:-1]  # the last offset is the next shard's first start
            a = int(np.searchsorted(starts, lo - base, side="right"))
            b = int(np.searchsorted(starts, hi - base, side="right"))
            if b > a:
                out.append(np.asarray(starts[a:b], dtype=np.int64) + base)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def row(self, start: int, length: int) -> Row:
        """`length` tokens from `start` with doc ids relative to the row (packing.py's convention)."""
        tok = self.read(start, length).astype(np.int64)
        starts = self.doc_starts(start, start + length - 1) - start
        doc = np.searchsorted(starts, np.arange(length), side="right").astype(np.int32)
        return Row(tokens=tok, doc_ids=doc)

    def source_ranges(self) -> list[tuple[str, int, int]]:
        """(name, first token, end token) of each source the folder was prepared from."""
        out = []
        for s in self.manifest["sources"]:
            ks = s["shards"]
            out.append((s["name"], int(self.bounds[ks[0]]), int(self.bounds[ks[-1] + 1])) if ks else (s["name"], 0, 0))
        return out


def check_tokenizer(shards: ShardSet, tokenizer: Tokenizer) -> None:
    """The folder must have been prepared with the tokenizer this run trains with."""
    check_manifest_tokenizer(shards.path, shards.manifest, tokenizer)


def check_manifest_tokenizer(path: str | Path, m: dict[str, Any], tokenizer: Tokenizer) -> None:
    """check_tokenizer from a folder's manifest alone (read_manifest), without opening its shards."""
    now = tokenizer_digest(tokenizer)
    if m["tokenizer_sha256"] != now:
        raise DataError(f"{path}: prepared with tokenizer '{m['tokenizer']}' (digest {m['tokenizer_sha256'][:12]}); "
                        f"this run's tokenizer '{tokenizer.name}' has digest {now[:12]}: the digest differs (another "
                        "vocabulary, merges or added tokens); set data.tokenizer to the one it was prepared with, or "
                        "prepare the data again")


# ---- training --------------------------------------------------------------------------------


class BlockOrder:
    """The global sample sequence of weighted prepared folders: position -> (source, block)."""

    def __init__(self, blocks: list[int], weights: list[float], *, seed: int, shuffle: bool) -> None:
        self.blocks = np.asarray(blocks, dtype=np.int64)  # (S,) blocks per source
        w = np.asarray(weights, dtype=np.float64)
        self.cdf = np.cumsum(w / w.sum())
        self.seed, self.shuffle = seed, shuffle
        self._draw_key = mix_key(seed, 7)
        self._perms: dict[tuple[int, int], Permutation] = {}

    def sources(self, positions: np.ndarray) -> np.ndarray:
        if len(self.blocks) == 1:
            return np.zeros(len(positions), dtype=np.int64)
        u = uniform(self._draw_key, positions)
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.blocks) - 1)

    def assign(self, start: int, n: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions [start, start + n), given samples taken per source before `start`:
        (n,) source, (n,) block, and the counts after these positions."""
        src = self.sources(np.arange(start, start + n, dtype=np.int64))
        k = np.empty(n, dtype=np.int64)
        after = np.array(counts, dtype=np.int64)
        for i in range(len(self.blocks)):
            m = src == i
            c = int(m.sum())
            k[m] = after[i] + np.arange(c)
            after[i] += c
        nb = self.blocks[src]
        epoch, within = k // nb, k % nb
        block = within.copy()
        if self.shuffle:
            for i, e in set(zip(src.tolist(), epoch.tolist())):
                m = (src == i) & (epoch == e)
                block[m] = self.perm(i, e)(within[m])
        return src, block, after

    def perm(self, source: int, epoch: int) -> Permutation:
        if (source, epoch) not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[(source, epoch)] = Permutation(int(self.blocks[source]), mix_key(self.seed, 3, source, epoch))
        return self._perms[(source, epoch)]


def rank_positions(rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Offsets within a round of world_size x batch_size positions that `rank` reads."""
    return rank + world_size * np.arange(batch_size)


class Rounds:
    """Reads one rank's rows of the global order, round by round (shared by the loader and its workers;
    it holds no reference to the loader, so a dropped loader is freed at once and its workers stop)."""

    def __init__(self, sets: list[ShardSet], order: BlockOrder, *, seq_len: int, batch_size: int, rank: int,
                 world_size: int) -> None:
        self.sets, self.order, self.seq_len, self.batch_size = sets, order, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        # planned rounds: (first cursor, counts there, (AHEAD*n,) sources, blocks, (AHEAD, S) counts after each)
        self._ahead: tuple = (0, None, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), None)

    def round(self, cursor: int, counts: np.ndarray, *, materialize: bool = True
              ) -> tuple[tuple[np.ndarray, np.ndarray] | None, int, np.ndarray]:
        """This rank's batch of the round at `cursor` as (B, T+1) int32 tokens and doc ids, and the
        position after the round."""
        n = self.world_size * self.batch_size
        start, c0, srcs, blocks, ends = self._ahead
        k = (cursor - start) // n
        if not (0 <= cursor - start < len(srcs) and (cursor - start) % n == 0
                and np.array_equal(c0 if k == 0 else ends[k - 1], counts)):
            # plan AHEAD rounds at once: the order is a function of the position, so this equals round by round
            srcs, blocks, _ = self.order.assign(cursor, n * AHEAD, counts)
            per_round = np.stack([np.bincount(srcs[i * n:(i + 1) * n], minlength=len(self.sets))
                                  for i in range(AHEAD)])
            ends = np.asarray(counts, dtype=np.int64) + np.cumsum(per_round, axis=0)  # (AHEAD, S) counts after
            self._ahead, start, c0, k = (cursor, np.asarray(counts).copy(), srcs, blocks, ends), cursor, counts, 0
        after = ends[k].copy()
        if not materialize:
            return None, cursor + n, after
        T = self.seq_len
        pick = k * n + rank_positions(self.rank, self.world_size, self.batch_size)
        tok = np.empty((self.batch_size, T + 1), dtype=np.int32)
        doc = np.empty((self.batch_size, T + 1), dtype=np.int32)
        for j, p in enumerate(pick):
            row = self.sets[int(srcs[p])].row(int(blocks[p]) * T, T + 1)
            tok[j], doc[j] = row.tokens, row.doc_ids
        return (tok, doc), cursor + n, after


class _ShardJob:
    """Worker w of n reads rounds w, w + n, ... counted from the saved position."""

    def __init__(self, rounds: Rounds, cursor: int, counts: list[int]) -> None:
        self.rounds, self.cursor, self.counts = rounds, cursor, counts

    def __call__(self, worker: int, num_workers: int) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], Any]]:
        cursor, counts = self.cursor, np.asarray(self.counts, dtype=np.int64)
        r = 0
        while True:
            mine = r % num_workers == worker
            arrays, cursor, counts = self.rounds.round(cursor, counts, materialize=mine)
            r += 1
            if mine:
                yield arrays, {"cursor": cursor, "counts": counts.tolist()}


class ShardLoader(PooledLoader):
    """Endless (batch_size, seq_len) batches from prepared folders for one data-parallel rank. Stateful."""

    reshards = True  # a global block order: any data-parallel size resumes it

    def __init__(self, sources: list[SourceConfig], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 pin_memory: bool | None = None) -> None:
        if not sources:
            raise DataError("data.train: at least one prepared folder is needed")
        assert 0 <= rank < world_size and seq_len > 0 and batch_size > 0
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.sets = [ShardSet(s.path) for s in sources]
        for s in self.sets:
            check_tokenizer(s, tokenizer)
        blocks = [(s.n_tokens - 1) // seq_len for s in self.sets]
        for s, nb in zip(self.sets, blocks):
            if nb < 1:
                raise DataError(f"{s.path}: {s.n_tokens} tokens, fewer than one block of train.seq_len + 1 = "
                                f"{seq_len + 1}; prepare more data or lower train.seq_len")
        self.order = BlockOrder(blocks, [s.weight for s in sources], seed=seed, shuffle=shuffle)
        self.cursor, self.counts = 0, np.zeros(len(blocks), dtype=np.int64)
        self.rounds = Rounds(self.sets, self.order, seq_len=seq_len, batch_size=batch_size, rank=rank,
                             world_size=world_size)
        self._pin = pin_default() if pin_memory is None else pin_memory
        self._pool: WorkerPool | None = None

    @property
    def epoch(self) -> int:
        """Fewest complete passes over any source."""
        return int((self.counts // self.order.blocks).min())

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> Batch:
        """The next (batch_size, seq_len) batch of this rank."""
        if self.num_workers == 0:
            arrays, self.cursor, self.counts = self.rounds.round(self.cursor, self.counts)
            assert arrays is not None
            batch = batch_from_arrays(*arrays)
            if self._pin:
                batch = batch.pin_memory()
        else:
            if self._pool is None:
                job = _ShardJob(self.rounds, self.cursor, self.counts.tolist())
                self._pool = WorkerPool(job, num_workers=self.num_workers, pin_memory=self._pin)
            _, batch, state = self._pool.next()
            self.cursor, self.counts = int(state["cursor"]), np.asarray(state["counts"], dtype=np.int64)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The global position (identical on every rank): save any one rank's."""
        return {"version": STATE_VERSION, "kind": "shards", "seed": self.seed, "shuffle": self.shuffle,
                "seq_len": self.seq_len, "sources": [s.identity() for s in self.sets], "cursor": int(self.cursor),
                "counts": self.counts.tolist(), "world_size": self.world_size, "batch_size": self.batch_size}

    def load_resharded_state(self, states: list[dict[str, Any]]) -> None:
        """Every saved rank's state (another data-parallel size): they hold the same global position."""
        cursors = {int(s["cursor"]) for s in states if s is not None}
        if len(cursors) > 1:
            raise DataError(f"the saved data positions of the ranks differ ({sorted(cursors)}); the checkpoint was "
                            "not written at a step boundary; resume from another checkpoint or pass --fresh")
        self.load_state_dict(next(s for s in states if s is not None))

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue the global sequence from a state saved under any data-parallel size / batch / workers."""
        if isinstance(state, list):
            state = state[0]
        if state.get("kind") != "shards":
            raise DataError("the checkpoint's data position is for text sources; this run reads prepared shards "
                            "(data.format=shards): use the same data.format, or pass --fresh")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}; pass --fresh")
        for key, now in {"seed": self.seed, "shuffle": self.shuffle, "seq_len": self.seq_len}.items():
            if state[key] != now:
                raise DataError(f"data position was saved with {key}={state[key]!r}, this run has {now!r}; "
                                "resume with the same value, or pass --fresh")
        saved = [s["digest"] for s in state["sources"]]
        if saved != [s.identity()["digest"] for s in self.sets]:  # content, so a moved folder still resumes
            raise DataError(f"prepared data changed under a resume: saved {[s['path'] for s in state['sources']]} "
                            f"(digests {saved}), now {[str(s.path) for s in self.sets]}; use the same data, or "
                            "pass --fresh")
        self.close()
        self.cursor, self.counts = int(state["cursor"]), np.asarray(state["counts"], dtype=np.int64)


# ---- validation ------------------------------------------------------------------------------


def shard_validation_sets(src: SourceConfig, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                          max_tokens: int) -> dict[str, list[Batch]]:
    """Fixed evaluation batches per source of a prepared folder: its first tokens, in order."""
    shards = ShardSet(src.path)
    check_tokenizer(shards, tokenizer)
    ranges = [r for r in shards.source_ranges() if r[2] > r[1]]
    out = {}
    for name, lo, hi in ranges:
        n_tok = min(hi - lo, max(max_tokens, seq_len) + 1)
        rows = [shards.row(lo + i * seq_len, seq_len + 1) for i in range(max(0, (n_tok - 1) // seq_len))]
        rows = rows[:max(1, max_tokens // seq_len)]
        used = len(rows) * seq_len
        tail = None
        if len(rows) < max(1, max_tokens // seq_len) and hi - lo - used >= 2:
            tail = shards.row(lo + used, min(hi - lo - used, seq_len))
        label = src.name if src.name and len(ranges) == 1 else name
        out[label] = finish_validation(rows, tail, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                                       where=f"{src.path} ({name})")
    if not out:
        raise DataError(f"{src.path}: no tokens to evaluate")
    return out
