"""Checks on the bundled corpus (src/kiln/data/corpus), read with plain gzip + json.

The files are produced by scripts/build_corpus.py; see src/kiln/data/corpus/README.md.
"""

from __future__ import annotations

import gzip
import json
import re
from functools import cache
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parent.parent / "src" / "kiln" / "data" / "corpus"
SOURCES = {"shakespeare", "austen"}
MIN_CHARS, MAX_CHARS = 1_000, 60_000  # bounds enforced by scripts/build_corpus.py
WINDOW, N_OFFSETS = 200, 20


@cache
def load(split: str) -> tuple[dict, ...]:
    path = CORPUS / f"{split}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


@pytest.mark.parametrize("split", ["train", "val"])
def test_records_well_formed(split):
    docs = load(split)
    # the build is byte-reproducible: these counts change only with scripts/build_corpus.py (3% held out per source)
    want = {"train": {"austen": 261, "shakespeare": 194}, "val": {"austen": 8, "shakespeare": 6}}[split]
    assert {s: sum(d["source"] == s for d in docs) for s in SOURCES} == want
    for d in docs:
        assert set(d) == {"text", "source", "title"}
        assert all(isinstance(d[k], str) for k in d)
        assert d["text"].strip() and d["title"].strip()
        assert d["source"] in SOURCES
        assert "\r" not in d["text"]
        assert "\n\n\n\n" not in d["text"]
        assert not re.search(r"[ \t]+\n", d["text"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_sizes_within_bounds(split):
    for d in load(split):
        assert MIN_CHARS <= len(d["text"]) <= MAX_CHARS, (d["title"], len(d["text"]))


@pytest.mark.parametrize("split", ["train", "val"])
def test_both_sources_present(split):
    assert {d["source"] for d in load(split)} == SOURCES


@pytest.mark.parametrize("split", ["train", "val"])
def test_no_boilerplate(split):
    bad = re.compile(r"gutenberg|www\.|https?://|copyright|\betext\b", re.IGNORECASE)
    for d in load(split):
        m = bad.search(d["text"]) or bad.search(d["title"])
        assert m is None, (d["title"], m.group(0))


def test_titles_unique_and_no_duplicate_texts():
    docs = load("train") + load("val")
    assert len({(d["source"], d["title"]) for d in docs}) == len(docs)
    assert len({d["text"] for d in docs}) == len(docs)


def test_val_fraction():
    n_train, n_val = len(load("train")), len(load("val"))
    assert 0.02 <= n_val / (n_train + n_val) <= 0.04


def test_no_val_text_in_train():
    train = load("train")
    train_texts = {d["text"] for d in train}
    train_titles = {(d["source"], d["title"]) for d in train}
    big = "\x00".join(d["text"] for d in train)
    for d in load("val"):
        assert d["text"] not in train_texts, d["title"]
        assert (d["source"], d["title"]) not in train_titles, d["title"]
        text = d["text"]
        n = len(text)
        offsets = {i * (n - WINDOW) // (N_OFFSETS - 1) for i in range(N_OFFSETS)} if n > WINDOW else {0}
        for o in sorted(offsets):
            assert text[o : o + WINDOW] not in big, (d["title"], o)
