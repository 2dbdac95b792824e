"""A seeded shuffle of packed rows in windows, double buffered, with a small resumable state.

Why: a text shard packs documents one after another, so a document of L tokens fills ~L / T
consecutive rows (the bundled corpus has documents of ~68 rows of 256 tokens), and batches cut from
consecutive rows hold one or two documents. Random blocks of the whole corpus (what `kiln data
prepare` shards and an HF Trainer over grouped texts give) hold one document per row. Shuffling
rows inside a window of W rows gives batches drawn from all the documents of the window.

Windows: window w is rows [wW, (w+1)W) of the source's row stream, emitted in the order of
Generator((key..., w)).permutation(W). While window w is emitted, window w+1 is pulled one row per
row emitted, so the tokenizing is spread as evenly as without a shuffle: only the first window
waits for W rows.

State: the source's (small) state at the start of window w, plus w and the rows emitted of it.
Restoring replays W + pos rows from that state (window w, and the part of window w+1 already
pulled) and emits exactly the rows the original would have: the replay cost is at most two windows
of tokenizing, the state stays as small as the source's. A row stream that runs dry (DataExhausted)
emits the rows it has, in a shuffled last window, then raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kiln.data.packing import Row
from kiln.errors import DataError


class RowWindows:
    """Rows of `pull()` shuffled in windows of `size`. Stateful through the source's `save` / `load`."""

    def __init__(self, pull: Callable[[], Row], save: Callable[[], dict[str, Any]],
                 load: Callable[[dict[str, Any]], None], *, size: int, key: Sequence[int],
                 dry: type[DataError]) -> None:
        assert size > 1
        self._pull, self._save, self._load = pull, save, load
        self.size, self.key, self._dry_type = size, list(key), dry
        self.window, self.pos = 0, 0  # the window being emitted, and the rows emitted of it
        self.start: dict[str, Any] = save()  # the source's state at the start of window `window`
        self._cur: list[Row] | None = None  # window `window`, permuted; None until the first row is asked
        self._next: list[Row] = []  # rows of window + 1 pulled so far
        self._next_start: dict[str, Any] | None = None  # the source's state at the start of window + 1
        self._dry: DataError | None = None  # the source ran dry: no more pulls

    def _take(self) -> Row | None:
        if self._dry is not None:
            return None
        try:
            row = self._pull()
        except self._dry_type as e:
            self._dry = e
            return None
        # int32 ids (stack_rows sends them so anyway): 8 bytes a token for the 2 x `size` rows held
        return Row(tokens=row.tokens.astype(np.int32), doc_ids=row.doc_ids, first=row.first)

    def _permuted(self, rows: list[Row], window: int) -> list[Row]:
        order = np.random.default_rng([*self.key, window]).permutation(len(rows))
        return [rows[i] for i in order]

    def _fill(self) -> None:
        """Window `window` from `start`, then the `pos` rows of the next one pulled while emitting it."""
        rows: list[Row] = []
        while len(rows) < self.size and (row := self._take()) is not None:
            rows.append(row)
        self._cur = self._permuted(rows, self.window)
        self._next_start, self._next = self._save(), []
        for _ in range(self.pos):
            if (row := self._take()) is not None:
                self._next.append(row)

    def next_row(self) -> Row:
        """The next row; raises the source's DataExhausted once every row it gave is out."""
        if self._cur is None:
            self._fill()
        assert self._cur is not None
        if self.pos >= len(self._cur):
            if not self._next:
                assert self._dry is not None  # the windows are full while the source gives rows
                raise self._dry
            assert self._next_start is not None
            self.start, self.window, self.pos = self._next_start, self.window + 1, 0
            self._cur = self._permuted(self._next, self.window)
            self._next_start, self._next = self._save(), []
        row = self._cur[self.pos]
        self.pos += 1
        if (nxt := self._take()) is not None:
            self._next.append(nxt)
        return row

    def state_dict(self) -> dict[str, Any]:
        """The source's state at the window's start, the window and the rows emitted of it."""
        return {**self.start, "window": self.window, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved shuffle stopped (replays up to two windows of the source)."""
        self.window, self.pos = int(state["window"]), int(state["pos"])
        self.start = {k: v for k, v in state.items() if k not in ("window", "pos")}
        self._load(self.start)
        self._cur, self._next, self._next_start, self._dry = None, [], None, None
