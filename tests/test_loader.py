"""Sources and PackedLoader: rank-disjoint epochs, determinism, exact resume, weights, clear errors.

Documents are "<marker> x x x" with a unique integer marker; a trivial tokenizer maps the marker
to itself and every other word to X, so each document can be found again in the packed stream.
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from kiln.config import SourceConfig
from kiln.data.loader import PackedLoader, validation_batches
from kiln.data.packing import IGNORE
from kiln.data.sources import load_documents, open_stream, resolve_files, source_name
from kiln.errors import DataError

EOS, X = 1, 7


class MarkerTokenizer:
    """Whitespace words: digits -> that integer, anything else -> X. Never adds BOS/EOS."""

    name, vocab_size, eos_id, bos_id = "marker", 1 << 20, EOS, None

    def encode(self, text: str) -> list[int]:
        return [int(w) if w.isdigit() else X for w in text.split()]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


TOK = MarkerTokenizer()


@pytest.fixture(autouse=True)
def _kiln_cache(monkeypatch, tmp_path_factory):
    """datasets' Arrow cache goes to a per-session temp dir, not ~/.cache/kiln."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path_factory.getbasetemp() / "kiln-cache"))


def doc_text(marker: int, length: int) -> str:
    return " ".join([str(marker)] + ["x"] * length)


def write_jsonl(path: Path, markers: list[int], *, lengths: list[int] | None = None) -> Path:
    lengths = lengths or [1 + (m * 7) % 11 for m in markers]
    with open(path, "w") as f:
        for m, n in zip(markers, lengths):
            f.write(json.dumps({"text": doc_text(m, n), "id": m}) + "\n")
    return path


def stream_docs(batches) -> list[list[int]]:
    """Split the concatenated inputs (which tile the token stream exactly) into documents."""
    docs, cur = [], []
    for b in batches:
        for t in b.tokens.flatten().tolist():
            if t == EOS:
                docs.append(cur)
                cur = []
            else:
                cur.append(t)
    return docs


def loader(srcs, **kw) -> PackedLoader:
    """Rows in stream order (row_shuffle=0) unless asked: these tests rebuild documents from the stream;
    tests/test_rowshuffle.py relates the shuffled rows to these."""
    args = {"seq_len": 8, "batch_size": 3, "seed": 5, "encode_batch": 4, "row_shuffle": 0} | kw
    return PackedLoader(srcs, TOK, **args)


# ---- sources ---------------------------------------------------------------------------------


def test_resolve_and_load_every_format_in_file_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("100 x x\n\n101 x")  # sample_by=document: one document per file
    write_jsonl(d / "b.jsonl", [200, 201])
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "300 x", "id": 300}) + "\n")
    pq.write_table(pa.table({"text": ["400 x x", "401"], "n": [1, 2]}), d / "sub" / "d.parquet")
    (d / "notes.md").write_text("not data")
    (d / ".hidden.txt").write_text("not data")
    files = resolve_files(SourceConfig(path=str(d)))
    assert [f.relative_to(d).as_posix() for f in files] == ["a.txt", "b.jsonl", "c.jsonl.gz", "sub/d.parquet"]
    docs = load_documents(SourceConfig(path=str(d)))
    assert docs.column_names == ["text"]
    assert [t.split()[0] for t in docs["text"]] == ["100", "200", "201", "300", "400", "401"]
    pq.write_table(pa.table({"body": ["500 x"]}), tmp_path / "other.parquet")
    other = load_documents(SourceConfig(path=str(tmp_path / "other.parquet"), text_column="body"))
    assert other.column_names == ["text"] and list(other["text"]) == ["500 x"]
    mixed = load_documents(SourceConfig(path=str(d / "[bc]*")))
    assert [t.split()[0] for t in mixed["text"]] == ["200", "201", "300"]
    lines = load_documents(SourceConfig(path=str(d / "a.txt"), txt_sample_by="paragraph"))
    assert [t.strip() for t in lines["text"]] == ["100 x x", "101 x"]
    assert source_name(SourceConfig(path=str(d / "c.jsonl.gz"))) == "c"
    assert source_name(SourceConfig(path="bundled:val")) == "bundled-val"
    assert source_name(SourceConfig(path="x.txt", name="mine")) == "mine"


