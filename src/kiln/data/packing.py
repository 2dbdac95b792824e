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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE = -100


@dataclass
class Row:
    """One packed row: T+1 tokens and their row-relative document ids."""

    tokens: np.ndarray  # (T+1,) int64
    doc_ids: np.ndarray  # (T+1,) int32, starts at 0


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
    tok = torch.from_numpy(np.stack([r.tokens for r in rows]).astype(np.int64))  # (B, T+1)
    doc = torch.from_numpy(np.stack([r.doc_ids for r in rows]).astype(np.int32))  # (B, T+1)
    targets = tok[:, 1:].clone()  # (B, T)
    targets[doc[:, 1:] != doc[:, :-1]] = IGNORE  # input is an EOS, target starts the next document
    return Batch(tokens=tok[:, :-1].contiguous(), targets=targets, doc_ids=doc[:, :-1].contiguous())


def pack_documents(docs: Iterable[Sequence[int]], *, seq_len: int, eos_id: int) -> list[Row]:
    """All full rows of a finite list of tokenized documents (the tail shorter than T+1 is dropped)."""
    packer = Packer(seq_len=seq_len, eos_id=eos_id)
    packer.add(docs)
    return list(packer.rows())


class Packer:
    """Incremental packer (Stateful): `add` documents, then pop full rows of seq_len+1 tokens.

    Holds the not-yet-emitted tail of the stream (the carry, at least the one token that the next
    row shares with the last one) plus whatever has been added but not popped. `state_dict()`
    saves exactly that, so a restored packer emits the same rows.
    """

    def __init__(self, *, seq_len: int, eos_id: int) -> None:
        assert seq_len > 0
        self.seq_len = seq_len
        self.eos_id = eos_id
        self._tok = np.zeros(0, dtype=np.int64)  # (N,) buffered stream
        self._doc = np.zeros(0, dtype=np.int64)  # (N,) document counter of each buffered token

    def __len__(self) -> int:
        """Tokens buffered (carry + unconsumed)."""
        return len(self._tok)

    @property
    def ready(self) -> int:
        """Number of full rows that can be popped now."""
        return max(0, (len(self._tok) - 1) // self.seq_len)

    def add(self, docs: Iterable[Sequence[int]]) -> None:
        """Append documents (each gets an EOS). Empty documents are skipped: a lone EOS teaches nothing."""
        docs = [d for d in docs if len(d)]
        if not docs:
            return
        lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        flat = np.empty(int(lengths.sum()), dtype=np.int64)
        ends = np.cumsum(lengths)
        for d, end, n in zip(docs, ends, lengths):
            flat[end - n:end - 1] = d
        flat[ends - 1] = self.eos_id
        first = int(self._doc[-1]) + 1 if len(self._doc) else 0
        doc = np.repeat(np.arange(first, first + len(docs), dtype=np.int64), lengths)
        self._tok = np.concatenate([self._tok, flat])
        self._doc = np.concatenate([self._doc, doc])

    def pop_row(self) -> Row:
        """The next full row; the buffer keeps its last token as the start of the following row."""
        T = self.seq_len
        assert self.ready, "pop_row on a packer without a full row"
        tok, doc = self._tok[:T + 1].copy(), self._doc[:T + 1]
        row = Row(tokens=tok, doc_ids=(doc - doc[0]).astype(np.int32))
        self._tok, self._doc = self._tok[T:], self._doc[T:]
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
        assert self._tok.shape == self._doc.shape
