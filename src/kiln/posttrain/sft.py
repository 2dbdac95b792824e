"""Supervised fine-tuning: chat conversations, loss on assistant tokens only, packed with document masks.

Each conversation is rendered with the chat template and tokenized once (kiln.posttrain.chat); the
assistant mask says which tokens are trained. A row of train.seq_len inputs holds whole
conversations (posttrain.pack) or one (pack=false), never a part of one beside another:

    row     c0 c0 c0 c0 | c1 c1 c1 | pad pad       (inputs; doc ids 0 0 0 0 1 1 1 2 2)
    target  the next token where it is in the same conversation and written by the assistant, else -100

The doc ids make attention block-diagonal and restart RoPE positions per conversation, so a packed
conversation gives the same logits as alone (tested). Padding is its own document with no targets.
A conversation longer than the row is cut to its first train.seq_len tokens (counted and reported).

Order: each epoch shuffles the conversations with (seed, epoch), then packs them greedily in that
order. The loader state is (epoch, row cursor), so resuming replays exactly.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from kiln.data.cursor import CursorLoader, DataId, EpochCursor
from kiln.data.packing import IGNORE, Batch
from kiln.data.records import load_records
from kiln.errors import DataError
from kiln.eval.loss import evaluate, token_loss_sum
from kiln.posttrain.chat import ChatFormat, Encoded, as_messages, check_messages, naming
from kiln.train.objective import Objective


def encode_conversations(records: list[tuple[str, dict]], fmt: ChatFormat, *, max_len: int) -> list[Encoded]:
    """Tokenize `{"messages": [...]}` records (a bare list of messages works too); conversations
    without an assistant token left after truncation to max_len tokens are dropped (reported)."""
    out, cut, empty = [], 0, 0
    for where, rec in records:
        msgs = rec.get("messages") if isinstance(rec, dict) else rec
        if msgs is None and isinstance(rec, dict) and "prompt" in rec:
            if "completion" not in rec:  # it fell through to "'messages' must be a non-empty list"
                raise DataError(f"{where}: a prompt record needs \"completion\" too (or give \"messages\")")
            msgs = as_messages(rec["prompt"], role="user", where=where, field="prompt") + \
                as_messages(rec["completion"], role="assistant", where=where, field="completion")
        with naming(where):
            enc = fmt.encode(check_messages(msgs, where=where))
        if len(enc.ids) > max_len:
            enc, cut = Encoded(enc.ids[:max_len], enc.mask[:max_len]), cut + 1
        if not enc.mask[1:].any():
            empty += 1
            continue
        out.append(enc)
    if cut or empty:
        print(f"note: {cut} conversation(s) cut to {max_len} tokens; {empty} without assistant tokens skipped",
              file=sys.stderr)
    if not out:
        raise DataError("SFT data: no conversation has an assistant message to train on")
    return out


def plan_rows(convs: list[Encoded], order: np.ndarray, *, seq_len: int, pack: bool) -> list[list[int]]:
    """The conversation indices of each row, for the conversations in `order`, greedily packed."""
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = len(convs[int(i)].ids)
        if cur and (not pack or used + n > seq_len):
            rows.append(cur)
            cur, used = [], 0
        cur.append(int(i))
        used += n
    if cur:
        rows.append(cur)
    return rows


def build_row(convs: list[Encoded], plan: list[int], *, seq_len: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, targets, doc_ids), each (seq_len,), of the conversations `plan` side by side."""
    tok = np.full(seq_len, pad_id, dtype=np.int64)
    tgt = np.full(seq_len, IGNORE, dtype=np.int64)
    doc = np.full(seq_len, len(plan), dtype=np.int32)  # the padding is one more document
    pos = 0
    for d, i in enumerate(plan):
        c = convs[i]
        n = len(c.ids)
        tok[pos:pos + n] = c.ids
        # position j predicts token j+1: a target only inside the conversation and on assistant tokens
        tgt[pos:pos + n - 1] = np.where(c.mask[1:], c.ids[1:], IGNORE)
        doc[pos:pos + n] = d
        pos += n
    return tok, tgt, doc


