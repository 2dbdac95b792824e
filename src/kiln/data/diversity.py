"""Batch diversity: how many documents and sources the loader's batches hold, against random rows.

A batch of rows cut from one document stream in order holds one or two documents when documents are
long (the bundled corpus: up to 68 rows of 256 tokens); rows drawn at random from the whole corpus
(an HF Trainer over grouped texts, or kiln's prepared shards) hold about one document each. The
measure runs the configured loader from its start (one shard: shard 0 of 1; more ranks or workers
only interleave more shards) for `batches` batches, labels every row with the documents its inputs
touch, and counts the distinct documents and sources per batch and per GROUP consecutive batches.

Reference: the same counts for k rows drawn independently and uniformly from the loader's mix, in
closed form. A row's inputs are T tokens at stride T, so a document of L tokens (EOS included) at a
uniformly random offset touches r = 1 + (L - 1) // T rows, plus one with probability
((L - 1) % T) / T. A uniform row touches document d with probability q_d r_d, and k rows touch it
with probability 1 - (1 - q_d r_d)^k; the expected distinct documents are the sum of that over
the corpus, and likewise 1 - (1 - s_i)^k over sources of row share s_i.
  * text sources draw the next document's source by weight (a slot), so q_d = pi_d / R, with pi_d =
    (w_i / sum w) / n_i the document's share of slots and R = E[L] / T the rows per slot. The sum over
    the corpus is estimated from the documents the measured run tokenized (a sample of slots,
    in shuffled order), each weighted by 1 / (sample size x pi_d); a stream (no document count) is
    taken as infinitely large (q_d -> 0).
  * prepared shards draw a block's folder by weight, so q_d = (w_f / sum w) / blocks_f, summed over
    every document of the index exactly.
PASS when every ratio observed / expected is at least PASS_RATIO, WARN below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from kiln.config import SourceConfig
from kiln.data.mixing import DataExhausted, MapDocs, TextStream
from kiln.data.packing import Row
from kiln.data.shards import BlockOrder, ShardSet
from kiln.data.tokenizer import Tokenizer

GROUP = 10  # consecutive batches: about the memory of AdamW's first moment (beta1 = 0.9: ~10 steps)
# PASS within a quarter of random rows on every count. The bundled corpus at T=256, B=8 measured 0.83-0.88
# per 10 batches with data.row_shuffle=4096 (six seeds), 0.06 in stream order, ~1.0 from prepared shards.
PASS_RATIO = 0.75
BATCHES = 100  # batches measured by default: 10 groups
STREAM_DOCS = 1e12  # documents assumed for a stream (no count): q_d -> 0

Label = tuple[Any, Any]  # (source, document) of a row's document
Status = Literal["PASS", "WARN"]


@dataclass
class Diversity:
    """Observed and expected (random rows) distinct documents and sources, per batch and per group."""

    batch_size: int
    batches: int
    observed: dict[str, float]  # docs, docs_group, sources, sources_group (means)
    expected: dict[str, float]  # the same for uniform random rows
    hint: str = ""  # what to do on a WARN

    @property
    def ratios(self) -> dict[str, float]:
        return {k: self.observed[k] / self.expected[k] for k in self.observed if self.expected.get(k)}

    @property
    def status(self) -> Status:
        return "PASS" if min(self.ratios.values(), default=1.0) >= PASS_RATIO else "WARN"

    def line(self) -> str:
        """One line: the counts, random rows' counts and the ratios, and what to do on a WARN."""
        o, e, r = self.observed, self.expected, self.ratios

        def count(key: str, what: str) -> str:
            return f"{o[key]:.1f} {what} (random rows: {e[key]:.1f}, ratio {r.get(key, 1.0):.2f})"

        text = count("docs", f"documents per batch of {self.batch_size} rows")
        if "docs_group" in o:
            text += ", " + count("docs_group", f"per {GROUP} batches")
        if e["sources"] > 1.01:  # one source (or one with every row): nothing to say
            text += "; " + count("sources", "sources per batch")
            if "sources_group" in o:
                text += ", " + count("sources_group", f"per {GROUP} batches")
        text += f"; over {self.batches} batches"
        if self.status == "WARN":
            text += f": below {PASS_RATIO} of random rows, consecutive rows come from few documents; {self.hint}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "batch_size": self.batch_size, "batches": self.batches,
                "observed": {k: round(v, 3) for k, v in self.observed.items()},
                "expected": {k: round(v, 3) for k, v in self.expected.items()},
                "ratios": {k: round(v, 3) for k, v in self.ratios.items()}}


