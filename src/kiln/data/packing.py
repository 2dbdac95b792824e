"""Pack documents into fixed-length training rows with per-row document ids. No padding, ever.

Each document becomes `tokens + [eos]`, and the documents are concatenated into one stream. The
stream is cut into rows of T+1 tokens with stride T, so consecutive rows overlap by one token:

    stream   a0 a1 a2 E | b0 b1 E | c0 c1 c2 c3 ...        (T = 4)
    row 0    a0 a1 a2 E  b0            x = a0 a1 a2 E     y = a1 a2 E  b0
    row 1    b0 b1 E  c0 c1            x = b0 b1 E  c0    y = b1 E  c0 c1

The inputs x = row[:-1] tile the stream exactly (no token lost or repeated) and y = row[1:].
Each row carries doc ids relative to the row (0 0 0 0 1 / 0 0 0 1 1): the EOS belongs to the
document it ends. A target in another document than its input (x = E, y = first token of the next
document) is set to -100, so the model never predicts across a document boundary.

Remainders (`remainder=`): "carry" (default) continues a document that overflows a row in the
next row, so no token is lost (densification as in Sabareesh's 437.6M guide, without its per-batch drop). "drop"
starts every row at a document start: the part of the document that overflows a row is dropped
(a document longer than a row keeps only its first T+1 tokens), so no row begins mid-document.
Either way a row is always full: no padding.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kiln.config import Remainder
from kiln.model.loss import IGNORE  # targets the loss skips (padding, document starts)


@dataclass
class Row:
    """One packed row: T+1 tokens and their row-relative document ids."""

    tokens: np.ndarray  # (T+1,) int64
    doc_ids: np.ndarray  # (T+1,) int32, starts at 0
    first: int = 0  # the packer's count of its first document (documents added before it); for diversity checks


@dataclass
class Batch:
    """A training micro-batch. Targets of -100 are ignored by the loss."""

    tokens: torch.Tensor  # (B, T) int64 inputs
    targets: torch.Tensor  # (B, T) int64 next tokens, -100 across document boundaries
    doc_ids: torch.Tensor  # (B, T) int32 document index of each input position, restarting at 0 per row

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """The batch on `device` (a no-op on the same device)."""
        return Batch(self.tokens.to(device, non_blocking=non_blocking),
                     self.targets.to(device, non_blocking=non_blocking),
                     self.doc_ids.to(device, non_blocking=non_blocking))

    @property
    def num_targets(self) -> int:
        """Number of scored targets (not -100)."""
        return int((self.targets != IGNORE).sum().item())

    def pin_memory(self) -> Batch:
        """The batch in pinned host memory (for non-blocking copies to a GPU)."""
        return Batch(self.tokens.pin_memory(), self.targets.pin_memory(), self.doc_ids.pin_memory())


def make_batch(rows: Sequence[Row]) -> Batch:
    """Stack rows of equal length T+1 into a Batch of (B, T) inputs, targets and doc ids."""
    assert rows, "make_batch needs at least one row"
    return batch_from_arrays(np.stack([r.tokens for r in rows]), np.stack([r.doc_ids for r in rows]))


def stack_rows(rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
    """(B, T+1) int32 tokens and doc ids: the compact form a loader worker sends to the trainer
    (two plain arrays pickle through the pipe ~4x cheaper than a Batch's three shared-memory tensors)."""
    return np.stack([r.tokens for r in rows]).astype(np.int32), np.stack([r.doc_ids for r in rows]).astype(np.int32)


def batch_from_arrays(tokens: np.ndarray, doc_ids: np.ndarray) -> Batch:
    """(B, T+1) tokens and row-relative doc ids -> Batch. numpy, not torch: one thread, no OpenMP
    start-up per op, which matters on a busy CPU (this runs in loader workers)."""
    tok = np.asarray(tokens, dtype=np.int64)
    doc = np.asarray(doc_ids, dtype=np.int32)
    targets = tok[:, 1:].copy()  # (B, T)
    targets[doc[:, 1:] != doc[:, :-1]] = IGNORE  # input is an EOS, target starts the next document
    return Batch(tokens=torch.from_numpy(np.ascontiguousarray(tok[:, :-1])), targets=torch.from_numpy(targets),
                 doc_ids=torch.from_numpy(np.ascontiguousarray(doc[:, :-1])))


def flatten_documents(docs: Iterable[Sequence[int]], *, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The packer's stream of `docs`: (N,) int64 tokens, each non-empty document followed by EOS, and the
    (n,) int64 length of each such document (EOS included). Empty documents are skipped: a lone EOS
    teaches nothing. Shared by Packer.add and `kiln data prepare`, so shards hold exactly this stream."""
    docs = [d for d in docs if len(d)]
    if not docs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]), dtype=np.int64)
    body = np.ones(len(flat), dtype=bool)
    body[ends - 1] = False
    flat[body] = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=len(flat) - len(docs))
    flat[ends - 1] = eos_id
    return flat, lengths


def pack_documents(docs: Iterable[Sequence[int]], *, seq_len: int, eos_id: int,
                   remainder: Remainder = "carry") -> list[Row]:
    """All full rows of a finite list of tokenized documents (the tail shorter than T+1 is dropped)."""
    packer = Packer(seq_len=seq_len, eos_id=eos_id, remainder=remainder)
    packer.add(docs)
    return list(packer.rows())


class Packer:
    """Incremental packer (Stateful): `add` documents, then pop full rows of seq_len+1 tokens.

    Holds the not-yet-emitted tail of the stream (the carry, at least the one token that the next
    row shares with the last one) plus whatever has been added but not popped. `state_dict()`
    saves exactly that, so a restored packer emits the same rows.
    """

    def __init__(self, *, seq_len: int, eos_id: int, remainder: Remainder = "carry") -> None:
        assert seq_len > 0 and remainder in ("carry", "drop")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.remainder = remainder
        self.dropped = 0  # tokens dropped so far (remainder=drop); statistics only, not state
        self._tok = np.zeros(0, dtype=np.int64)  # (N,) buffered stream
        self._doc = np.zeros(0, dtype=np.int64)  # (N,) document counter of each buffered token
        self._count = 0  # documents added (since made or restored): the next one's counter

    def __len__(self) -> int:
        """Tokens buffered (carry + unconsumed)."""
        return len(self._tok)

    @property
    def ready(self) -> int:
        """Number of full rows that can be popped now (with remainder=drop: an upper bound; > 0 iff one can)."""
        return max(0, (len(self._tok) - 1) // self.seq_len)

    def add(self, docs: Iterable[Sequence[int]]) -> None:
        """Append documents (each gets an EOS). Empty documents are skipped: a lone EOS teaches nothing."""
        flat, lengths = flatten_documents(docs, eos_id=self.eos_id)
        if not len(lengths):
            return
        first, self._count = self._count, self._count + len(lengths)
        doc = np.repeat(np.arange(first, first + len(lengths), dtype=np.int64), lengths)
        self._tok = np.concatenate([self._tok, flat])
        self._doc = np.concatenate([self._doc, doc])

    def pop_row(self) -> Row:
        """The next full row; the buffer keeps its last token as the start of the following row."""
        T = self.seq_len
        assert self.ready, "pop_row on a packer without a full row"
        tok, doc = self._tok[:T + 1].copy(), self._doc[:T + 1]
        row = Row(tokens=tok, doc_ids=(doc - doc[0]).astype(np.int32), first=int(doc[0]))
        cut = T
        if self.remainder == "drop":
            # next row starts at the first document start at or after T (the row's last token, a target only,
            # may itself start a document: then nothing is dropped). `add` appends whole documents, so a
            # document that has no start after T ends inside the buffer and is dropped whole.
            d = self._doc
            starts = np.flatnonzero(d[T:] != d[T - 1:-1])
            cut = T + int(starts[0]) if len(starts) else len(d)
            self.dropped += cut - T
        self._tok, self._doc = self._tok[cut:], self._doc[cut:]
        return row

    def rows(self) -> Iterator[Row]:
        """Pop every full row available now."""
        while self.ready:
            yield self.pop_row()

    def tail(self) -> Row | None:
        """The buffered remainder as one short row (>= 2 tokens), without consuming it; for evaluation only."""
        if len(self._tok) < 2:
            return None
        return Row(tokens=self._tok.copy(), doc_ids=(self._doc - self._doc[0]).astype(np.int32))

    def state_dict(self) -> dict[str, Any]:
        """Buffered tokens and their row-relative doc ids, as plain lists."""
        base = int(self._doc[0]) if len(self._doc) else 0
        return {"seq_len": self.seq_len, "tokens": self._tok.tolist(), "doc_ids": (self._doc - base).tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._tok = np.asarray(state["tokens"], dtype=np.int64)
        self._doc = np.asarray(state["doc_ids"], dtype=np.int64)
        self._count = int(self._doc[-1]) + 1 if len(self._doc) else 0
        assert self._tok.shape == self._doc.shape