def pack_rows(convs: list[Encoded], order: np.ndarray, *, seq_len: int, pack: bool,
              pad_id: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, targets, doc_ids), each (seq_len,), for the conversations in `order`, greedily packed."""
    return [build_row(convs, plan, seq_len=seq_len, pad_id=pad_id)
            for plan in plan_rows(convs, order, seq_len=seq_len, pack=pack)]


def rows_to_batch(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Batch:
    return Batch(tokens=torch.from_numpy(np.stack([r[0] for r in rows])),
                 targets=torch.from_numpy(np.stack([r[1] for r in rows])),
                 doc_ids=torch.from_numpy(np.stack([r[2] for r in rows])))


class SFTLoader(CursorLoader):
    """Endless, Stateful micro-batches of packed SFT rows; rank r of W takes rows r, r+W, ... of the
    epochs' rows one after another (kiln.data.cursor.EpochCursor).

    Per epoch only the row plans (conversation indices) are kept; a row's arrays are built when it
    is batched, so memory does not grow with the epoch's token count.
    """

    KIND, ITEMS, WHAT = "sft", "conversations", "SFT data"

    def __init__(self, convs: list[Encoded], *, seq_len: int, batch_size: int, seed: int, pack: bool, pad_id: int,
                 rank: int = 0, world_size: int = 1, data: DataId | None = None) -> None:
        self.convs, self.seq_len, self.batch_size, self.seed = convs, seq_len, batch_size, seed
        self.data = data or DataId()
        self.pack, self.pad_id, self.rank, self.world_size = pack, pad_id, rank, world_size
        self.cursor = EpochCursor(self._plans, empty="SFT data: no conversations to train on", rank=rank,
                                  world_size=world_size)

    def _plans(self, epoch: int) -> list[list[int]]:
        """One epoch's rows (conversation indices each), the same on every rank."""
        order = np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.convs))
        return plan_rows(self.convs, order, seq_len=self.seq_len, pack=self.pack)

    def next_batch(self) -> Batch:
        plans = self.cursor.take(self.batch_size)
        return rows_to_batch([build_row(self.convs, p, seq_len=self.seq_len, pad_id=self.pad_id) for p in plans])

    def n_items(self) -> int:
        return len(self.convs)


def rows_per_epoch(convs: list[Encoded], *, seq_len: int, pack: bool) -> int:
    """Rows one epoch packs into (the same for every shuffle when pack is false; close to it when true)."""
    order = np.random.default_rng(0).permutation(len(convs))
    return len(plan_rows(convs, order, seq_len=seq_len, pack=pack))


class SFTObjective(Objective):
    """Cross-entropy on assistant tokens; count = assistant target tokens in the step."""

    name = "sft"

    def __init__(self, train: list[Encoded], val: list[Encoded] | None = None, *, pack: bool = True,
                 data: DataId | None = None) -> None:
        self.train, self.val, self.pack, self.data = train, val or [], pack, data  # data: train's, checked on a resume

    def train_data(self, tokenizer, *, rank: int = 0, world_size: int = 1) -> SFTLoader:
        b = self.run.batching
        return SFTLoader(self.train, seq_len=b.seq_len, batch_size=b.batch_size, seed=b.seed, pack=self.pack,
                         pad_id=tokenizer.eos_id, rank=rank, world_size=world_size, data=self.data)

    def val_data(self, tokenizer) -> dict[str, list[Batch]]:
        if not self.val:
            return {}
        rows = pack_rows(self.val, np.arange(len(self.val)), seq_len=self.run.batching.seq_len, pack=self.pack,
                         pad_id=tokenizer.eos_id)
        B = self.run.batching.batch_size
        return {"sft": [rows_to_batch(rows[i:i + B]) for i in range(0, len(rows), B)]}

    def loss(self, model, batch: Batch):
        return token_loss_sum(model, batch, doc_mask=self.pack, impl=self.run.loss_impl,
                              unseen_smoothing=self.run.unseen_smoothing), {}

    def evaluate(self, model, val, *, device, autocast) -> dict[str, float]:
        res = evaluate(model, val["sft"], device=device, doc_mask=self.pack, autocast=autocast,
                       impl=self.run.loss_impl)
        return {"eval_loss": res["loss"], "eval_ppl": res["ppl"], "eval_tokens": res["tokens"]}


def load_sft_data(path: str, fmt: ChatFormat, *, max_len: int, split: str = "train",
                 what: str = "posttrain.data") -> list[Encoded]:
    return encode_conversations(load_records(path, split=split, what=what), fmt, max_len=max_len)
