"""`kiln data inspect` and `kiln data verify` for prepared folders (and `verify` for text sources).

inspect: tokens, documents and a document-length histogram per source.
verify (the Dense-180M guide's diversity check, made exact), exit 0 when clean:
  1. integrity (shards): sizes, offsets, every document ends with EOS, ids below the vocabulary, sha256;
  2. content: no two blocks of seq_len + 1 tokens (shards) or documents (text) of the train data are
     identical;
  3. with --val: no validation document also occurs in the train data (hashed token sequences, or
     hashed texts for text sources);
  4. diversity (kiln.data.diversity; PASS or WARN, never a failure): distinct documents and sources
     per batch and per 10 batches of the training loader, against random rows.
Items are compared by 128-bit blake2b digests kept in numpy arrays (16 bytes per block or document,
sorted to find equal ones), not in Python sets: memory still grows with the corpus, but at about a
tenth of the cost.
That every block or document is read once per epoch over ranks x workers is a property of the
loaders' code, not of the data: tests/test_shards.py and tests/test_data_stream.py check it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.config import SourceConfig
from kiln.data.diversity import BATCHES, shard_diversity, text_diversity
from kiln.data.shards import ShardSet
from kiln.data.sources import is_prepared, load_documents
from kiln.data.tokenizer import load_tokenizer, tokenizer_digest
from kiln.errors import DataError

HIST_EDGES = [1, 64, 256, 1024, 4096, 16384]  # document length bins, tokens (EOS included)


def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def inspect(path: str | Path) -> dict[str, Any]:
    """Per source: documents, tokens, shards, mean length and a length histogram."""
    s = ShardSet(path)
    m = s.manifest
    out: dict[str, Any] = {"tokens": s.n_tokens, "documents": s.n_docs, "shards": len(s.records),
                           "dtype": m["dtype"], "tokenizer": m["tokenizer"], "sources": {}}
    for entry in m["sources"]:
        hist = np.zeros(len(HIST_EDGES), dtype=np.int64)
        for k in entry["shards"]:
            lengths = np.diff(np.asarray(s.index(k)))
            hist += np.bincount(np.searchsorted(HIST_EDGES, lengths, side="right") - 1, minlength=len(HIST_EDGES))
        docs = int(entry["documents"])
        out["sources"][entry["name"]] = {
            "tokens": int(entry["tokens"]), "documents": docs, "shards": len(entry["shards"]),
            "mean_length": round(entry["tokens"] / docs, 1) if docs else 0.0,
            "skipped_empty": int(entry["input_documents"]) - docs, "histogram": hist.tolist()}
    return out


def hist_labels() -> list[str]:
    def k(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 else str(n)

    return [f"<{k(HIST_EDGES[i + 1])}" if i + 1 < len(HIST_EDGES) else f">={k(HIST_EDGES[i])}"
            for i in range(len(HIST_EDGES))]


class VerifyFailed(Exception):
    """A verification found a problem; the message is the one-line reason."""


def _check_integrity(s: ShardSet) -> None:
    for k, r in enumerate(s.records):
        tok, idx = s.tokens(k), np.asarray(s.index(k))
        where = s.path / r["file"]
        if len(idx) != int(r["documents"]) + 1 or idx[0] != 0 or idx[-1] != len(tok) or (np.diff(idx) <= 0).any():
            raise VerifyFailed(f"{where}: document offsets do not match the tokens; prepare the folder again")
        if len(tok) and (np.asarray(tok[idx[1:] - 1]) != s.eos_id).any():
            raise VerifyFailed(f"{where}: a document does not end with EOS ({s.eos_id}); prepare the folder again")
        sha = hashlib.sha256()
        for a in range(0, len(tok), 1 << 24):
            chunk = np.asarray(tok[a:a + (1 << 24)])
            if len(chunk) and int(chunk.max()) >= s.vocab_size:
                raise VerifyFailed(f"{where}: token id {int(chunk.max())} >= vocabulary size {s.vocab_size}")
            sha.update(chunk.tobytes())
        if sha.hexdigest() != r["sha256"]:
            raise VerifyFailed(f"{where}: sha256 differs from the manifest (corrupted or modified); prepare again")


def _digests(items: Iterable[bytes | None], n: int, *, side: bytes = b"train") -> np.ndarray:
    """(n,) 16-byte digests of `items`, as numpy void scalars. None (an empty text) gets a digest of its
    own (from its index and `side`) that equals no other item's, so empty documents never match."""
    out = np.empty(n, dtype="V16")
    chunk: list[bytes] = []
    i = 0
    for data in items:
        chunk.append(_h(data) if data is not None else hashlib.blake2b(b"%d" % (i + len(chunk)), digest_size=16,
                                                                       person=b"empty-" + side).digest())
        if len(chunk) == 1 << 16:
            out[i:i + len(chunk)] = np.frombuffer(b"".join(chunk), dtype="V16")
            i, chunk = i + len(chunk), []
    if chunk:
        out[i:i + len(chunk)] = np.frombuffer(b"".join(chunk), dtype="V16")
    assert i + len(chunk) == n
    return out