def test_a_saved_datasets_folder_and_a_text_file_with_a_byte_order_mark_read_as_their_text(tmp_path):
    """`Dataset.save_to_disk`'s folder failed ("cannot read as json": its state.json and dataset_info.json were read
    as documents); a .txt file's UTF-8 byte-order mark was trained on (3 tokens), where jsonl's reader drops it.
    Both read as their text now, in memory and streamed."""
    import datasets

    datasets.Dataset.from_dict({"text": [f"{i} words" for i in range(7)], "n": list(range(7))}).save_to_disk(
        str(tmp_path / "saved"))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello world\r\nsecond line\r\n")
    for streaming in (False, True):
        saved = SourceConfig(path=str(tmp_path / "saved"), streaming=streaming)
        bom = SourceConfig(path=str(tmp_path / "bom.txt"), streaming=streaming)
        if streaming:
            texts = [r["text"] for r in open_stream(saved)], [r["text"] for r in open_stream(bom)]
        else:
            texts = list(load_documents(saved)["text"]), list(load_documents(bom)["text"])
        assert texts == ([f"{i} words" for i in range(7)], ["Hello world\nsecond line\n"])


def test_bundled_paths_resolve_to_the_packaged_corpus():
    (train,) = resolve_files(SourceConfig(path="bundled:train"))
    (val,) = resolve_files(SourceConfig(path="bundled:val"))
    assert (train.name, val.name) == ("train.jsonl.gz", "val.jsonl.gz") and train.parent == val.parent
    with pytest.raises(DataError, match="bundled:test"):
        resolve_files(SourceConfig(path="bundled:test"))


def test_bad_sources_raise_one_line_data_errors_naming_the_path(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", [1000, 1001])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": None}) + "\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": oops}\n')
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok\n".encode() + "na\u00efve".encode("latin-1"))
    cases = [
        (str(tmp_path / "missing.jsonl"), {}, "no such file"),
        (str(tmp_path / "nothing-*.jsonl"), {}, "glob matches no files"),
        (str(tmp_path / "ok.jsonl"), {"text_column": "body"}, "no column 'body' (columns: text, id)"),
        (str(tmp_path / "ok.jsonl"), {"text_column": "id"}, "not text"),
        (str(tmp_path / "empty.jsonl"), {}, "empty source"),
        (str(tmp_path / "blank.jsonl"), {}, "empty text"),
        (str(tmp_path / "latin1.txt"), {}, "not valid UTF-8 (first bad byte at offset 11)"),
        (str(tmp_path / "latin1.jsonl"), {}, "document 1 is not valid UTF-8"),
        (str(tmp_path / "broken.jsonl"), {}, "cannot read as json"),
    ]
    for path, kw, hint in cases:
        with pytest.raises(DataError) as e:
            load_documents(SourceConfig(path=path, **kw))
        msg = str(e.value)
        assert path in msg and hint in msg and "\n" not in msg, msg
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        loader([SourceConfig(path=str(tmp_path / "missing.jsonl"))])
    glob = tmp_path / "g"  # one bad file of a glob: it named the glob and "(3 files)", not the file
    glob.mkdir()
    for name in ("a", "c"):
        write_jsonl(glob / f"{name}.jsonl", [1000])
    (glob / "b.jsonl").write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(DataError) as e:
        load_documents(SourceConfig(path=str(glob / "*.jsonl")))
    assert str(e.value) == (f"{glob / '*.jsonl'}: cannot read as json: {glob / 'b.jsonl'} line 2: Expecting value: "
                            "line 1 column 10 (char 9)")


