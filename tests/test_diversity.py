"""The batch-diversity measure (kiln.data.diversity) and where it is reported (`kiln data verify`).

References: a Monte Carlo draw of random rows from a packed stream (for the closed form), a loader
that repeats one document (must WARN), and the stream-order loader against the row shuffle.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_kiln
from kiln.cli import main as cli
from kiln.config import SourceConfig
from kiln.data.diversity import PASS_RATIO, Diversity, expected, observe, shard_diversity, text_diversity
from kiln.data.prepare import prepare
from test_loader import TOK, write_jsonl
from test_shards import word_tokenizer

T, B = 8, 4


@pytest.fixture(autouse=True)
def _caches(monkeypatch, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("KILN_CACHE", str(base / "kiln-cache"))
    monkeypatch.setenv("HF_HOME", str(base / "hf-home"))


def long_docs(path, markers, *, seed: int = 0):
    """Documents of 16-64 tokens: 2-8 rows of T=8, so consecutive rows share documents."""
    rng = np.random.default_rng(seed)
    return write_jsonl(path, markers, lengths=rng.integers(15, 63, len(markers)).tolist())


def stream_rows(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Documents laid end to end: the documents each row's inputs touch (rows at stride seq_len)."""
    ends = np.cumsum(lengths)
    n = int((ends[-1] - 1) // seq_len)
    first = np.searchsorted(ends, np.arange(n) * seq_len, side="right")
    last = np.searchsorted(ends, np.arange(n) * seq_len + seq_len - 1, side="right")
    return [list(range(a, b + 1)) for a, b in zip(first, last)]


def test_the_closed_form_matches_random_rows_drawn_from_a_packed_stream():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 120, 300)  # tokens with EOS: from a piece of one row to 15 rows of 8
    k_batch, k_group = B, 10 * B
    sims = {"docs": [], "docs_group": []}
    for _ in range(40):  # random document orders: offsets as random as the closed form assumes
        order = rng.permutation(len(lengths))
        rows = stream_rows(lengths[order], T)
        for key, k in (("docs", k_batch), ("docs_group", k_group)):
            for _ in range(50):
                pick = rng.integers(0, len(rows), k)  # independent uniform rows
                sims[key].append(len({d for j in pick for d in rows[j]}))
    n_rows = (lengths.sum() - 1) // T
    exp = expected(lengths.astype(float), np.full(len(lengths), 1 / n_rows), np.ones(len(lengths)), np.array([1.0]),
                   seq_len=T, batch_size=B)
    for key in sims:
        assert exp[key] == pytest.approx(np.mean(sims[key]), rel=0.015), key
    assert exp["sources"] == exp["sources_group"] == 1.0


def test_a_loader_that_repeats_one_document_warns_and_random_rows_pass():
    lengths = np.random.default_rng(0).integers(2, 120, 200).astype(float)
    n_rows = (lengths.sum() - 1) // T
    exp = expected(lengths, np.full(200, 1 / n_rows), np.ones(200), np.array([1.0]), seq_len=T, batch_size=B)
    one = Diversity(batch_size=B, batches=50, observed=observe([[(0, 7)]] * (50 * B), batch_size=B), expected=exp)
    assert one.observed["docs"] == one.observed["docs_group"] == 1.0
    assert one.status == "WARN" and min(one.ratios.values()) < 0.1 and "below 0.75 of random rows" in one.line()
    rows = stream_rows(lengths, T)
    rng = np.random.default_rng(1)
    random_rows = [[(0, d) for d in rows[j]] for j in rng.integers(0, len(rows), 50 * B)]
    ok = Diversity(batch_size=B, batches=50, observed=observe(random_rows, batch_size=B), expected=exp)
    assert ok.status == "PASS" and min(ok.ratios.values()) > 0.9, ok.ratios
    assert "documents per batch of 4 rows" in ok.line() and "sources" not in ok.line()  # one source: not shown


