"""The row shuffle (data.row_shuffle, kiln.data.rowshuffle): exact resume and rank/worker disjointness.

References: the loader with rows in stream order (row_shuffle=0), whose documents tests/test_loader.py
and tests/test_data_stream.py check (every document exactly once per epoch over ranks x workers), and
an uninterrupted loader, compared bitwise.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from kiln.config import SourceConfig
from kiln.data.loader import PackedLoader
from kiln.data.mixing import DataExhausted
from kiln.errors import DataError
from test_loader import TOK, write_jsonl

KW = {"seq_len": 8, "batch_size": 3, "seed": 5, "encode_batch": 4}
W = 7  # rows per window: prime to the batch size, so windows end inside batches


@pytest.fixture(autouse=True)
def _caches(monkeypatch, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("KILN_CACHE", str(base / "kiln-cache"))
    monkeypatch.setenv("HF_HOME", str(base / "hf-home"))


def same(x, y) -> bool:
    return torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets) and torch.equal(x.doc_ids, y.doc_ids)


def rows_of(batches) -> list[tuple]:
    """Every row of the batches as (input tokens + last target, doc ids): the row, whole."""
    out = []
    for b in batches:
        for tok, tgt, doc in zip(b.tokens.tolist(), b.targets.tolist(), b.doc_ids.tolist()):
            out.append((tuple(tok), tgt[-1], tuple(doc)))
    return out


def long_docs(tmp_path, *, parts: int = 3, per_part: int = 12, start: int = 1000) -> str:
    """Documents of 9-29 tokens (1-4 rows of 8) in `parts` files; a glob over them."""
    for i in range(parts):
        markers = list(range(start + 100 * i, start + 100 * i + per_part))
        write_jsonl(tmp_path / f"p{i}.jsonl", markers, lengths=[8 + (m * 5) % 21 for m in markers])
    return str(tmp_path / "p*.jsonl")


@pytest.mark.parametrize("streaming", [False, True])
def test_shuffled_rows_are_the_stream_order_rows_permuted_within_windows(tmp_path, streaming):
    src = [SourceConfig(path=long_docs(tmp_path), streaming=streaming)]
    per_shard: list[set[int]] = []
    for rank in range(2):
        loaders = [PackedLoader(src, TOK, rank=rank, world_size=2, num_workers=2, row_shuffle=rs, shuffle_buffer=5,
                                **KW) for rs in (W, 0)]
        shuffled, plain = ([ld.next_batch() for _ in range(28)] for ld in loaders)  # 14 batches a worker: 6 windows
        for ld in loaders:
            ld.close()
        for w in range(2):  # batch k of a rank comes from worker k mod 2
            ra, rb = rows_of(shuffled[w::2]), rows_of(plain[w::2])
            for k in range(len(ra) // W):
                assert sorted(ra[k * W:(k + 1) * W]) == sorted(rb[k * W:(k + 1) * W]), (rank, w, k)  # same rows...
            assert ra != rb  # ...in another order
            per_shard.append({t for row in ra for t in row[0] if t >= 1000})
    # the stream-order rows hold every document once per epoch over the 4 shards (test_data_stream); the
    # shuffled shards emit exactly those rows: together every document, and a stream's shards (every 4th
    # document, each epoch) stay disjoint (a local source's shards share a new permutation each epoch)
    if streaming:
        assert all(not a & b for i, a in enumerate(per_shard) for b in per_shard[i + 1:])
    assert set().union(*per_shard) == {m for i in range(3) for m in range(1000 + 100 * i, 1012 + 100 * i)}


@pytest.mark.parametrize("streaming, workers", [(False, 0), (True, 0), (False, 2), (True, 2)])
def test_resume_at_random_steps_is_exact(tmp_path, streaming, workers):
    srcs = [SourceConfig(path=long_docs(tmp_path), streaming=streaming),
            SourceConfig(path=str(write_jsonl(tmp_path / "b.jsonl", list(range(5000, 5009)))), weight=0.5)]
    args = {**KW, "num_workers": workers, "row_shuffle": W, "shuffle_buffer": 5}
    total = 40
    ref_ld = PackedLoader(srcs, TOK, **args)
    ref = [ref_ld.next_batch() for _ in range(total)]
    assert ref_ld.epoch >= 1  # the run crosses epochs (and, at 7 rows a window, many windows)
    ref_ld.close()
    rng = np.random.default_rng(int(streaming) * 10 + workers)
    for n in [0, *sorted(rng.choice(np.arange(1, total), size=3, replace=False).tolist())]:
        first = PackedLoader(srcs, TOK, **args)
        for _ in range(n):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # plain data
        first.close()
        for shard in state["workers"]:
            if shard is not None:  # the state is the source's at the window start: no rows in it
                assert len(shard["snapshot"]["packer"]["tokens"]) <= KW["seq_len"] and shard["pos"] <= W
        resumed = PackedLoader(srcs, TOK, **args)
        resumed.load_state_dict(state)
        got = [resumed.next_batch() for _ in range(n, total)]
        resumed.close()
        assert all(same(g, ref[i]) for g, i in zip(got, range(n, total))), n


def test_resume_with_another_encode_batch_is_exact(tmp_path):
    src = [SourceConfig(path=long_docs(tmp_path))]
    ref_ld = PackedLoader(src, TOK, **{**KW, "encode_batch": 8}, row_shuffle=W)
    ref = [ref_ld.next_batch() for _ in range(24)]
    for n in (4, 11):
        first = PackedLoader(src, TOK, **{**KW, "encode_batch": 8}, row_shuffle=W)
        for _ in range(n):
            first.next_batch()
        state = first.state_dict()
        for encode_batch in (1, 3, 32):  # the rows come in the same order: the windows hold the same rows
            resumed = PackedLoader(src, TOK, **{**KW, "encode_batch": encode_batch}, row_shuffle=W)
            resumed.load_state_dict(state)
            assert all(same(resumed.next_batch(), ref[i]) for i in range(n, 24)), (n, encode_batch)


def test_the_state_does_not_grow_with_the_window(tmp_path):
    src = [SourceConfig(path=long_docs(tmp_path, per_part=40))]
    sizes = {}
    for window in (8, 256):
        ld = PackedLoader(src, TOK, **KW, row_shuffle=window)
        for _ in range(5):
            ld.next_batch()
        sizes[window] = len(json.dumps(ld.state_dict()))
    assert sizes[256] < 1.2 * sizes[8], sizes


def drain(ld: PackedLoader) -> list:
    batches = []
    with pytest.raises(DataExhausted, match="ran dry after 1 epoch") as e:
        while True:
            batches.append(ld.next_batch())
    ld.close()
    assert "\n" not in str(e.value)
    return batches


def test_a_dry_source_emits_every_row_it_has_before_stopping(tmp_path):
    src = [SourceConfig(path=long_docs(tmp_path))]
    every = Counter(rows_of(drain(PackedLoader(src, TOK, **{**KW, "batch_size": 1}, row_shuffle=0,
                                               on_exhausted="stop"))))  # batch 1: no row left over
    for window in (W, 1000):  # 1000: the only window is the whole epoch, cut short
        got = Counter(rows_of(drain(PackedLoader(src, TOK, **KW, row_shuffle=window, on_exhausted="stop"))))
        assert got.total() == every.total() // 3 * 3 and not got - every  # all rows but the last batch's rest
    drain(PackedLoader(src, TOK, **KW, row_shuffle=W, num_workers=2, on_exhausted="stop"))


def test_resume_refuses_another_row_shuffle_and_reads_states_from_before_it(tmp_path):
    src = [SourceConfig(path=long_docs(tmp_path))]
    state = PackedLoader(src, TOK, **KW, row_shuffle=0).state_dict()
    with pytest.raises(DataError, match=r"saved with data.row_shuffle=0, this run has 7; resume with the same value"):
        PackedLoader(src, TOK, **KW, row_shuffle=W).load_state_dict(state)
    del state["row_shuffle"]  # a checkpoint written before data.row_shuffle existed: rows in stream order
    PackedLoader(src, TOK, **KW, row_shuffle=0).load_state_dict(state)
    with pytest.raises(DataError, match="data.row_shuffle=0, this run has 7"):
        PackedLoader(src, TOK, **KW, row_shuffle=W).load_state_dict(state)
    unshuffled = PackedLoader(src, TOK, **KW, row_shuffle=W, shuffle=False)  # data.shuffle=false: stream order
    assert unshuffled.state_dict()["row_shuffle"] == 0


def test_a_dry_source_stops_after_the_same_rows_whatever_the_encode_batch(tmp_path):
    """on_exhausted=stop ends where the documents end, not where a read-ahead of data.encode_batch documents ran
    past them: a source smaller than one encode batch still trains on every row it has."""
    src = [SourceConfig(path=long_docs(tmp_path))]  # 36 documents
    got = {}
    for encode_batch in (1, 4, 64):
        kw = {**KW, "batch_size": 1, "encode_batch": encode_batch}
        got[encode_batch] = rows_of(drain(PackedLoader(src, TOK, **kw, row_shuffle=0, on_exhausted="stop")))
    assert got[64] and got[1] == got[4] == got[64]