# ---- loader ----------------------------------------------------------------------------------


def test_every_document_once_per_epoch_across_two_disjoint_ranks(tmp_path):
    markers = list(range(1000, 1037))  # 37 documents: ranks get 19 and 18
    src = SourceConfig(path=str(write_jsonl(tmp_path / "docs.jsonl", markers)))
    expected = {m: [m] + [X] * (1 + (m * 7) % 11) for m in markers}
    per_rank = []
    for rank in (0, 1):
        ld = loader([src], rank=rank, world_size=2)
        docs = stream_docs(ld.next_batch() for _ in range(40))
        share = 19 if rank == 0 else 18
        assert len(docs) >= 2 * share
        for d in docs[:2 * share]:
            assert d == expected[d[0]]  # documents arrive whole and in one piece
        per_rank.append([[d[0] for d in docs[:share]], [d[0] for d in docs[share:2 * share]]])
        assert ld.epoch >= 1
    for epoch in (0, 1):
        a, b = per_rank[0][epoch], per_rank[1][epoch]
        assert not set(a) & set(b)  # disjoint
        assert sorted(a + b) == markers  # together: every document exactly once
    assert per_rank[0][0] != per_rank[0][1]  # a new permutation each epoch


def test_unshuffled_order_is_file_order_strided_by_rank(tmp_path):
    src = SourceConfig(path=str(write_jsonl(tmp_path / "docs.jsonl", list(range(1000, 1010)))))
    ld = loader([src], shuffle=False, rank=1, world_size=3)
    docs = stream_docs(ld.next_batch() for _ in range(4))
    assert [d[0] for d in docs[:6]] == [1001, 1004, 1007, 1001, 1004, 1007]


def test_seed_determinism_and_targets(tmp_path):
    src = SourceConfig(path=str(write_jsonl(tmp_path / "docs.jsonl", list(range(1000, 1050)))))
    runs = {seed: [b for _, b in zip(range(6), loader([src], seed=seed))] for seed in (5, 6)}
    again = [b for _, b in zip(range(6), loader([src], seed=5))]
    assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets)
               and torch.equal(x.doc_ids, y.doc_ids) for x, y in zip(runs[5], again))
    assert [d[0] for d in stream_docs(runs[5])] != [d[0] for d in stream_docs(runs[6])]
    b = runs[5][0]
    assert b.tokens.shape == (3, 8) and torch.equal(b.targets == IGNORE, b.tokens == EOS)


def _same(x, y) -> bool:
    return torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets) and torch.equal(x.doc_ids, y.doc_ids)


@pytest.mark.parametrize("two_sources", [False, True])
def test_resume_continues_with_identical_batches_across_epochs(tmp_path, two_sources):
    srcs = [SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1023)))))]
    if two_sources:
        srcs.append(SourceConfig(path=str(write_jsonl(tmp_path / "b.jsonl", list(range(5000, 5009)))), weight=0.5))
    total = 32
    ref_loader = loader(srcs)
    ref = [ref_loader.next_batch() for _ in range(total)]
    assert ref_loader.epoch >= 2  # the run crosses epoch boundaries
    for n in (0, 1, 4, 9, 15, 22):
        first = loader(srcs)
        for _ in range(n):
            first.next_batch()
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        (shard,) = state["workers"]
        assert len(shard["snapshot"]["packer"]["tokens"]) <= 8  # the carry only: the state stays small
        resumed = loader(srcs)
        resumed.load_state_dict(state)
        for i in range(n, total):
            assert _same(resumed.next_batch(), ref[i]), (n, i)