def _first_repeat(digests: np.ndarray) -> tuple[int, int] | None:
    """(i, j): the first item j (in order) equal to an earlier item, and its first occurrence i; or None."""
    order = np.argsort(digests, kind="stable")  # equal digests stay in index order
    s = digests[order]
    same = np.flatnonzero(s[1:] == s[:-1])  # order[k + 1] repeats order[k]
    if not len(same):
        return None
    k = same[np.argmin(order[same + 1])]  # the smallest repeating index: the second of its group
    return int(order[k]), int(order[k + 1])


def _shard_blocks(s: ShardSet, *, seq_len: int) -> None:
    """No two training blocks (seq_len + 1 tokens at stride seq_len, as the loader cuts them) are identical."""
    nb = (s.n_tokens - 1) // seq_len
    if nb < 1:
        raise VerifyFailed(f"{s.path}: fewer than seq_len + 1 = {seq_len + 1} tokens")
    repeat = _first_repeat(_digests((s.read(b * seq_len, seq_len + 1).tobytes() for b in range(nb)), nb))
    if repeat is not None:
        raise VerifyFailed(f"{s.path}: blocks {repeat[0]} and {repeat[1]} (seq_len {seq_len}) hold identical tokens: "
                           "the data has duplicated content; deduplicate the sources")


def _shard_doc_hashes(s: ShardSet) -> np.ndarray:
    def docs() -> Iterable[bytes]:
        for k in range(len(s.records)):
            tok, idx = s.tokens(k), np.asarray(s.index(k))
            for a, b in zip(idx[:-1], idx[1:]):
                yield np.asarray(tok[a:b]).astype(np.uint32).tobytes()

    return _digests(docs(), s.n_docs)


def _text_doc_hashes(src: SourceConfig, tokenizer: Any) -> np.ndarray:
    """Token-sequence digests (EOS included, as in shards) of a text source's non-empty documents."""
    ds = load_documents(src)
    parts = []
    for a in range(0, len(ds), 512):
        ids = [d for d in tokenizer.encode_batch([t or "" for t in ds[a:a + 512]["text"]]) if d]
        parts.append(_digests((np.asarray([*d, tokenizer.eos_id], dtype=np.uint32).tobytes() for d in ids),
                              len(ids)))
    return np.concatenate(parts)


def _overlap(val: np.ndarray, train: np.ndarray) -> int:
    """How many of the `val` digests occur in `train`."""
    return int(np.isin(val, train).sum())


