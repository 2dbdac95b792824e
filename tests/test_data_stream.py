"""Text pipeline at scale: DataLoader workers, (rank, worker) disjointness, streaming sources, runs
that go dry, exact resume with workers, presets on local stand-ins.

References: an epoch must hold every document exactly once (closed form), a loader with N workers
must equal the round robin of its N shards computed in this process, and a resumed loader must
equal the uninterrupted one, bitwise.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

from kiln.config import SourceConfig, load_config
from kiln.data.loader import PackedLoader
from kiln.data.mixing import DataExhausted, StreamDocs, TextStream
from kiln.errors import DataError
from test_loader import EOS, TOK, X, doc_text, stream_docs, write_jsonl


@pytest.fixture(autouse=True)
def _caches(monkeypatch, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("KILN_CACHE", str(base / "kiln-cache"))
    monkeypatch.setenv("HF_HOME", str(base / "hf-home"))


def same(x, y) -> bool:
    return torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets) and torch.equal(x.doc_ids, y.doc_ids)


def expected(m: int) -> list[int]:
    return [m] + [X] * (1 + (m * 7) % 11)


KW = {"seq_len": 8, "batch_size": 3, "seed": 5, "encode_batch": 4, "row_shuffle": 0}  # rows in stream order


def per_shard_docs(batches, n_workers: int) -> list[list[list[int]]]:
    """Batch k of a rank comes from worker k mod n: split before rebuilding each shard's document stream."""
    return [stream_docs(batches[w::n_workers]) for w in range(n_workers)]


@pytest.mark.parametrize("streaming", [False, True])
def test_two_ranks_by_two_workers_read_every_document_once_per_epoch(tmp_path, streaming):
    markers = list(range(1000, 1061))  # 61 documents over 4 shards: 16 + 15 + 15 + 15
    for i, chunk in enumerate([markers[:20], markers[20:45], markers[45:]]):
        write_jsonl(tmp_path / f"part{i}.jsonl", chunk)
    src = SourceConfig(path=str(tmp_path / "part*.jsonl"), streaming=streaming)
    epochs: list[list[int]] = [[], []]
    for rank in range(2):
        ld = PackedLoader([src], TOK, rank=rank, world_size=2, num_workers=2, shuffle_buffer=8, **KW)
        batches = [ld.next_batch() for _ in range(24)]  # 12 per worker: over two epochs of its shard
        ld.close()
        for w, docs in enumerate(per_shard_docs(batches, 2)):
            share = len(range(2 * rank + w, len(markers), 4))  # map sources stride, streams step by 4 too
            assert len(docs) >= 2 * share
            assert all(d == expected(d[0]) for d in docs)  # whole documents, in one piece
            epochs[0] += [d[0] for d in docs[:share]]
            epochs[1] += [d[0] for d in docs[share:2 * share]]
    assert sorted(epochs[0]) == markers and sorted(epochs[1]) == markers  # each exactly once per epoch
    assert epochs[0] != epochs[1]  # and in a new order


def test_a_source_that_runs_dry_stops_with_one_line_when_configured(tmp_path):
    src = SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1020)))))
    for workers in (0, 2):
        ld = PackedLoader([src], TOK, num_workers=workers, on_exhausted="stop", **KW)
        with pytest.raises(DataExhausted) as e:
            for _ in range(100):
                ld.next_batch()
        ld.close()
        assert "ran dry after 1 epoch(s)" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_workers_equal_the_round_robin_of_their_shards_computed_in_process(tmp_path):
    src = [SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1040))))),
           SourceConfig(path=str(write_jsonl(tmp_path / "b.jsonl", list(range(5000, 5013)))), weight=0.5)]
    ld = PackedLoader(src, TOK, rank=1, world_size=2, num_workers=2, **KW)
    got = [ld.next_batch() for _ in range(14)]
    ld.close()
    shards = [TextStream(src, TOK, shard=2 + w, num_shards=4, **KW) for w in range(2)]  # rank 1: shards 2, 3
    ref = [shards[k % 2].next_batch() for k in range(14)]
    assert all(same(a, b) for a, b in zip(got, ref))
    assert not same(got[0], got[1])  # the two workers read different documents


