"""Turn `kiln bench` JSON lines into a markdown table, and optionally record it in bench/RESULTS.md.

    python bench/report.py bench/results/gpu-*.jsonl                 # print the table
    python bench/report.py FILE.jsonl --write gpu                    # also replace RESULTS.md's "gpu" block
    python bench/report.py ROUNDS.jsonl --median                     # repeated runs: each one's median run

`write_block` is the one writer of RESULTS.md's marker blocks (`<!-- KEY:begin -->` ...
`<!-- KEY:end -->`); bench/vs_hf.py uses it too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GIB = 1024**3


def variant(r: dict) -> str:
    parts = [f"attn={r.get('attention')}", f"loss={r.get('loss_impl')}"]
    if r.get("compile"):
        parts.append(f"compile={r.get('compile_mode')}")
    if r.get("activation_checkpointing") not in (None, "none"):
        parts.append(f"ac={r['activation_checkpointing']}")
    if not r.get("doc_mask", True):
        parts.append("no doc mask")
    layout = {k: v for k, v in (r.get("layout") or {}).items() if v > 1}
    if layout:
        parts.append(" ".join(f"{k}={v}" for k, v in layout.items()))
    return ", ".join(parts)


def table(records: list[dict]) -> str:
    lines = ["| preset | variant | batch | tokens/s | step ms | MFU | peak GiB | estimate GiB | peak/est | device | commit | date |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in records:
        if r.get("bench") == "vs_hf":  # vs_hf.py lines: one row per variant
            for row in r["rows"]:
                m = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
                lines.append(f"| {r['shape']} | {row['variant']} | | {row['tokens_per_sec']:.0f} | {row['step_ms']:.0f} "
                             f"| {m} | | | | {r['machine']} | {r['commit']} | {r['date']} |")
            continue
        m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        peak = f"{r['peak_memory_bytes'] / GIB:.2f}" if r.get("peak_memory_bytes") else ""
        ratio = f"{r['estimate_ratio']:.2f}" if r.get("estimate_ratio") else ""
        batch = f"{r['micro_batch_size']}x{r['seq_len']} (x{r['accumulation']})"
        lines.append(f"| {r['preset']} | {variant(r)} | {batch} | {r['tokens_per_sec']:.0f} | {r['step_ms']:.0f} | {m} "
                     f"| {peak} | {r['estimate_bytes'] / GIB:.2f} | {ratio} | {r['device_name']} | {r.get('git_sha')} "
                     f"| {r.get('date')} |")
    return "\n".join(lines)


def median_runs(records: list[dict]) -> list[dict]:
    """Of repeated `kiln bench` runs of one configuration, the run with the median tokens/s (the upper
    middle one for an even count), in the order configurations first appear; vs_hf.py lines pass through."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (id(r),) if r.get("bench") == "vs_hf" else (
            r.get("preset"), variant(r), r.get("micro_batch_size"), r.get("seq_len"), r.get("accumulation"),
            r.get("device_name"), r.get("git_sha"))
        groups.setdefault(key, []).append(r)
    out = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r.get("tokens_per_sec", 0))
        out.append(runs[len(runs) // 2])
    return out


def write_block(key: str, body: str, *, heading: str = "", path: Path | None = None) -> None:
    """Replace block `key` of RESULTS.md (or `path`) with `body`, keeping everything else. A new block goes
    right under `heading` (added at the end when missing), or at the end when no heading is given."""
    path = path or RESULTS
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    elif heading:
        if heading not in text:
            text = text.rstrip() + f"\n\n{heading}\n"
        text = text.replace(heading, f"{heading}\n\n{block}\n", 1)
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--write", default="", help="replace this block of bench/RESULTS.md with the table")
    ap.add_argument("--median", action="store_true", help="one row per configuration: its median run")
    args = ap.parse_args()
    records = []
    for f in args.files:
        for line in Path(f).read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                records.append(json.loads(line))
    body = table(median_runs(records) if args.median else records)
    print(body)
    if args.write:
        write_block(args.write, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