def verify_shards(path: str | Path, *, val: str | None = None, seq_len: int = 2048, batch_size: int = 8,
                  seed: int = 0, batches: int = BATCHES, **_: Any) -> dict[str, Any]:
    """Raise VerifyFailed with a one-line reason, or return a summary (with the loader's diversity over
    `batches` batches of `batch_size` blocks; 0 batches: not measured)."""
    s = ShardSet(path)
    _check_integrity(s)
    docs = _shard_doc_hashes(s)
    repeat = _first_repeat(docs)
    if repeat is not None:  # as for text sources (the blocks below catch only repeats aligned with seq_len)
        raise VerifyFailed(f"{s.path}: documents {repeat[0]} and {repeat[1]} hold identical tokens; deduplicate the "
                           "sources")
    _shard_blocks(s, seq_len=seq_len)
    summary: dict[str, Any] = {"ok": True, "tokens": s.n_tokens, "documents": s.n_docs,
                               "blocks": (s.n_tokens - 1) // seq_len}
    if val:
        if is_prepared(val):
            v = ShardSet(val)
            if v.manifest["tokenizer_sha256"] != s.manifest["tokenizer_sha256"]:
                raise VerifyFailed(f"{val}: prepared with another tokenizer than {path}; cannot compare")
            _check_integrity(v)
            vh = _shard_doc_hashes(v)
        else:
            name, digest = s.manifest["tokenizer"], s.manifest["tokenizer_sha256"]
            tok = load_tokenizer(name)
            if tokenizer_digest(tok) != digest:
                raise VerifyFailed(f"{path}: its tokenizer '{name}' has changed since the folder was prepared (digest "
                                   f"{tokenizer_digest(tok)[:12]}, prepared with {digest[:12]}); cannot tokenize {val} "
                                   "to compare: restore that tokenizer, or prepare the validation data as a folder")
            vh = _text_doc_hashes(SourceConfig(path=val), tok)
        both = _overlap(vh, docs)
        if both:
            raise VerifyFailed(f"{both} of {len(vh)} validation documents of {val} also occur in the train data "
                               f"{path}; hold them out of one side")
        summary["val_documents"] = len(vh)
    if batches:
        d = shard_diversity([str(path)], seq_len=seq_len, batch_size=batch_size, seed=seed, batches=batches)
        summary["diversity"] = {**d.as_dict(), "detail": d.line()}
    return summary


def verify_text(src: SourceConfig, *, val: str | None = None, seq_len: int = 2048, batch_size: int = 8, seed: int = 0,
                batches: int = BATCHES, tokenizer: str = "mistral-v3", stream: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Text source: duplicate texts, validation documents that also occur in the train data, and the
    diversity of `batches` batches of the loader (TextStream with `stream` settings; 0: not measured)."""
    ds = load_documents(src)

    def texts(d: Any) -> Iterable[bytes | None]:
        for a in range(0, len(d), 1024):
            yield from ((t.encode() if t else None) for t in d[a:a + 1024]["text"])

    train = _digests(texts(ds), len(ds))
    repeat = _first_repeat(train)
    if repeat is not None:
        raise VerifyFailed(f"{src.path}: documents {repeat[0]} and {repeat[1]} are identical; deduplicate")
    summary: dict[str, Any] = {"ok": True, "documents": len(ds)}
    if val:
        vds = load_documents(SourceConfig(path=val))
        both = _overlap(_digests(texts(vds), len(vds), side=b"val"), train)
        if both:
            raise VerifyFailed(f"{both} of {len(vds)} validation documents of {val} also occur in {src.path}; "
                               "hold them out of one side")
        summary["val_documents"] = len(vds)
    if batches:
        d = text_diversity([src], load_tokenizer(tokenizer), seq_len=seq_len, batch_size=batch_size, seed=seed,
                           batches=batches, **(stream or {}))
        summary["diversity"] = {**d.as_dict(), "detail": d.line()}
    return summary


def verify(path: str, **kw: Any) -> dict[str, Any]:
    """verify_shards for a prepared folder, verify_text for anything else (keywords: val, seq_len,
    batch_size, seed, batches; for text also tokenizer and stream)."""
    if is_prepared(path):
        return verify_shards(path, **kw)
    if not Path(path).expanduser().exists() and "*" not in path and not path.startswith("bundled:"):
        raise DataError(f"{path}: no such file or folder")
    return verify_text(SourceConfig(path=path), **kw)

