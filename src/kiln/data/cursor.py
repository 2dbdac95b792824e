"""Stateful positions in an endless run of epochs, shared by the in-memory loaders (post-training).

A loader that holds its items in memory (SFT rows, DPO pairs, RLVR prompts) keeps its data position
as an `EpochCursor`: (epoch, index into that epoch's list). The epochs one after another form one
global stream that data-parallel ranks split item by item, so the position reshards to another
number of ranks. `CursorLoader` is the state_dict / resume-check / reshard part those loaders share.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.data.batchsource import BatchSource
from kiln.errors import DataError


class EpochCursor:
    """One data-parallel rank's Stateful position in an endless run of epochs.

    `items(epoch)` lists one epoch's items in order, the same list on every rank (the current
    epoch's list is cached, so a shuffle or packing plan is computed once per epoch). The epochs,
    one after another, form one global stream; rank r of W takes its items r, r+W, r+2W, ... across
    epoch boundaries. Each step of W ranks therefore consumes the same contiguous stretch of the
    stream as one process with the same global batch, so a distributed run sees the single-process
    data, and the position reshards to any other number of ranks (`load_resharded_state`).
    `empty` is the DataError message for an epoch with no items.
    """

    VERSION = 2  # 1 (before 2026-11-24): each rank walked its own share of every epoch

    def __init__(self, items: Callable[[int], Sequence], *, empty: str, rank: int = 0, world_size: int = 1) -> None:
        self._items, self.empty = items, empty
        self.rank, self.world_size = rank, world_size
        self._cache: tuple[int, Sequence] | None = None
        self.epoch, self.cursor = self._advance(0, 0, rank)  # fails at construction, not at the first step

    def items(self, epoch: int) -> Sequence:
        if self._cache is None or self._cache[0] != epoch:
            items = self._items(epoch)
            if len(items) == 0:
                raise DataError(self.empty)
            self._cache = (epoch, items)
        return self._cache[1]

    def _advance(self, epoch: int, cursor: int, n: int) -> tuple[int, int]:
        """The position n items after (epoch, cursor) in the global stream, normalised into its epoch."""
        cursor += n
        while cursor >= len(self.items(epoch)):
            cursor -= len(self.items(epoch))
            epoch += 1
        return epoch, cursor

    def take(self, k: int) -> list:
        """This rank's next k items, continuing into the next epoch(s) when one runs out."""
        return [item for _, item in self.take_positioned(k)]

    def take_positioned(self, k: int) -> list[tuple[tuple[int, int], Any]]:
        """`take(k)` with each item's (epoch, index) in the global stream: the same on every layout for
        the same draw, so per-item randomness seeded by it (RLVR's sampling) does not depend on the rank."""
        out: list[tuple[tuple[int, int], Any]] = []
        for _ in range(k):
            out.append(((self.epoch, self.cursor), self.items(self.epoch)[self.cursor]))
            self.epoch, self.cursor = self._advance(self.epoch, self.cursor, self.world_size)
        return out

    def state_dict(self) -> dict[str, int]:
        """This rank's next position in the global stream."""
        return {"epoch": self.epoch, "cursor": self.cursor, "cursor_version": self.VERSION}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("cursor_version") != self.VERSION and self.world_size > 1:
            raise DataError("this post-training data position was saved by an earlier kiln, whose ranks each "
                            "walked their own share of every epoch; resume it in one process, or pass --fresh")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def load_resharded_state(self, states: list[dict[str, Any]]) -> None:
        """Continue a run saved with len(states) ranks (states in data-parallel rank order) on this
        rank of this run's world size: every saved rank has taken the same number of items, so rank
        0's next position is where the next global batch starts."""
        if any(s.get("cursor_version") != self.VERSION for s in states):
            raise DataError("this post-training data position was saved by an earlier kiln and cannot move to "
                            "another number of data-parallel ranks; resume with the same layout or pass --fresh")
        self.epoch, self.cursor = self._advance(int(states[0]["epoch"]), int(states[0]["cursor"]), self.rank)


@dataclass(frozen=True)
class DataId:
    """Which data a post-training loader walks: `name` (its file or HF dataset, for messages) and
    `digest` (records_digest of its records; empty: unknown, nothing to compare)."""

    name: str = ""
    digest: str = ""

    @classmethod
    def of(cls, name: str, records: Iterable[tuple[str, Any]]) -> DataId:
        return cls(name, records_digest(records))


def records_digest(records: Iterable[tuple[str, Any]]) -> str:
    """sha256 over the (where, record) records' content in order, not where they were read from: a
    moved or renamed file is the same data, another file with as many records is not."""
    h = hashlib.sha256()
    for _, rec in records:
        h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


class CursorLoader(BatchSource):
    """What the post-training loaders share: their state is an EpochCursor position plus the number of
    items the data had and its digest (DataId), checked on a resume so that changed data is one clear
    error. A state saved before the digest (kiln before 2026-12-07) is taken on trust by its count.

    A subclass sets `cursor`, `data` (a DataId; the default, no name and no digest, checks the count
    only), `KIND` (the state's "kind"), `ITEMS` (the state key and the word for an item, e.g. "pairs"),
    `WHAT` (the data's name in messages) and `n_items()`.
    """

    reshards = True

    KIND = ITEMS = WHAT = ""
    cursor: EpochCursor
    data: DataId = DataId()

    def n_items(self) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        state = {"kind": self.KIND, **self.cursor.state_dict(), self.ITEMS: self.n_items()}
        if self.data.digest:
            state["digest"] = self.data.digest
        return state

    def _check(self, state: dict[str, Any]) -> None:
        what = f"{self.WHAT} {self.data.name}" if self.data.name else self.WHAT
        if state.get("kind") != self.KIND:
            raise DataError(f"the checkpoint's data position is for other data ({state.get('kind')!r}), not "
                            f"{self.WHAT}; pass another --run.out_dir, or --fresh to start over")
        if state.get(self.ITEMS) != self.n_items():
            raise DataError(f"{what} changed under a resume (saved {state.get(self.ITEMS)} {self.ITEMS}, now "
                            f"{self.n_items()}); pass the data the run was trained on, or --fresh to start over")
        saved, now = state.get("digest"), self.data.digest
        if saved and now and saved != now:
            raise DataError(f"{what} changed under a resume (the same {self.n_items()} {self.ITEMS}, other content: "
                            f"digest {now[:12]}, saved {saved[:12]}); pass the data the run was trained on, or "
                            "--fresh to start over")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check(state)
        self.cursor.load_state_dict(state)

    def load_resharded_state(self, states: list[dict[str, Any]]) -> None:
        """The data position of a run saved with another number of data-parallel ranks."""
        for state in states:
            self._check(state)
        self.cursor.load_resharded_state(states)


def shuffled(n: int, *, seed: int, stream: int) -> Callable[[int], np.ndarray]:
    """epoch -> a permutation of range(n) seeded by (seed, stream, epoch), the same on every rank."""
    return lambda epoch: np.random.default_rng([seed, stream, epoch]).permutation(n)
