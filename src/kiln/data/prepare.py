"""`kiln data prepare`: tokenize sources into memory-mappable shards (format: kiln.data.shards).

Each source's documents (in file order, `skip` / `take` applied) are cut into shards of
`shard_docs` consecutive documents; a shard is a pure function of (tokenizer, source, document
range), so shards are tokenized in parallel processes, in any order, and the output is byte-identical
whatever the number of workers or interruptions. A shard is written to temporary names, fsynced,
and renamed (tokens, then index, then its record): a killed prepare leaves complete shards and
temporary files, and the same command resumes, deleting the temporary files and skipping complete
shards. plan.json pins what was asked, so resuming with other sources or another tokenizer is refused.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kiln.config import SourceConfig
from kiln.data.packing import flatten_documents
from kiln.data.shards import FORMAT, MANIFEST, PLAN, VERSION, shard_stem, token_dtype
from kiln.data.sources import is_prepared, load_documents, resolve_files, source_name
from kiln.data.tokenizer import MISTRAL_SPECS, Tokenizer, load_tokenizer, tokenizer_digest
from kiln.errors import DataError

ENCODE_CHUNK = 512  # documents per encode_batch call inside a shard


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _source_entry(src: SourceConfig, n_docs: int) -> dict[str, Any]:
    files = resolve_files(src)
    return {"name": source_name(src), "path": src.path, "text_column": src.text_column, "hf_config": src.hf_config,
            "split": src.split, "txt_sample_by": src.txt_sample_by, "skip": src.skip, "take": src.take,
            "files": [[f.name, f.stat().st_size] for f in files], "input_documents": n_docs}


def make_plan(sources: list[SourceConfig], tokenizer: Tokenizer, spec: str, *, shard_docs: int
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(plan, tasks): what the folder will hold, and one task per shard."""
    entries, tasks = [], []
    names = set()
    for i, src in enumerate(sources):
        if is_prepared(src.path):
            raise DataError(f"{src.path}: already a prepared folder; pass text sources to `kiln data prepare`")
        n = len(_docs(src))  # converts local files to the Arrow cache once; forked workers inherit it
        entry = _source_entry(src, n)
        if entry["name"] in names:
            raise DataError(f"{src.path}: two sources are named '{entry['name']}'; give them distinct names "
                            "(--source '{\"path\": ..., \"name\": ...}')")
        names.add(entry["name"])
        entry["shards"] = []
        for start in range(0, n, shard_docs):
            k = len(tasks)
            entry["shards"].append(k)
            tasks.append({"shard": k, "source": i, "start": start, "end": min(n, start + shard_docs)})
        entries.append(entry)
    if spec not in MISTRAL_SPECS:  # a path: absolute, so `verify` reloads this one from any folder
        spec = str(Path(spec).expanduser().resolve())
    plan = {"format": FORMAT, "version": VERSION, "tokenizer": spec, "tokenizer_sha256": tokenizer_digest(tokenizer),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "dtype": token_dtype(tokenizer.vocab_size).name, "shard_docs": shard_docs, "sources": entries}
    return plan, tasks


def plan_difference(old_path: Path, new: dict[str, Any]) -> str:
    """What differs between the plan a folder holds and this command's: the first difference, in words."""
    try:
        old = json.loads(old_path.read_text())
    except (OSError, ValueError):
        return f"its {PLAN} is unreadable"
    if old.get("tokenizer_sha256") != new["tokenizer_sha256"]:
        return f"tokenizer '{old.get('tokenizer')}', now '{new['tokenizer']}'"
    if old.get("shard_docs") != new["shard_docs"]:
        return f"--shard-docs {old.get('shard_docs')}, now {new['shard_docs']}"
    names = [s.get("name") for s in old.get("sources", [])]
    if names != [s["name"] for s in new["sources"]]:
        return f"sources {', '.join(map(str, names))}; now {', '.join(s['name'] for s in new['sources'])}"
    for a, b in zip(old["sources"], new["sources"]):
        files_a, files_b = dict(map(tuple, a.get("files", []))), dict(map(tuple, b["files"]))
        for name in sorted(files_a.keys() | files_b.keys()):
            if files_a.get(name) != files_b.get(name):
                was = f"{files_a[name]:,} bytes" if name in files_a else "not there"
                now = f"{files_b[name]:,} bytes" if name in files_b else "gone"
                return f"source '{b['name']}': {name} was {was}, now {now}"
        for key in b:
            if key != "shards" and a.get(key) != b[key]:
                return f"source '{b['name']}': {key} {a.get(key)!r}, now {b[key]!r}"
    return f"see {PLAN}"


