"""Deterministic, resumable, rank-disjoint packed batches from weighted text sources.

Order of documents, all from `seed`:
  * Each source has its own epochs. In epoch e, source i is visited in the order
    perm = numpy Generator((seed, 0, e, i)).permutation(n_i) (identity when shuffle=False), and
    rank r of W takes perm[r::W]: the ranks are disjoint and together cover every document exactly
    once per epoch (ranks may differ by one document per epoch).
  * Which source supplies the next document is drawn by one seeded Generator((seed, 1)) with
    probability weight_i / sum(weights), the same sequence on every rank. A source whose share of
    the epoch is used up starts its next epoch (new permutation) when it is drawn again, so small
    sources repeat while large ones are still in their first epoch: weights set the mixture, not
    the number of passes. `epoch` reports the fewest passes completed by any source.
Documents are tokenized on the fly, `encode_batch` at a time, and packed with `Packer` (doc ids,
EOS per document, no padding). Empty documents are skipped.

State (`state_dict`): per source (epoch, cursor), the interleave RNG state and the packer buffer
(the carry plus the not-yet-batched tokens of the last encode batch), plus the identity of the
data (paths, files, document counts) to refuse resuming on changed data. A fresh loader given
that state continues with exactly the batches the uninterrupted loader would have produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kiln.config import SourceConfig
from kiln.data.packing import Batch, Packer, make_batch
from kiln.data.sources import load_documents, resolve_files, source_name
from kiln.data.tokenizer import Tokenizer
from kiln.errors import DataError

STATE_VERSION = 1
_PERM_TAG, _MIX_TAG = 0, 1  # keep the permutation and interleave seed streams apart


class _Source:
    """One source's documents and this rank's position in them."""

    def __init__(self, cfg: SourceConfig, index: int, *, seed: int, shuffle: bool, rank: int,
                 world_size: int) -> None:
        self.cfg, self.index = cfg, index
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.name = source_name(cfg)
        self.files = [str(p) for p in resolve_files(cfg)]
        self.ds = load_documents(cfg)
        self.n = len(self.ds)
        if self.n < world_size:
            raise DataError(f"{cfg.path}: {self.n} documents cannot be shared by {world_size} data-parallel ranks")
        self.epoch, self.cursor = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, this rank's document indices)

    def identity(self) -> dict[str, Any]:
        return {"path": self.cfg.path, "files": [Path(f).name for f in self.files], "documents": self.n}

    def order(self) -> np.ndarray:
        """This rank's document indices for the current epoch."""
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, _PERM_TAG, self.epoch, self.index]).permutation(self.n)
            else:
                perm = np.arange(self.n)
            self._order = (self.epoch, perm[self.rank::self.world_size])
        return self._order[1]

    def next_index(self) -> int:
        """Next document index; rolls over into the next epoch when this rank's share is used up."""
        order = self.order()
        if self.cursor >= len(order):
            self.epoch, self.cursor = self.epoch + 1, 0
            order = self.order()
        idx = int(order[self.cursor])
        self.cursor += 1
        return idx


