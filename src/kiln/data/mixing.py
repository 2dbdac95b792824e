"""One shard of the text pipeline: per-source document streams, a seeded weighted mix, batched
tokenization and packing. kiln.data.loader runs one shard per rank, or one per DataLoader worker.

Shards. With W data-parallel ranks and N loader workers there are S = W x max(N, 1) shards, and shard
s = rank x max(N, 1) + worker. Every source is split S ways, disjointly:
  * local (map-style) sources: epoch e of source i is a seeded permutation perm of its n documents
    (kiln.data.perm: computed per position, no array of n indices; identity when shuffle=False) and
    shard s reads perm(s), perm(s + S), perm(s + 2S), ..., so over all shards every document comes
    exactly once per epoch;
  * streaming sources: datasets' split_dataset_by_node(rank=s, world_size=S): whole files per shard
    when the file count is a multiple of S, else every S-th document (then every shard reads, and
    discards, the whole stream: S times the reading). A source with `skip` / `take` is always split by
    document (shard s keeps documents s, s + S, ... of the selected range): positions must be global
    for the hold-out to be the first `skip` documents, and datasets' file split would divide `skip`
    among the shards, each skipping skip / S documents of its own files. Windows of `shuffle_buffer`
    documents are shuffled with a seed (StreamDocs says why not datasets' own buffer).
Mix: Generator((seed, 1, s, S)) draws the source of each next document with probability
weight_i / sum(weights) over the active sources. When a source runs dry (this shard's share of its
epoch is used up), `on_exhausted` decides: "cycle" starts its next epoch (the weights hold forever),
"drop" takes it out of the mix until every source is dry, then all start their next epoch (each
document exactly once per epoch; the proportions drift as sources empty), "stop" raises DataExhausted.

State. Before each tokenization batch the shard snapshots itself (source positions, mix RNG, the
packer's carry of < seq_len + 1 tokens) and then counts the rows popped since. Restoring loads the
snapshot, replays that one batch and skips the popped rows, so the state stays small however long
the documents are, and the restored shard emits exactly the rows the original would have. The
documents' order does not depend on encode_batch, so a resume may change it: the replay tokenizes
until the popped rows are there (several smaller batches, or one larger).

Rows. The packed rows then pass through a seeded shuffle in windows of `row_shuffle` rows per shard
(kiln.data.rowshuffle; off with shuffle=False or row_shuffle <= 1): documents are packed one after
another, so without it a long document fills many consecutive rows and a batch holds one or two
documents. The shard's state is then that same snapshot + count, taken at the window's start, plus
the window and the rows emitted of it; a restore replays up to two windows.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import itertools
from typing import Any

import numpy as np

from kiln.config import OnExhausted, Remainder, SourceConfig
from kiln.data.packing import Batch, Packer, Row, batch_from_arrays, stack_rows
from kiln.data.perm import Permutation, mix_key
from kiln.data.rowshuffle import RowWindows
from kiln.data.sources import load_documents, open_stream, resolve_files, source_name, stream_error
from kiln.data.tokenizer import Tokenizer
from kiln.errors import DataError
from kiln.paths import absolute_if_local

PERM_TAG, MIX_TAG, WINDOW_TAG, ROWS_TAG = 0, 1, 2, 3  # keep the seeded streams apart
# data.row_shuffle's default: rows per seeded shuffle window of each loader shard (kiln.data.rowshuffle;
# kiln.config.DataConfig says why this size)
ROW_SHUFFLE = 4096


class DataExhausted(DataError):
    """A source ran dry with data.on_exhausted=stop."""


class MapDocs:
    """A local source (memory-mapped Arrow) as one shard sees it: seeded epochs, strided by shard."""

    def __init__(self, cfg: SourceConfig, index: int, *, seed: int, shuffle: bool, shard: int,
                 num_shards: int) -> None:
        self.cfg, self.index, self.name = cfg, index, source_name(cfg)
        self.seed, self.shuffle, self.shard, self.num_shards = seed, shuffle, shard, num_shards
        self.files = [p.name for p in resolve_files(cfg)]
        self.ds = load_documents(cfg)
        self.n = len(self.ds)
        if self.n < num_shards:
            raise DataError(f"{cfg.path}: {self.n} documents cannot be shared by {num_shards} loader shards "
                            "(data-parallel ranks x data.num_workers); use fewer workers or more documents")
        self.share = len(range(shard, self.n, num_shards))  # documents of this shard per epoch
        self.epoch, self.cursor = 0, 0
        self._perm: tuple[int, Permutation] | None = None
        self._ahead: tuple[int, int, np.ndarray] = (0, -1, np.zeros(0, dtype=np.int64))  # (start, epoch, indices)

    def identity(self) -> dict[str, Any]:
        return {"path": absolute_if_local(self.cfg.path), "files": self.files, "documents": self.n,
                "weight": self.cfg.weight}

    def _at(self, j: np.ndarray) -> np.ndarray:
        """Document indices of this shard's positions j in the current epoch."""
        pos = self.shard + self.num_shards * j
        if not self.shuffle:
            return pos
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, Permutation(self.n, mix_key(self.seed, PERM_TAG, self.epoch, self.index)))
        return self._perm[1](pos)

    def order(self) -> np.ndarray:
        """This shard's document indices in the current epoch, in order (for checks; O(share) memory)."""
        return self._at(np.arange(self.share))

    def next_handle(self) -> int | None:
        """Index of the next document, or None when this shard's share of the epoch is used up."""
        if self.cursor >= self.share:
            return None
        start, epoch, ahead = self._ahead
        if epoch != self.epoch or not start <= self.cursor < start + len(ahead):  # computed 4096 at a time
            ahead = self._at(np.arange(self.cursor, min(self.share, self.cursor + 4096)))
            self._ahead = (self.cursor, self.epoch, ahead)
            start = self.cursor
        self.cursor += 1
        return int(ahead[self.cursor - 1 - start])

    def new_epoch(self, epoch: int) -> None:
        self.epoch, self.cursor = epoch, 0

    def fetch(self, handles: list[Any]) -> list[str]:
        return [t or "" for t in self.ds[handles]["text"]]

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class StreamDocs:
    """A streaming source (HF IterableDataset) as one shard sees it, shuffled in seeded windows.

    datasets' own `.shuffle(buffer_size=...)` loses its buffer on resume (its state_dict says so),
    which would skip documents. Instead the shard reads `window` documents, permutes them with
    Generator((seed, 2, source, shard, S, epoch, window index)) and emits them; its state is the
    datasets state at the window's start plus the count emitted, and a resume re-reads one window.
    """

    def __init__(self, cfg: SourceConfig, index: int, *, seed: int, shuffle: bool, buffer: int, shard: int,
                 num_shards: int) -> None:
        self.cfg, self.index, self.name = cfg, index, source_name(cfg)
        self.seed, self.shuffle, self.shard, self.num_shards = seed, shuffle, shard, num_shards
        self.window_size = buffer if shuffle and buffer > 1 else 256  # unshuffled: windows only read ahead
        # name, size, mtime: a stream has no document count to check on resume, its files' stats stand in
        self.files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in resolve_files(cfg)]
        self.by_document = bool(cfg.skip or cfg.take)  # global positions (module docstring)
        self.base = open_stream(cfg)
        self.epoch, self.window, self.start_state, self.pos = 0, 0, None, 0
        self._items: list[str] | None = None  # the current window, permuted
        self._next_state: dict | None = None  # datasets state after the current window
        self._short = False  # the current window is the epoch's last
        self._text_seen = False  # this epoch has had a document with text (a resumed epoch: assumed so)

    def identity(self) -> dict[str, Any]:
        return {"path": absolute_if_local(self.cfg.path), "files": self.files, "documents": None,
                "weight": self.cfg.weight}

    def _read_window(self) -> None:
        items: list[str] = []
        try:
            while len(items) < self.window_size:
                ex = next(self._it, None)
                if ex is None:
                    break
                items.append(ex["text"] or "")
            self._next_state = copy.deepcopy(self._ds.state_dict())
        except Exception as e:  # datasets / pyarrow raise many types; name the source in one line
            raise stream_error(e, self.cfg) from None
        if not items and self.window == 0:
            raise DataError(f"{self.cfg.path}: no documents for loader shard {self.shard} of {self.num_shards}; the "
                            "source is empty or has fewer documents than data-parallel ranks x data.num_workers")
        self._short = len(items) < self.window_size
        self._text_seen = self._text_seen or any(items)
        if self.shuffle and len(items) > 1:
            key = [self.seed, WINDOW_TAG, self.index, self.shard, self.num_shards, self.epoch, self.window]
            perm = np.random.default_rng(key).permutation(len(items))
            items = [items[i] for i in perm]
        self._items = items

    def _open(self) -> None:
        from datasets.distributed import split_dataset_by_node

        if self.by_document:  # a fresh copy of the whole stream; this shard keeps every S-th document
            self._ds = split_dataset_by_node(self.base, rank=0, world_size=1)
        else:
            self._ds = split_dataset_by_node(self.base, rank=self.shard, world_size=self.num_shards)
        if self.start_state is not None:
            self._ds.load_state_dict(copy.deepcopy(self.start_state))
        self._it = _iterate(self._ds)
        if self.by_document:  # a saved state sits just after one of this shard's documents: S - 1 to pass
            first = self.shard if self.start_state is None else self.num_shards - 1
            self._it = itertools.islice(self._it, first, None, self.num_shards)
        self._read_window()

    def next_handle(self) -> str | None:
        """The next document's text, or None when this shard's share of the epoch is used up."""
        if self._items is None:
            self._open()
        assert self._items is not None
        while self.pos >= len(self._items):
            if self._short:
                if not self._text_seen:  # else each epoch of nothing reopens the stream, for minutes
                    raise DataError(f"{self.cfg.path}: empty source (every document of loader shard {self.shard} "
                                    f"of {self.num_shards} has empty text)")
                return None
            self.window, self.start_state, self.pos = self.window + 1, self._next_state, 0
            self._read_window()
        self.pos += 1
        return self._items[self.pos - 1]

    def new_epoch(self, epoch: int) -> None:
        self.epoch, self.window, self.start_state, self.pos, self._items = epoch, 0, None, 0, None
        self._text_seen = False

    def fetch(self, handles: list[Any]) -> list[str]:
        return handles

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "window": self.window, "start_state": copy.deepcopy(self.start_state),
                "pos": self.pos}

    def load(self, state: dict[str, Any]) -> None:
        self.epoch, self.window, self.pos = int(state["epoch"]), int(state["window"]), int(state["pos"])
        self.start_state, self._items = copy.deepcopy(state["start_state"]), None
        self._text_seen = self.window > 0  # the windows before this one are not read again