@pytest.mark.parametrize("streaming, skip", [(False, 0), (True, 0), (True, 3)])  # skip: split by document
def test_resume_with_workers_is_exact_at_any_batch(tmp_path, streaming, skip):
    for i in range(3):
        write_jsonl(tmp_path / f"s{i}.jsonl", list(range(1000 + 100 * i, 1017 + 100 * i)))
    src = [SourceConfig(path=str(tmp_path / "s*.jsonl"), streaming=streaming, skip=skip),
           SourceConfig(path=str(tmp_path / "s0.jsonl"), weight=0.6)]
    args = {**KW, "num_workers": 2, "shuffle_buffer": 7}
    ref_ld = PackedLoader(src, TOK, **args)
    ref = [ref_ld.next_batch() for _ in range(32)]
    assert ref_ld.epoch >= 1  # the run crosses epochs of every source
    ref_ld.close()
    for n in (5, 10):  # odd: the resumed loader starts with worker 1
        first = PackedLoader(src, TOK, **args)
        for _ in range(n):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # plain data: survives JSON
        first.close()
        resumed = PackedLoader(src, TOK, **args)
        resumed.load_state_dict(state)
        assert all(same(resumed.next_batch(), ref[i]) for i in range(n, 32)), n
        resumed.close()


def test_on_exhausted_drop_reads_each_source_once_then_starts_the_next_epoch(tmp_path):
    a = SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1030)))))
    b = SourceConfig(path=str(write_jsonl(tmp_path / "b.jsonl", list(range(5000, 5006)))), weight=4.0)
    ts = TextStream([a, b], TOK, on_exhausted="drop", **KW)
    handles = []
    while ts.epoch == 0:
        i, h = ts._next_doc()
        handles.append((i, h))
    last = handles.pop()  # the draw that started round 1
    assert sorted(h for i, h in handles if i == 0) == list(range(30))  # each document once in the round
    assert sorted(h for i, h in handles if i == 1) == list(range(6))
    assert [i for i, _ in handles[-5:]] == [0] * 5  # b (heavier) ran dry first and left the mix
    assert last[1] is not None and ts.epoch == 1


def test_on_exhausted_cycle_keeps_the_weights(tmp_path):
    a = SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1030)))))
    b = SourceConfig(path=str(write_jsonl(tmp_path / "b.jsonl", list(range(5000, 5006)))), weight=1.0)
    ts = TextStream([a, b], TOK, **KW)
    picks = [ts._next_doc()[0] for _ in range(4000)]
    share = picks.count(1) / len(picks)
    assert abs(share - 0.5) < 4 * (0.25 / len(picks)) ** 0.5  # within 4 sigma
    assert ts.docs[1].epoch > 4 * ts.docs[0].epoch  # the small source cycles, the weights hold


def test_remainder_drop_starts_every_row_at_a_document(tmp_path):
    src = SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1050)))))
    ld = PackedLoader([src], TOK, remainder="drop", **KW)
    for _ in range(6):
        b = ld.next_batch()
        assert (b.tokens[:, 0] >= 1000).all()  # a marker: the first token of a document
        for row in b.tokens.tolist():
            m = row[0]
            assert row[:len(expected(m))] == expected(m)[:len(row)]


def test_streaming_bad_input_is_one_clear_line(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", [1000, 1001])
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok\n".encode() + "na\u00efve".encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        (SourceConfig(path=str(tmp_path / "ok.jsonl"), text_column="body", streaming=True), "no column 'body'"),
        (SourceConfig(path=str(tmp_path / "missing.jsonl"), streaming=True), "no such file"),
        (SourceConfig(path=str(tmp_path / "none-*.jsonl"), streaming=True), "glob matches no files"),
        (SourceConfig(path=str(tmp_path / "empty.jsonl"), streaming=True), "empty source"),
        (SourceConfig(path=str(tmp_path / "latin1.txt"), streaming=True), "not valid UTF-8 (first bad byte at offset 11)"),
    ]
    for src, hint in cases:
        with pytest.raises(DataError) as e:
            PackedLoader([src], TOK, **KW).next_batch()
        msg = str(e.value)
        assert src.path in msg and hint in msg and "\n" not in msg, msg


def test_a_stream_of_empty_texts_is_refused_within_its_first_epoch(tmp_path):
    """Each epoch of a stream reopens it: one of nothing used to loop for minutes before a vaguer error."""
    (tmp_path / "blank.jsonl").write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(5)))
    write_jsonl(tmp_path / "ok.jsonl", [1000, 1001, 1002])
    blank = SourceConfig(path=str(tmp_path / "blank.jsonl"), streaming=True)
    for sources in ([blank], [SourceConfig(path=str(tmp_path / "ok.jsonl")), blank]):
        with pytest.raises(DataError, match="blank.jsonl: empty source .every document .* has empty text"):
            ld = PackedLoader(sources, TOK, **KW)
            for _ in range(50):
                ld.next_batch()
    # one document with text, in the last of several windows, is enough for every epoch after it
    lines = [json.dumps({"text": ""}) for _ in range(7)] + [json.dumps({"text": doc_text(1000, 3)})]
    (tmp_path / "sparse.jsonl").write_text("\n".join(lines) + "\n")
    ld = PackedLoader([SourceConfig(path=str(tmp_path / "sparse.jsonl"), streaming=True)], TOK,
                      shuffle_buffer=2, **KW)
    assert {d[0] for d in stream_docs([ld.next_batch() for _ in range(6)]) if d} == {1000}