def test_a_resume_with_other_weights_says_so(tmp_path, capsys):
    """New data.train weights on a resume are taken (the mix follows them from the resumed step on), but the
    change was silent, where removing a source or changing a started stage is refused."""
    a = SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1023)))), weight=0.7)
    b = SourceConfig(path=str(write_jsonl(tmp_path / "b.jsonl", list(range(5000, 5009)))), weight=0.3)
    first = loader([a, b])
    first.next_batch()
    state = first.state_dict()
    loader([a, b]).load_state_dict(state)
    assert capsys.readouterr().err == ""
    b2 = SourceConfig(path=b.path, weight=0.5)
    loader([a, b2]).load_state_dict(state)
    assert capsys.readouterr().err.strip() == (
        f"note: data.train weights changed since the checkpoint ({b.path} 0.3 -> 0.5): the mix follows the new "
        "weights from this step on (data.stages sets such changes in advance)")


def test_weights_set_the_share_of_documents(tmp_path):
    a = SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1040)), lengths=[1] * 40)),
                     weight=3.0)
    b = SourceConfig(path=str(write_jsonl(tmp_path / "b.jsonl", list(range(5000, 5040)), lengths=[1] * 40)),
                     weight=1.0)
    ld = loader([a, b], seq_len=32, batch_size=8, encode_batch=64)
    docs = stream_docs(ld.next_batch() for _ in range(60))  # 60 * 256 tokens / 3 per document = 5120 docs
    counts = Counter("a" if d[0] < 5000 else "b" for d in docs)
    n = counts["a"] + counts["b"]
    share = counts["a"] / n
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5, (share, n)  # within 4 sigma
    assert ld.sources[0].epoch > 2 * ld.sources[1].epoch  # equal sizes: the heavier source cycles 3x as often


def test_resume_refuses_changed_data_and_world_size(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", list(range(1000, 1020)))
    src = SourceConfig(path=str(path))
    state = loader([src], rank=0, world_size=2).state_dict()
    with pytest.raises(DataError, match="2 data-parallel ranks x data.num_workers=0, this run has 1 x 0"):
        loader([src], rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(DataError, match="data.num_workers=0, this run has 2 x 2.*kiln data prepare"):
        loader([src], rank=0, world_size=2, num_workers=2).load_state_dict(state)
    with pytest.raises(DataError, match="remainder"):
        loader([src], rank=0, world_size=2, remainder="drop").load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        loader([src], rank=0, world_size=2, seed=9).load_state_dict(state)
    with open(path, "a") as f:
        f.write(json.dumps({"text": doc_text(1020, 2)}) + "\n")
    with pytest.raises(DataError, match="data changed under a resume"):
        loader([src], rank=0, world_size=2).load_state_dict(state)


def test_validation_batches_are_fixed_first_documents_and_never_padded(tmp_path):
    src = SourceConfig(path=str(write_jsonl(tmp_path / "val.jsonl", list(range(1000, 1100)))))
    batches = validation_batches(src, TOK, seq_len=8, batch_size=4, max_tokens=80)  # 10 rows: 4 + 4 + 2
    assert [tuple(b.tokens.shape) for b in batches] == [(4, 8), (4, 8), (2, 8)]
    assert [d[0] for d in stream_docs(batches)][:3] == [1000, 1001, 1002]  # file order
    again = validation_batches(src, TOK, seq_len=8, batch_size=4, max_tokens=80)
    assert all(_same(x, y) for x, y in zip(batches, again))
    assert sum(b.tokens.numel() for b in batches) <= 80
    # a source shorter than one row is still scored, as one short (1, t) batch
    short = SourceConfig(path=str(write_jsonl(tmp_path / "short.jsonl", [1000], lengths=[3])))
    (only,) = validation_batches(short, TOK, seq_len=64, batch_size=4, max_tokens=1000)
    assert only.tokens.tolist() == [[1000, X, X, X]] and only.targets.tolist() == [[X, X, X, EOS]]


def test_resume_with_another_encode_batch_is_exact(tmp_path):
    src = [SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1040)))))]
    ref_loader = loader(src, encode_batch=8)
    ref = [ref_loader.next_batch() for _ in range(20)]
    for n in (3, 7):
        first = loader(src, encode_batch=8)
        for _ in range(n):
            first.next_batch()
        state = first.state_dict()
        for encode_batch in (1, 3, 32):  # the documents come in the same order: the rows do too
            resumed = loader(src, encode_batch=encode_batch)
            resumed.load_state_dict(state)
            assert all(_same(resumed.next_batch(), ref[i]) for i in range(n, 20)), (n, encode_batch)