# ---- one shard (runs in a worker process) ----------------------------------------------------

_DOCS: dict[str, Any] = {}  # per process: a worker loads each source and the tokenizer once
_TOKS: dict[str, Tokenizer] = {}


def _docs(src: SourceConfig) -> Any:
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in resolve_files(src)]  # edited files reload
    key = json.dumps([dataclasses.asdict(src), stats], sort_keys=True)
    if key not in _DOCS:
        _DOCS[key] = load_documents(src)
    return _DOCS[key]


def _tok(spec: str, key: str = "data.tokenizer") -> Tokenizer:
    if spec not in _TOKS:
        _TOKS[spec] = load_tokenizer(spec, key=key)
    return _TOKS[spec]


def encode_stream(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the non-empty texts, each followed by EOS, as one (N,) array, and their (n,) lengths
    (the packer's stream: packing.flatten_documents)."""
    out, lengths = flatten_documents(tok.encode_batch(texts), eos_id=tok.eos_id)
    assert not len(out) or out.max() < np.iinfo(dtype).max + 1
    return out.astype(dtype), lengths


def write_shard(out: Path, spec: str, src: SourceConfig, task: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    """Tokenize documents [start, end) of `src` into shard `task['shard']`; returns its record."""
    import hashlib

    tok, ds, dtype = _tok(spec), _docs(src), np.dtype(dtype_name)
    stem = shard_stem(task["shard"])
    bin_path, idx_path = out / f"{stem}.bin", out / f"{stem}.idx.npy"
    tmp = out / f".{stem}.bin.tmp"
    offsets = [np.zeros(1, dtype=np.int64)]
    total, sha = 0, hashlib.sha256()
    with open(tmp, "wb") as f:
        for a in range(task["start"], task["end"], ENCODE_CHUNK):
            texts = ds[a:min(a + ENCODE_CHUNK, task["end"])]["text"]
            flat, lengths = encode_stream(tok, [t or "" for t in texts], dtype)
            data = flat.tobytes()
            f.write(data)
            sha.update(data)
            offsets.append(total + np.cumsum(lengths))
            total += int(lengths.sum())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, bin_path)
    idx = np.concatenate(offsets)
    tmp_idx = out / f".{stem}.idx.npy.tmp"
    with open(tmp_idx, "wb") as f:
        np.save(f, idx)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_idx, idx_path)
    record = {"shard": task["shard"], "file": bin_path.name, "index": idx_path.name, "source": task["source"],
              "first_document": task["start"], "input_documents": task["end"] - task["start"],
              "documents": len(idx) - 1, "tokens": total, "sha256": sha.hexdigest()}
    _write_atomic(out / f"{stem}.json", (json.dumps(record, sort_keys=True) + "\n").encode())
    return record


def _run_task(args: tuple[str, str, dict[str, Any], dict[str, Any], str]) -> dict[str, Any]:
    out, spec, src, task, dtype = args
    return write_shard(Path(out), spec, SourceConfig(**src), task, dtype)


def _init_pool() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process


# ---- the command -----------------------------------------------------------------------------


def prepare(sources: list[SourceConfig], out: str | Path, *, tokenizer: str = "mistral-v3", workers: int = 0,
            shard_docs: int = 65536, quiet: bool = False, tokenizer_key: str = "data.tokenizer") -> dict[str, Any]:
    """Tokenize `sources` into shards under `out` (resuming an interrupted run); returns the manifest.
    `tokenizer_key`: how the user gave `tokenizer` (the config key or a flag), for its errors."""
    if not sources:
        raise DataError("kiln data prepare: pass at least one --source")
    for src in sources:  # a prepared folder is one stream of one or more sources, unweighted, read in full
        if src.weight != 1 or src.streaming:
            what = f"weight={src.weight:g}" if src.weight != 1 else "streaming=true"
            raise DataError(f"{src.path}: kiln data prepare does not use {what} (it reads each source whole, in "
                            "order); prepare one folder per source and weight them in data.train (data.format=shards)")
    if shard_docs < 1:
        raise DataError(f"--shard-docs must be positive, got {shard_docs}")
    out = Path(out).expanduser()
    tok = _tok(tokenizer, tokenizer_key)  # loaded once here; forked workers inherit it (and the sources) instead of reloading
    plan, tasks = make_plan(sources, tok, tokenizer, shard_docs=shard_docs)
    plan_bytes = (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    old_plan = out / PLAN
    if old_plan.is_file():
        if old_plan.read_bytes() != plan_bytes:
            raise DataError(f"{out}: holds a prepare of other input ({plan_difference(old_plan, plan)}); pass "
                            "another --out, or delete the folder")
    elif any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise DataError(f"{out}: folder is not empty; pass a new or empty --out")
    else:
        _write_atomic(old_plan, plan_bytes)
    for stale in out.glob(".*.tmp"):  # left by an interrupted run
        stale.unlink()
    done: dict[int, dict[str, Any]] = {}
    for t in tasks:
        rec = out / f"{shard_stem(t['shard'])}.json"
        if rec.is_file():
            done[t["shard"]] = json.loads(rec.read_text())
    todo = [t for t in tasks if t["shard"] not in done]
    workers = min(workers or os.cpu_count() or 1, max(1, len(todo)))
    total_docs = sum(t["end"] - t["start"] for t in tasks)
    progress = _Progress(total_docs, sum(t["end"] - t["start"] for t in tasks if t["shard"] in done),
                         quiet=quiet, label=f"tokenizing {len(todo)} of {len(tasks)} shards with {workers} process(es)")
    jobs = [(str(out), tokenizer, dataclasses.asdict(sources[t["source"]]), t, plan["dtype"]) for t in todo]
    try:
        if workers <= 1:
            for j in jobs:
                rec = _run_task(j)
                done[rec["shard"]] = rec
                progress.advance(rec["input_documents"], rec["tokens"])
        else:
            ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
            with ctx.Pool(workers, initializer=_init_pool) as pool:
                for rec in pool.imap_unordered(_run_task, jobs):
                    done[rec["shard"]] = rec
                    progress.advance(rec["input_documents"], rec["tokens"])
    finally:
        progress.close()
    records = [done[t["shard"]] for t in tasks]
    for entry in plan["sources"]:
        recs = [records[k] for k in entry["shards"]]
        entry["documents"] = sum(r["documents"] for r in recs)
        entry["tokens"] = sum(r["tokens"] for r in recs)
    manifest = {**plan, "shards": records, "documents": sum(r["documents"] for r in records),
                "tokens": sum(r["tokens"] for r in records)}
    _write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


class _Progress:
    """A rich progress bar on a terminal; silent otherwise (the command prints a summary line)."""

    def __init__(self, total: int, completed: int, *, quiet: bool, label: str) -> None:
        self._bar = None
        self._t0, self._tokens = time.time(), 0
        if quiet or not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("docs  {task.fields[tps]}"), TimeRemainingColumn(),
                             console=Console(stderr=True))
        self._bar.start()
        self._task = self._bar.add_task(label, total=total, completed=completed, tps="")

    def advance(self, docs: int, tokens: int) -> None:
        self._tokens += tokens
        if self._bar is not None:
            rate = self._tokens / max(time.time() - self._t0, 1e-9)
            self._bar.update(self._task, advance=docs, tps=f"{rate / 1e6:.2f}M tok/s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