def test_skip_and_take_hold_out_the_head_of_a_source(tmp_path):
    path = str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1020))))
    for streaming in (False, True):
        held = TextStream([SourceConfig(path=path, take=5, streaming=streaming)], TOK, shuffle=False, **KW)
        rest = TextStream([SourceConfig(path=path, skip=5, streaming=streaming)], TOK, shuffle=False, **KW)
        first = [d[0] for d in stream_docs(held.next_batch() for _ in range(4))]
        second = [d[0] for d in stream_docs(rest.next_batch() for _ in range(8))]
        assert first[:5] == list(range(1000, 1005)) and first[5] == 1000  # take=5 cycles over 5 documents
        assert second[:15] == list(range(1005, 1020))
    with pytest.raises(DataError, match="skip=30 leaves no documents"):
        TextStream([SourceConfig(path=path, skip=30)], TOK, **KW)


@pytest.mark.parametrize("shuffle", [False, True])
def test_skip_and_take_are_global_when_a_stream_splits_by_file(tmp_path, shuffle):
    markers = list(range(1000, 1080))  # 4 files x 20 over 4 shards: datasets would give each shard one file
    for i in range(4):
        write_jsonl(tmp_path / f"part{i}.jsonl", markers[20 * i:20 * (i + 1)])
    path = str(tmp_path / "part*.jsonl")
    for kw, want in (({"skip": 30}, markers[30:]), ({"take": 30}, markers[:30]),
                     ({"skip": 10, "take": 45}, markers[10:55]), ({}, markers)):
        seen = []
        for shard in range(4):  # one epoch of every shard
            docs = StreamDocs(SourceConfig(path=path, streaming=True, **kw), 0, seed=1, shuffle=shuffle, buffer=8,
                              shard=shard, num_shards=4)
            while (text := docs.next_handle()) is not None:
                seen.append(int(text.split()[0]))
        assert sorted(seen) == want, kw  # the held-out head never reaches training, whatever the split


def test_a_stream_refuses_to_resume_when_its_files_changed(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1030)))
    src = [SourceConfig(path=str(path), streaming=True)]
    ld = PackedLoader(src, TOK, **KW)
    ld.next_batch()
    state = ld.state_dict()
    PackedLoader(src, TOK, **KW).load_state_dict(state)  # unchanged: resumes
    write_jsonl(path, list(range(2000, 2030)))  # same names, same number of documents: other content
    os.utime(path, ns=(1, 1))
    with pytest.raises(DataError, match="a.jsonl: data changed under a resume .*sizes or times changed"):
        PackedLoader(src, TOK, **KW).load_state_dict(state)


@pytest.mark.parametrize("preset, domains", [("mix-smollm", 2), ("mix-smol-web-code-math", 4)])
def test_mix_presets_run_on_local_stand_ins_with_their_weights(tmp_path, preset, domains):
    cfg = load_config(preset)
    assert len(cfg.data.train) == domains and all(s.streaming for s in cfg.data.train)
    assert {s.name for s in cfg.data.val} <= {s.name for s in cfg.data.train} | {"web"}
    stand_ins = []
    for i, s in enumerate(cfg.data.train):  # the hub datasets, replaced by local files with their columns
        path = tmp_path / f"{s.name}.jsonl"
        with open(path, "w") as f:
            for m in range(10000 * (i + 1), 10000 * (i + 1) + 300):
                f.write(json.dumps({s.text_column: doc_text(m, 0)}) + "\n")
        stand_ins.append(SourceConfig(path=str(path), name=s.name, weight=s.weight, text_column=s.text_column,
                                      streaming=True, skip=min(s.skip, 50)))  # the preset's hold-out, scaled
    ld = PackedLoader(stand_ins, TOK, seq_len=64, batch_size=8, seed=1, encode_batch=64, shuffle_buffer=100,
                      row_shuffle=0, num_workers=2)  # 2 shards, rows in stream order (documents rebuilt)
    docs = sum(per_shard_docs([ld.next_batch() for _ in range(60)], 2), [])  # ~15K documents of 2 tokens
    ld.close()
    for i, s in enumerate(stand_ins):  # the held-out head never reaches training
        assert not any(10000 * (i + 1) <= d[0] < 10000 * (i + 1) + s.skip for d in docs), s.name
    counts = Counter(d[0] // 10000 - 1 for d in docs)
    n = sum(counts.values())
    total = sum(s.weight for s in stand_ins)
    for i, s in enumerate(stand_ins):
        p = s.weight / total
        assert abs(counts[i] / n - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-9, (s.name, counts[i] / n, p)
    assert EOS not in [d[0] for d in docs]