@pytest.mark.parametrize("streaming", [False, True])
def test_the_stream_order_warns_and_the_row_shuffle_passes(tmp_path, streaming):
    a = SourceConfig(path=str(long_docs(tmp_path / "a.jsonl", list(range(1000, 1300)))), streaming=streaming)
    b = SourceConfig(path=str(long_docs(tmp_path / "b.jsonl", list(range(5000, 5100)), seed=1)), weight=0.5)
    kw = {"seq_len": T, "batch_size": B, "seed": 3, "encode_batch": 16}
    plain = text_diversity([a, b], TOK, row_shuffle=0, **kw)
    shuffled = text_diversity([a, b], TOK, row_shuffle=1024, **kw)
    assert plain.status == "WARN" and plain.ratios["docs_group"] < 0.5, plain.line()
    assert shuffled.status == "PASS" and min(shuffled.ratios.values()) >= PASS_RATIO, shuffled.line()
    # two sources, a third of the documents from b: random rows see both in most batches
    assert 1.5 < shuffled.expected["sources"] < 2 and "sources per batch" in shuffled.line()
    assert plain.observed["sources"] < shuffled.observed["sources"]
    unshuffled = text_diversity([a, b], TOK, row_shuffle=1024, shuffle=False, **kw)  # file order, stream order
    assert unshuffled.status == "WARN" and "set data.shuffle=true" in unshuffled.line()


def distinct_words(path, n: int, *, start: int, seed: int = 0):
    """n documents of 16-64 words, every word a distinct number: no two blocks are alike (kiln data verify)."""
    lengths = np.random.default_rng(seed).integers(16, 64, n)
    ends = start + np.cumsum(lengths)
    with open(path, "w") as f:
        for a, b in zip(ends - lengths, ends):
            f.write(json.dumps({"text": " ".join(str(w) for w in range(a, b))}) + "\n")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("div")
    tok = word_tokenizer(d / "tok.json", 32768)
    a = SourceConfig(path=str(distinct_words(d / "web.jsonl", 200, start=1000)), name="web")
    b = SourceConfig(path=str(distinct_words(d / "code.jsonl", 100, start=20000, seed=1)), name="code")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_CACHE", str(d / "cache"))
        prepare([a, b], d / "prepared", tokenizer=tok, workers=1, shard_docs=64, quiet=True)
    return {"dir": d, "tok": tok, "out": str(d / "prepared"), "text": a.path}


def test_prepared_shards_are_already_as_diverse_as_random_rows(folders):
    shuffled = shard_diversity([folders["out"]], seq_len=T, batch_size=B, seed=0)
    assert shuffled.status == "PASS" and min(shuffled.ratios.values()) > 0.9, shuffled.line()
    assert shuffled.expected["sources"] > 1.5  # the folder was prepared from two sources
    in_order = shard_diversity([folders["out"]], seq_len=T, batch_size=B, seed=0, shuffle=False)
    assert in_order.status == "WARN" and "set data.shuffle=true" in in_order.line()
    mixed = shard_diversity([folders["out"], folders["out"]], seq_len=T, batch_size=B, seed=0, weights=[1, 3])
    assert mixed.status == "PASS", mixed.line()


def test_kiln_data_verify_prints_the_diversity(folders, capsys):
    def verify(*args: str) -> tuple[str, dict]:
        assert cli(["data", "verify", *args]) == 0  # a WARN is not a failure of the data
        lines = capsys.readouterr().out.strip().splitlines()
        return lines[-2], json.loads(lines[-1])

    text = [folders["text"], "--seq-len", str(T), "--batch-size", str(B), "--tokenizer", folders["tok"]]
    r = run_kiln("data", "verify", *text, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # the default data.row_shuffle, as a user types it
    line, summary = r.stdout.strip().splitlines()[-2:]
    assert line.startswith("diversity: PASS: 4.") and "per 10 batches" in line, line
    assert json.loads(summary)["diversity"]["ratios"]["docs_group"] >= PASS_RATIO
    line, summary = verify(*text, "--row-shuffle", "0")
    assert line.startswith("diversity: WARN: ") and "raise data.row_shuffle" in line, line
    assert summary["ok"] and summary["diversity"]["status"] == "WARN"
    line, summary = verify(folders["out"], "--seq-len", str(T), "--batch-size", str(B))
    assert line.startswith("diversity: PASS: ") and summary["diversity"]["batches"] == 100
    assert cli(["data", "verify", folders["out"], "--seq-len", str(T), "--batches", "0"]) == 0  # not measured
    (only,) = capsys.readouterr().out.strip().splitlines()
    assert "diversity" not in json.loads(only)
