"""Data pipeline throughput and memory (the numbers in bench/RESULTS.md, "Data pipeline").

    .venv/bin/python bench/data_throughput.py [--seconds 10] [--scale 100] [--parts throughput,memory] [--json OUT]

Measures, on the bundled corpus (Shakespeare + Austen, 2.6M tokens) with the mistral-v3 tokenizer
(the HF fast tokenizer kiln trains with), seq_len 2048, micro-batch 8:
  * raw:     `Tokenizer.encode_batch` alone over the same documents (the ceiling), with
             TOKENIZERS_PARALLELISM=false (one thread) and =true (one thread per core);
  * text:    PackedLoader tokenize + pack, in-process (num_workers=0) and with 2 DataLoader workers;
             tokens/s of finished (B, T) batches received by the caller. In-process runs as `kiln
             train` does, with TOKENIZERS_PARALLELISM=false (cli.py sets it unless the user did):
             one tokenizer thread; a second row shows the same loader with the variable set to true;
  * prepare: `kiln data prepare` (2 processes) tokens/s;
  * shards:  ShardLoader reading pre-tokenized shards into batches, tokens/s (B = 8 and 64);
  * memory:  peak anonymous memory (RssAnon, sampled after every batch) of a process that builds a
             loader and reads 300 batches, for the corpus and a corpus `--scale` times larger
             (generated: the documents repeated with distinct headers): flat means the loader streams
             and never loads the corpus. RssAnon leaves out file-backed pages (the memory-mapped
             Arrow and token files, which the kernel may drop at will); peak RSS (VmHWM) counts them.
Each measurement runs in a fresh subprocess, so one cannot warm or starve another. Arrow conversions
go to a temporary KILN_CACHE (the tokenizer cache is linked in), removed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "src/kiln/data/corpus/train.jsonl.gz"
SEQ, BATCH = 2048, 8


def _child(kind: str, args: dict) -> dict:
    """Run one measurement in a fresh interpreter; it prints one JSON line."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM=args.pop("parallel", "false"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(args)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (Linux), in MB: RssAnon (now) or VmHWM (peak RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {field} in /proc/self/status")


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (DataLoader workers, once joined)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(next_tokens, seconds: float, close=None) -> dict:
    """tokens/s of wall time, and tokens per CPU second over every process involved. The CPU count is
    conservative: it includes the workers' start-up, warm-up and prefetch beyond the window. On a
    shared machine wall time depends on the load; CPU time much less."""
    next_tokens()  # warm up: first tokenization batch, worker start
    t0, c0, n = time.perf_counter(), _cpu(), 0
    while time.perf_counter() - t0 < seconds:
        n += next_tokens()
    wall = time.perf_counter() - t0
    if close is not None:
        close()  # joins the workers, so their CPU time is counted
    return {"tokens_per_sec": n / wall, "tokens_per_cpu_sec": n / max(_cpu() - c0, 1e-9)}


def child(kind: str, a: dict) -> dict:
    from kiln.config import SourceConfig
    from kiln.data.tokenizer import load_tokenizer

    tok = load_tokenizer("mistral-v3")
    src = [SourceConfig(path=a.get("corpus", ""))]
    if kind == "raw":
        with gzip.open(a["corpus"], "rt") if a["corpus"].endswith(".gz") else open(a["corpus"]) as f:
            docs = [json.loads(line)["text"] for line in f]
        state = {"i": 0}

        def step() -> int:
            i = state["i"]
            batch = [docs[(i + j) % len(docs)] for j in range(64)]
            state["i"] = i + 64
            return sum(len(x) for x in tok.encode_batch(batch))

        return _timed(step, a["seconds"])
    if kind == "text":
        from kiln.data.loader import PackedLoader

        ld = PackedLoader(src, tok, seq_len=SEQ, batch_size=BATCH, seed=0, num_workers=a["workers"])
        return _timed(lambda: ld.next_batch().tokens.numel(), a["seconds"], close=ld.close)
    if kind == "prepare":
        from kiln.data.prepare import prepare

        t0, c0 = time.perf_counter(), _cpu()
        m = prepare(src, a["out"], tokenizer="mistral-v3", workers=a["workers"], shard_docs=64, quiet=True)
        return {"tokens_per_sec": m["tokens"] / (time.perf_counter() - t0),
                "tokens_per_cpu_sec": m["tokens"] / (_cpu() - c0), "tokens": m["tokens"]}
    if kind == "shards":
        from kiln.data.shards import ShardLoader

        ld = ShardLoader([SourceConfig(path=a["dir"])], tok, seq_len=SEQ, batch_size=a["batch"], seed=0)
        return _timed(lambda: ld.next_batch().tokens.numel(), a["seconds"])
    if kind == "memory":
        base = _status_mb("RssAnon")
        if a["format"] == "shards":
            from kiln.data.shards import ShardLoader

            ld = ShardLoader([SourceConfig(path=a["dir"])], tok, seq_len=SEQ, batch_size=BATCH, seed=0)
        else:
            from kiln.data.loader import PackedLoader

            ld = PackedLoader(src, tok, seq_len=SEQ, batch_size=BATCH, seed=0)
        peak = base
        for _ in range(300):
            ld.next_batch()
            peak = max(peak, _status_mb("RssAnon"))
        return {"peak_anon_mb": peak, "anon_before_loader_mb": base, "peak_rss_mb": _status_mb("VmHWM")}
    raise SystemExit(f"unknown child {kind}")