class PackedLoader:
    """Infinite iterator of packed `Batch`es (B, seq_len) over weighted sources. Stateful."""

    def __init__(self, sources: list[SourceConfig], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1, encode_batch: int = 64) -> None:
        if not sources:
            raise DataError("data.train: at least one source is needed")
        assert 0 <= rank < world_size and seq_len > 0 and batch_size > 0 and encode_batch > 0
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size, self.encode_batch = seq_len, batch_size, encode_batch
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.sources = [_Source(s, i, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
                        for i, s in enumerate(sources)]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if not (weights > 0).all():
            raise DataError("data.train: every source weight must be positive")
        self._cdf = np.cumsum(weights / weights.sum())  # (S,)
        self._rng = np.random.default_rng([seed, _MIX_TAG])
        self._packer = Packer(seq_len=seq_len, eos_id=tokenizer.eos_id)
        self._rank_docs = sum(len(s.order()) for s in self.sources)  # documents per epoch on this rank

    @property
    def epoch(self) -> int:
        """Fewest passes completed over any source (0 during the first pass)."""
        return min(s.epoch for s in self.sources)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> Batch:
        """The next (batch_size, seq_len) batch."""
        rows = []
        while len(rows) < self.batch_size:
            if self._packer.ready:
                rows.append(self._packer.pop_row())
            else:
                self._fill()
        return make_batch(rows)

    def _draw_sources(self, k: int) -> np.ndarray:
        """(k,) source index of each of the next k documents."""
        u = self._rng.random(k)  # same doubles as k single draws, so the sequence does not depend on k
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.sources) - 1)

    def _fill(self) -> None:
        """Tokenize the next encode batch of documents into the packer."""
        for _ in range(self._rank_docs // self.encode_batch + 2):
            picks = self._draw_sources(self.encode_batch)
            wanted = [(int(s), self.sources[s].next_index()) for s in picks]
            texts: list[str] = [""] * len(wanted)
            for s, src in enumerate(self.sources):
                slots = [j for j, (si, _) in enumerate(wanted) if si == s]
                if slots:
                    got = src.ds[[wanted[j][1] for j in slots]]["text"]
                    for j, t in zip(slots, got):
                        texts[j] = t or ""
            before = len(self._packer)
            self._packer.add(self.tokenizer.encode_batch(texts))
            if len(self._packer) > before:
                return
        raise DataError(f"{', '.join(s.cfg.path for s in self.sources)}: a whole epoch of documents on rank "
                        f"{self.rank} tokenized to nothing; check the text column")

    # ---- Stateful ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain python data: position per source, interleave RNG, packer buffer, data identity."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed, "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size,
            "sources": [{**s.identity(), "epoch": s.epoch, "cursor": s.cursor} for s in self.sources],
            "rng": self._rng.bit_generator.state,
            "packer": self._packer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved loader stopped; DataError if the data or layout changed."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}; start fresh")
        if state["world_size"] != self.world_size:
            raise DataError(f"data position was saved with {state['world_size']} data-parallel ranks, this run has "
                            f"{self.world_size}; resuming streaming-order data on another data-parallel size is "
                            "not supported yet (resume with the same size, or start fresh)")
        if state["rank"] != self.rank:
            raise DataError(f"data position of rank {state['rank']} loaded on rank {self.rank}")
        for key in ("seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise DataError(f"data position was saved with {key}={state[key]!r}, this run has "
                                f"{getattr(self, key)!r}; resume with the same value, or start fresh")
        saved = state["sources"]
        if [s["path"] for s in saved] != [s.cfg.path for s in self.sources]:
            raise DataError(f"data sources changed under a resume: saved {[s['path'] for s in saved]}, "
                            f"now {[s.cfg.path for s in self.sources]}")
        for old, src in zip(saved, self.sources):
            now = src.identity()
            if old["files"] != now["files"] or old["documents"] != now["documents"]:
                raise DataError(f"{src.cfg.path}: data changed under a resume (was {len(old['files'])} files, "
                                f"{old['documents']} documents; now {len(now['files'])} files, {now['documents']} "
                                "documents); restore the data or start fresh")
        for old, src in zip(saved, self.sources):
            src.epoch, src.cursor = int(old["epoch"]), int(old["cursor"])
        self._rng.bit_generator.state = state["rng"]
        self._packer.load_state_dict(state["packer"])


def validation_batches(src: SourceConfig, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                       max_tokens: int) -> list[Batch]:
    """Fixed evaluation batches: the first documents in file order, packed as in training.

    At most max(max_tokens, seq_len) input tokens in full (B, seq_len) batches, the last one
    possibly smaller in B. If the source runs out first, its remainder is scored as one extra
    (1, t) batch with t < seq_len, so even a text shorter than one row gets scored. Never padded.
    """
    ds = load_documents(src)
    want = max(1, max_tokens // seq_len)
    packer = Packer(seq_len=seq_len, eos_id=tokenizer.eos_id)
    rows = []
    step = 64
    for start in range(0, len(ds), step):
        texts = ds[start:start + step]["text"]
        packer.add(tokenizer.encode_batch([t or "" for t in texts]))
        while packer.ready and len(rows) < want:
            rows.append(packer.pop_row())
        if len(rows) == want:
            break
    batches = [make_batch(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    tail = packer.tail() if len(rows) < want else None
    if tail is not None:
        budget = max(max_tokens - len(rows) * seq_len, 0 if rows else 1)
        if budget > 0:
            tail.tokens, tail.doc_ids = tail.tokens[:budget + 1], tail.doc_ids[:budget + 1]
            batches.append(make_batch([tail]))
    if not batches:
        raise DataError(f"{src.path}: no tokens to evaluate")
    return batches