def observe(rows: Sequence[Sequence[Label]], *, batch_size: int, group: int = GROUP) -> dict[str, float]:
    """Mean distinct documents and sources per batch (consecutive `batch_size` rows) and per `group`
    consecutive batches. `rows[j]` lists the (source, document) labels of row j's inputs."""
    n = len(rows) // batch_size
    assert n >= 1, "observe needs at least one batch"

    def distinct(span: int) -> tuple[float, float]:
        docs, sources = [], []
        for a in range(0, (n // span) * span * batch_size, span * batch_size):
            labels = {lab for row in rows[a:a + span * batch_size] for lab in row}
            docs.append(len(labels))
            sources.append(len({s for s, _ in labels}))
        return float(np.mean(docs)), float(np.mean(sources))

    out = dict(zip(("docs", "sources"), distinct(1)))
    if n >= group:
        out.update(zip(("docs_group", "sources_group"), distinct(group)))
    return out


def _touched(q: np.ndarray, length: np.ndarray, seq_len: int, k: int) -> np.ndarray:
    """(n,) probability that k uniform rows touch a document of `length` tokens, q per row it spans."""
    r0 = 1 + (length - 1) // seq_len
    extra = ((length - 1) % seq_len) / seq_len

    def hit(r: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):  # q r = 1 (a document in every row): log1p(-1) = -inf, hit = 1
            return -np.expm1(k * np.log1p(-np.minimum(q * r, 1.0)))

    return (1 - extra) * hit(r0) + extra * hit(r0 + 1)


def expected(length: np.ndarray, q: np.ndarray, mult: np.ndarray, shares: np.ndarray, *, seq_len: int,
             batch_size: int, group: int = GROUP) -> dict[str, float]:
    """Distinct documents and sources in a batch and in `group` batches of uniform random rows.

    length, q, mult: (n,) per document entry: tokens with EOS, probability per spanned row, how many
    corpus documents the entry stands for; shares: (S,) each source's share of rows."""
    out = {}
    for name, k in (("", batch_size), ("_group", group * batch_size)):
        out["docs" + name] = float((mult * _touched(q, length, seq_len, k)).sum())
        out["sources" + name] = float((1 - (1 - np.minimum(shares, 1.0)) ** k).sum())
    return out


def row_labels(row: Row, origins: list[tuple[int, Any, int]]) -> list[Label]:
    """(source, document) of each document the row's inputs touch (a tracked TextStream's origins)."""
    return [origins[row.first + int(j)][:2] for j in np.unique(row.doc_ids[:-1])]


def text_diversity(sources: list[SourceConfig], tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                   batches: int = BATCHES, **stream: Any) -> Diversity:
    """The measure for text sources, run through TextStream with `stream` (shuffle, row_shuffle,
    encode_batch, shuffle_buffer, remainder, on_exhausted) as the loader gets them."""
    ts = TextStream(sources, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, track=True, **stream)
    origins = ts.origins
    assert origins is not None
    rows: list[list[Label]] = []
    try:
        for _ in range(batches):
            rows += [row_labels(r, origins) for r in ts.next_rows()]
    except DataExhausted:  # on_exhausted=stop on a small source: measure what there is
        pass
    src = np.array([o[0] for o in origins])
    length = np.array([o[2] for o in origins], dtype=np.float64)
    w = np.array([s.weight for s in sources], dtype=np.float64)
    n = np.array([d.n if isinstance(d, MapDocs) else STREAM_DOCS for d in ts.docs], dtype=np.float64)
    pi = (w / w.sum() / n)[src]  # each document's share of slots
    rows_per_slot = length.mean() / seq_len
    shares = np.bincount(src, weights=length, minlength=len(sources)) / length.sum()
    exp = expected(length, pi / rows_per_slot, 1 / (len(src) * pi), shares, seq_len=seq_len, batch_size=batch_size)
    return Diversity(batch_size=batch_size, batches=len(rows) // batch_size,
                     observed=observe(rows, batch_size=batch_size), expected=exp,
                     hint=("set data.shuffle=true" if not stream.get("shuffle", True) else
                           "raise data.row_shuffle, or pre-tokenize with `kiln data prepare` (random blocks)"))


def _doc_starts(s: ShardSet) -> np.ndarray:
    """(documents,) global token offset of every document start of a prepared folder."""
    parts = [np.asarray(s.index(k)[:-1], dtype=np.int64) + int(s.bounds[k]) for k in range(len(s.records))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def shard_diversity(paths: list[str], *, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                    weights: list[float] | None = None, batches: int = BATCHES) -> Diversity:
    """The measure for prepared folders: the ShardLoader's global order (BlockOrder), one rank. Sources
    are the sources each folder was prepared from."""
    sets = [ShardSet(p) for p in paths]
    w = np.asarray(weights or [1.0] * len(sets), dtype=np.float64)
    blocks = [(s.n_tokens - 1) // seq_len for s in sets]
    order = BlockOrder(blocks, w.tolist(), seed=seed, shuffle=shuffle)
    starts = [_doc_starts(s) for s in sets]
    src_lo = [np.array([lo for _, lo, hi in s.source_ranges() if hi > lo], dtype=np.int64) for s in sets]
    n_rows = batches * batch_size
    folder, block, _ = order.assign(0, n_rows, np.zeros(len(sets), dtype=np.int64))
    rows: list[list[Label]] = []
    for f, b in zip(folder.tolist(), block.tolist()):
        a = b * seq_len
        first, last = np.searchsorted(starts[f], [a, a + seq_len - 1], side="right") - 1
        docs = range(int(first), int(last) + 1)
        src = np.searchsorted(src_lo[f], starts[f][list(docs)], side="right") - 1
        rows.append([((f, int(j)), (f, d)) for j, d in zip(src, docs)])
    length, q, shares = [], [], []
    for f, s in enumerate(sets):
        share = w[f] / w.sum()
        lengths = np.diff(np.append(starts[f], s.n_tokens)).astype(np.float64)
        length.append(lengths)
        q.append(np.full(len(lengths), share / blocks[f]))
        shares += [share * (hi - lo) / s.n_tokens for _, lo, hi in s.source_ranges() if hi > lo]
    exp = expected(np.concatenate(length), np.concatenate(q), np.ones(sum(len(x) for x in length)),
                   np.asarray(shares), seq_len=seq_len, batch_size=batch_size)
    return Diversity(batch_size=batch_size, batches=batches, observed=observe(rows, batch_size=batch_size),
                     expected=exp, hint="set data.shuffle=true" if not shuffle else "")