def make_scaled(out: Path, scale: int) -> Path:
    """The corpus repeated `scale` times, each copy's documents with a distinct first line."""
    with gzip.open(CORPUS, "rt") as f:
        docs = [json.loads(line)["text"] for line in f]
    with open(out, "w") as f:
        for k in range(scale):
            for i, d in enumerate(docs):
                f.write(json.dumps({"text": f"Copy {k}, document {i}.\n{d}"}) + "\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--scale", type=int, default=100, help="size of the larger corpus for the memory check")
    p.add_argument("--parts", default="throughput,memory", help="throughput, memory or both (comma-separated)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    parts = set(args.parts.split(","))
    s = args.seconds
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "date": time.strftime("%Y-%m-%d"), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    corpus = str(CORPUS)
    rows, mem = [], {}
    user_cache = Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache/kiln")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "kiln-cache"  # Arrow conversions of the generated corpus land here, and go
        cache.mkdir()
        if (user_cache / "tokenizers").is_dir():  # the converted tokenizers are reused, not rebuilt
            (cache / "tokenizers").symlink_to(user_cache / "tokenizers")
        os.environ["KILN_CACHE"] = str(cache)  # the children inherit it
        small = str(Path(tmp) / "small")
        if "throughput" in parts:
            rows.append(("raw encode_batch, 1 thread", _child("raw", {"corpus": corpus, "seconds": s})))
            rows.append((f"raw encode_batch, TOKENIZERS_PARALLELISM=true ({os.cpu_count()} cores)",
                         _child("raw", {"corpus": corpus, "seconds": s, "parallel": "true"})))
            rows.append(("text loader, in-process (as kiln train: 1 tokenizer thread)",
                         _child("text", {"corpus": corpus, "seconds": s, "workers": 0})))
            rows.append(("text loader, in-process, TOKENIZERS_PARALLELISM=true",
                         _child("text", {"corpus": corpus, "seconds": s, "workers": 0, "parallel": "true"})))
            rows.append(("text loader, 2 DataLoader workers",
                         _child("text", {"corpus": corpus, "seconds": s, "workers": 2})))
        rows.append(("kiln data prepare, 2 processes", _child("prepare", {"corpus": corpus, "out": small, "workers": 2})))
        if "throughput" in parts:
            rows.append(("shards -> batches, B=8", _child("shards", {"dir": small, "seconds": s, "batch": 8})))
            rows.append(("shards -> batches, B=64", _child("shards", {"dir": small, "seconds": s, "batch": 64})))
        if "memory" in parts:
            big = make_scaled(Path(tmp) / "big.jsonl", args.scale)
            big_dir = str(Path(tmp) / "big")
            rows.append((f"kiln data prepare, 2 processes, {args.scale}x corpus",
                         _child("prepare", {"corpus": str(big), "out": big_dir, "workers": 2})))
            mem = {
                "text x1": _child("memory", {"corpus": corpus, "format": "text"}),
                f"text x{args.scale}": _child("memory", {"corpus": str(big), "format": "text"}),
                "shards x1": _child("memory", {"corpus": corpus, "format": "shards", "dir": small}),
                f"shards x{args.scale}": _child("memory", {"corpus": str(big), "format": "shards", "dir": big_dir}),
            }
    res["throughput"] = {name: round(r["tokens_per_sec"]) for name, r in rows}
    res["tokens_per_cpu_sec"] = {name: round(r["tokens_per_cpu_sec"]) for name, r in rows}
    res["memory_mb"] = {k: {m: round(v[m]) for m in ("anon_before_loader_mb", "peak_anon_mb", "peak_rss_mb")}
                        for k, v in mem.items()}
    res["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(f"machine: {res['machine']}; load average {res['load_avg_1m_at_start']} -> {res['load_avg_1m_at_end']}")
    print("| measurement | tokens/s (wall) | tokens per CPU second |\n|---|---|---|")
    for name, v in res["throughput"].items():
        print(f"| {name} | {v / 1e6:.2f}M | {res['tokens_per_cpu_sec'][name] / 1e6:.2f}M |")
    if mem:
        print("| loader process, 300 batches | RssAnon before loader | peak RssAnon | peak RSS |\n|---|---|---|---|")
        for name, v in res["memory_mb"].items():
            print(f"| {name} | {v['anon_before_loader_mb']} MB | {v['peak_anon_mb']} MB | {v['peak_rss_mb']} MB |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