def _iterate(ds: Any) -> Any:
    """Iterate a datasets.IterableDataset without its DataLoader-worker split.

    datasets makes its IterableDataset a torch IterableDataset once torch is imported, and then,
    inside a DataLoader worker, `iter()` splits the shards again by worker (none for a worker past the
    shard count). split_dataset_by_node above already gave this (rank, worker) its part, so step
    around that: the same path `iter()` takes outside a worker (datasets 3.x - 5.x)."""
    import torch.utils.data

    prepare = getattr(ds, "_prepare_ex_iterable_for_iteration", None)
    if torch.utils.data.get_worker_info() is None or prepare is None or getattr(ds, "_formatting", None):
        return iter(ds)
    return (example for _, example in prepare())


class TextStream:
    """Packed (batch_size, seq_len) batches from one shard of weighted text sources. Stateful."""

    def __init__(self, sources: list[SourceConfig], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 seed: int, shuffle: bool = True, shard: int = 0, num_shards: int = 1, encode_batch: int = 64,
                 shuffle_buffer: int = 10000, row_shuffle: int = ROW_SHUFFLE,
                 remainder: Remainder = "carry", on_exhausted: OnExhausted = "cycle",
                 track: bool = False) -> None:
        if not sources:
            raise DataError("data.train: at least one source is needed")
        assert 0 <= shard < num_shards and seq_len > 0 and batch_size > 0 and encode_batch > 0
        self.tokenizer, self.batch_size, self.encode_batch = tokenizer, batch_size, encode_batch
        self.shard, self.num_shards, self.on_exhausted = shard, num_shards, on_exhausted
        self.docs: list[MapDocs | StreamDocs] = [
            StreamDocs(s, i, seed=seed, shuffle=shuffle, buffer=shuffle_buffer, shard=shard, num_shards=num_shards)
            if s.streaming else MapDocs(s, i, seed=seed, shuffle=shuffle, shard=shard, num_shards=num_shards)
            for i, s in enumerate(sources)]
        self._weights = np.array([s.weight for s in sources], dtype=np.float64)
        if not (self._weights > 0).all():
            raise DataError("data.train: every source weight must be positive")
        self._rng = np.random.default_rng([seed, MIX_TAG, shard, num_shards])
        self._round = 0  # on_exhausted=drop: the sources whose epoch equals the round are active
        self._cdf: tuple[tuple, np.ndarray, list[float]] | None = None  # (active mask, active, cumulative weights)
        self._packer = Packer(seq_len=seq_len, eos_id=tokenizer.eos_id, remainder=remainder)
        known = sum(d.n // num_shards + 1 for d in self.docs if isinstance(d, MapDocs))
        self._max_fills = known // encode_batch + 1000  # a whole epoch of empty texts must not loop forever
        self._snap = self._capture()
        self._filled, self._popped = False, 0
        # for kiln.data.diversity: (source, document key, tokens) of every document the packer got, in order
        self.origins: list[tuple[int, Any, int]] | None = [] if track else None
        self._rows: RowWindows | None = None  # data.row_shuffle (module docstring)
        if shuffle and row_shuffle > 1:
            self._rows = RowWindows(self._pull_row, self._inner_state, self._load_inner, size=row_shuffle,
                                    key=[seed, ROWS_TAG, shard, num_shards], dry=DataExhausted)

    @property
    def epoch(self) -> int:
        """Completed passes: the round (on_exhausted=drop), else the fewest epochs over any source."""
        return self._round if self.on_exhausted == "drop" else min(d.epoch for d in self.docs)

    def next_batch(self) -> Batch:
        """The next (batch_size, seq_len) batch of this shard."""
        return batch_from_arrays(*self.next_arrays())

    def next_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch as (B, T+1) int32 tokens and doc ids (packing.stack_rows)."""
        return stack_rows(self.next_rows())

    def next_rows(self) -> list[Row]:
        """The next batch's rows (through the row shuffle when there is one)."""
        pull = self._pull_row if self._rows is None else self._rows.next_row
        return [pull() for _ in range(self.batch_size)]

    def _pull_row(self) -> Row:
        """The next row of the packed document stream."""
        while not self._packer.ready:
            self._snap, self._filled, self._popped = self._capture(), True, 0
            self._fill()
        self._popped += 1
        return self._packer.pop_row()

    def _pick(self) -> int:
        """Source of the next document among the active ones (one uniform draw)."""
        mask = tuple(d.epoch == self._round for d in self.docs) if self.on_exhausted == "drop" else ()
        if self._cdf is None or self._cdf[0] != mask:
            active = np.flatnonzero(mask) if mask else np.arange(len(self.docs))
            self._cdf = (mask, active, np.cumsum(self._weights[active]).tolist())
        _, active, cdf = self._cdf
        u = self._rng.random() * cdf[-1]
        return int(active[min(bisect.bisect_right(cdf, u), len(active) - 1)])

    def _next_doc(self) -> tuple[int, Any]:
        while True:
            i = self._pick()
            src = self.docs[i]
            handle = src.next_handle()
            if handle is not None:
                return i, handle
            if self.on_exhausted == "stop":
                raise DataExhausted(f"{src.cfg.path}: ran dry after {src.epoch + 1} epoch(s) on loader shard "
                                    f"{self.shard} of {self.num_shards}")
            if self.on_exhausted == "cycle":
                src.new_epoch(src.epoch + 1)
                handle = src.next_handle()
                if handle is None:
                    raise DataError(f"{src.cfg.path}: no documents for loader shard {self.shard}")
                return i, handle
            src.new_epoch(self._round + 1)  # drop: out of the mix until every source is dry
            if all(d.epoch > self._round for d in self.docs):
                self._round += 1

    def _picks(self) -> list[tuple[int, Any]]:
        """The next `encode_batch` documents; with on_exhausted=stop, those before the dry source's end (the
        stop comes at the next fill, once the rows of these are out, whatever data.encode_batch is)."""
        picks: list[tuple[int, Any]] = []
        for _ in range(self.encode_batch):
            try:
                picks.append(self._next_doc())
            except DataExhausted:
                if not picks:
                    raise
                break
        return picks

    def _fill(self) -> None:
        """Tokenize the next `encode_batch` documents into the packer."""
        for _ in range(self._max_fills):
            picks = self._picks()
            texts: list[str] = [""] * len(picks)
            for i, src in enumerate(self.docs):
                slots = [j for j, (s, _) in enumerate(picks) if s == i]
                if slots:
                    for j, t in zip(slots, src.fetch([picks[j][1] for j in slots])):
                        texts[j] = t
            before = len(self._packer)
            ids = self.tokenizer.encode_batch(texts)
            if self.origins is not None:  # the packer skips empty documents: so do the origins
                self.origins += [(s, _doc_key(h), len(d) + 1) for (s, h), d in zip(picks, ids) if d]
            self._packer.add(ids)
            if len(self._packer) > before:
                return
        raise DataError(f"{', '.join(d.cfg.path for d in self.docs)}: thousands of documents in a row tokenized "
                        f"to nothing on loader shard {self.shard}; check the text column")

    # ---- Stateful ---------------------------------------------------------------------------

    def _capture(self) -> dict[str, Any]:
        return {"sources": [d.state() for d in self.docs], "rng": self._rng.bit_generator.state,
                "round": self._round, "packer": self._packer.state_dict()}

    def _inner_state(self) -> dict[str, Any]:
        return {"snapshot": self._snap, "filled": self._filled, "popped": self._popped}

    def state_dict(self) -> dict[str, Any]:
        """Snapshot before the last tokenization batch + rows popped since (plain python data); with the
        row shuffle, that of the window's start + the window and the rows emitted of it."""
        inner = self._inner_state() if self._rows is None else self._rows.state_dict()
        return {**inner, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved shard stopped (replays one tokenization batch, or with the row
        shuffle up to two windows of rows)."""
        assert self.origins is None, "a tracked stream starts fresh"
        state = {k: v for k, v in state.items() if k != "epoch"}
        if self._rows is None:
            self._load_inner(state)
        else:
            self._rows.load_state_dict(state)

    def _load_inner(self, state: dict[str, Any]) -> None:
        snap = state["snapshot"]
        for d, s in zip(self.docs, snap["sources"]):
            d.load(s)
        self._rng.bit_generator.state = snap["rng"]
        self._round = int(snap["round"])
        self._packer.load_state_dict(snap["packer"])
        if state["filled"]:  # the documents come in the same order whatever encode_batch is: fill until each
            for _ in range(int(state["popped"])):  # saved row is there (one fill, unless encode_batch shrank)
                while not self._packer.ready:
                    self._fill()
                self._packer.pop_row()
        self._snap, self._filled, self._popped = snap, bool(state["filled"]), int(state["popped"])


def _doc_key(handle: Any) -> Any:
    """A document's identity for kiln.data.diversity: its index (local sources), or its text's digest (streams)."""
    if isinstance(handle, str):
        return hashlib.blake2b(handle.encode(), digest_size=8).hexdigest()
    return handle
