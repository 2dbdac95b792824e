"""Packing: rows tile the token stream exactly, targets never cross documents, carry resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.data.packing import IGNORE, Batch, Packer, flatten_documents, make_batch, pack_documents

EOS = 0


def random_docs(n: int, *, seed: int = 0, max_len: int = 20) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, size=int(rng.integers(1, max_len))).tolist() for _ in range(n)]


def stream_of(docs: list[list[int]]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += [*d, EOS]
    return out


@pytest.mark.parametrize("seq_len", [1, 3, 8, 50])
def test_inputs_tile_the_stream_and_targets_are_next_tokens(seq_len):
    docs = random_docs(40)
    stream = stream_of(docs)
    doc_of = np.repeat(np.arange(len(docs)), [len(d) + 1 for d in docs])  # (N,) document of each token
    rows = pack_documents(docs, seq_len=seq_len, eos_id=EOS)
    assert len(rows) == (len(stream) - 1) // seq_len
    batch = make_batch(rows)
    B, T = batch.tokens.shape
    assert T == seq_len and batch.tokens.dtype == torch.int64 and batch.doc_ids.dtype == torch.int32
    # inputs, concatenated over rows, are exactly the start of the stream: nothing lost, nothing repeated
    assert batch.tokens.flatten().tolist() == stream[:B * T]
    nxt = torch.tensor(stream[1:B * T + 1]).view(B, T)
    cross = torch.from_numpy(doc_of[1:B * T + 1] != doc_of[:B * T]).view(B, T)
    assert torch.equal(batch.targets[~cross], nxt[~cross])
    assert (batch.targets[cross] == IGNORE).all()
    # a target is ignored exactly when its input is an EOS (the next token starts another document)
    assert torch.equal(batch.targets == IGNORE, batch.tokens == EOS)
    assert batch.num_targets == int((~cross).sum())


def test_doc_ids_restart_per_row_and_eos_belongs_to_its_document():
    docs = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]]  # stream 5 6 7 E 8 9 E 10 E 11 12 13 14 E
    rows = pack_documents(docs, seq_len=4, eos_id=EOS)
    assert [r.tokens.tolist() for r in rows] == [[5, 6, 7, 0, 8], [8, 9, 0, 10, 0], [0, 11, 12, 13, 14]]
    assert [r.doc_ids.tolist() for r in rows] == [[0, 0, 0, 0, 1], [0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    b = make_batch(rows)
    assert b.targets.tolist() == [[6, 7, 0, IGNORE], [9, 0, IGNORE, 0], [IGNORE, 12, 13, 14]]
    assert b.doc_ids.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1]]


def test_incremental_adds_give_the_same_rows_and_empty_docs_are_skipped():
    docs = random_docs(60, seed=1)
    whole = pack_documents(docs, seq_len=7, eos_id=EOS)
    packer, rows = Packer(seq_len=7, eos_id=EOS), []
    rng = np.random.default_rng(2)
    i = 0
    while i < len(docs):
        k = int(rng.integers(1, 5))
        packer.add([*docs[i:i + k], []])  # an empty document contributes nothing
        rows += list(packer.rows())
        i += k
        assert len(packer) <= 7  # only the carry (< seq_len + 1 tokens) stays after draining
    assert len(rows) == len(whole)
    for a, b in zip(rows, whole):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.doc_ids, b.doc_ids)


@pytest.mark.parametrize("pops", [0, 1, 3, 9])
def test_state_dict_resume_gives_identical_rows(pops):
    docs = random_docs(30, seed=3)
    ref = Packer(seq_len=5, eos_id=EOS)
    ref.add(docs[:15])
    for _ in range(pops):
        ref.pop_row()
    state = ref.state_dict()
    assert isinstance(state["tokens"], list) and isinstance(state["doc_ids"], list)
    resumed = Packer(seq_len=5, eos_id=EOS)
    resumed.load_state_dict(state)
    for p in (ref, resumed):
        p.add(docs[15:])
    a, b = list(ref.rows()), list(resumed.rows())
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.doc_ids, y.doc_ids)


def test_batch_to_and_tail():
    packer = Packer(seq_len=16, eos_id=EOS)
    packer.add([[1, 2, 3], [4, 5]])
    assert packer.ready == 0
    tail = packer.tail()
    assert tail is not None and tail.tokens.tolist() == [1, 2, 3, 0, 4, 5, 0]
    b = make_batch([tail]).to("cpu")
    assert isinstance(b, Batch) and b.tokens.shape == (1, 6) and b.num_targets == 5


def test_remainder_drop_starts_rows_at_documents_like_a_reference_walk():
    docs = random_docs(80, seed=4, max_len=15)
    T = 6
    stream = stream_of(docs)
    starts = np.cumsum([0] + [len(d) + 1 for d in docs])[:-1]  # (n,) stream offset of each document
    ref, p = [], 0
    while p + T + 1 <= len(stream):  # each row: T+1 tokens from a document start; the next row starts at
        ref.append(stream[p:p + T + 1])  # the first document starting at or after offset T of this one
        later = starts[starts >= p + T]
        if not len(later):
            break
        p = int(later[0])
    rows = pack_documents(docs, seq_len=T, eos_id=EOS, remainder="drop")
    assert [r.tokens.tolist() for r in rows] == ref
    assert all(r.doc_ids[0] == 0 and r.tokens[0] != EOS for r in rows)
    packer, inc = Packer(seq_len=T, eos_id=EOS, remainder="drop"), []
    for i in range(0, len(docs), 3):  # incremental adds give the same rows
        packer.add(docs[i:i + 3])
        inc += [r.tokens.tolist() for r in packer.rows()]
    assert inc == ref
    assert packer.dropped > 0 and len(ref) < len(pack_documents(docs, seq_len=T, eos_id=EOS))


def test_flatten_documents_is_the_stream_that_packer_and_prepare_share():
    from kiln.data.prepare import encode_stream

    docs = [*random_docs(30, seed=5), [], [9]]
    flat, lengths = flatten_documents(docs, eos_id=EOS)
    assert flat.tolist() == stream_of([d for d in docs if d]) and flat.dtype == np.int64
    assert lengths.tolist() == [len(d) + 1 for d in docs if d]
    empty, none = flatten_documents([[], []], eos_id=EOS)
    assert len(empty) == len(none) == 0

    class Ids:  # a tokenizer that returns the documents themselves
        eos_id = EOS

        def encode_batch(self, texts):
            return [docs[int(t)] for t in texts]

    out, n = encode_stream(Ids(), [str(i) for i in range(len(docs))], np.dtype(np.uint16))
    assert out.dtype == np.uint16 and out.tolist() == flat.tolist() and n.tolist() == lengths.tolist()