def test_resume_refuses_another_tokenizer(tmp_path):
    class OtherTokenizer(MarkerTokenizer):
        name = "other"

    src = [SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", list(range(1000, 1020)))))]
    state = loader(src).state_dict()
    loader(src).load_state_dict(state)
    with pytest.raises(DataError, match=r"another tokenizer \(digest .*data.tokenizer 'other' has digest"):
        PackedLoader(src, OtherTokenizer(), seq_len=8, batch_size=3, seed=5, encode_batch=4).load_state_dict(state)


def test_json_utf8_is_validated_once_per_arrow_conversion(tmp_path, monkeypatch):
    import kiln.data.sources as sources

    calls = []
    real = sources._validate_utf8
    monkeypatch.setattr(sources, "_validate_utf8", lambda ds, where: calls.append(where) or real(ds, where=where))
    path = write_jsonl(tmp_path / "a.jsonl", [1000, 1001])
    for _ in range(3):  # three processes (ranks, workers, restarts) over one Arrow conversion
        assert len(load_documents(SourceConfig(path=str(path)))) == 2
    assert len(calls) == 1
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # edited: converted and validated again
    with pytest.raises(DataError, match="document 1 is not valid UTF-8"):
        load_documents(SourceConfig(path=str(path)))
    assert len(calls) == 2


def test_glob_sources_are_named_by_their_fixed_words_or_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "web").mkdir()
    names = {"web/*.jsonl": "web", "web/**/*.parquet": "web", "data/code-*.jsonl.gz": "code",
             "data/shard_[0-9]*.txt": "shard", "*.jsonl": tmp_path.name, "data/web.jsonl": "web"}
    assert {p: source_name(SourceConfig(path=p)) for p in names} == names


def test_first_line_folds_any_exception_into_one_line():
    from kiln.errors import first_line

    assert first_line(ValueError("bad thing\n  at line 2")) == "bad thing"
    assert first_line(KeyError()) == "KeyError" and first_line(RuntimeError("  \n")) == "RuntimeError"
    assert first_line(OSError("x" * 500)) == "x" * 200


def test_the_bundled_corpus_reads_the_same_documents_as_datasets_without_importing_it():
    """bundled:train / bundled:val load into memory (kiln.data.sources.TextList), not through datasets: the
    same texts in the same order as datasets' JSON reader gives, skip/take and indexing alike."""
    import subprocess
    import sys

    from kiln.data.sources import TextList, _load_local, load_documents, resolve_files

    for split in ("train", "val"):
        src = SourceConfig(path=f"bundled:{split}")
        ours, theirs = load_documents(src), _load_local(src, resolve_files(src), "json")
        assert isinstance(ours, TextList) and len(ours) == len(theirs) > 10
        assert ours["text"] == theirs["text"] and ours[[5, 2, 9]]["text"] == theirs[[5, 2, 9]]["text"]
        assert ours[3:7]["text"] == theirs[3:7]["text"] and ours[4]["text"] == theirs[4]["text"]
        assert load_documents(SourceConfig(path=f"bundled:{split}", skip=3, take=4))["text"] == theirs["text"][3:7]
        assert [t for b in ours.iter(batch_size=4) for t in b["text"]] == theirs["text"]
    code = ("import sys\nfrom kiln.config import SourceConfig\nfrom kiln.data.sources import load_documents\n"
            "load_documents(SourceConfig(path='bundled:train'))\nprint('datasets' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stderr
