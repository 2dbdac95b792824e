"""Records from a local .jsonl / .json file or an HF dataset, each with where it came from (file:line,
file[i], NAME[i]): post-training data (kiln.posttrain) and downstream task files (kiln.eval) read them."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.errors import DataError


def load_records(path: str, *, split: str = "train", what: str = "posttrain.data") -> list[tuple[str, dict]]:
    """[(where, record)] from a local .jsonl / .json file (where = file:line), or an HF dataset
    (NAME or NAME:CONFIG, see _hub_records)."""
    if not path:
        raise DataError(f"{what}: no data given; pass --data FILE.jsonl")
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".json":
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                raise DataError(f"{p}: not valid JSON ({e})") from None
            if not isinstance(data, list):
                raise DataError(f"{p}: a .json file must hold a list of records (or use .jsonl)")
            return [(f"{p}[{i}]", r) for i, r in enumerate(data)]
        out = []
        with open(p, "rb") as f:  # decoded per line, so bad bytes are named by their line
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a Windows editor's BOM is no error
                except UnicodeDecodeError as e:
                    raise DataError(f"{p}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                    "re-save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    out.append((f"{p}:{n}", json.loads(line)))
                except ValueError as e:
                    raise DataError(f"{p}:{n}: not valid JSON ({e.args[0][:60]})") from None
        if not out:
            raise DataError(f"{p}: no records")
        return out
    # a missing file in an existing folder (data/x.jsonl) is a typo, not a hub name; a local dataset
    # folder goes to `datasets` like a hub name
    if not p.is_dir() and (p.suffix in (".jsonl", ".json") or "/" not in path or p.parent.exists()):
        raise DataError(f"{what}: no such file {path}")
    return _hub_records(path, split=split)


def _hub_records(name: str, *, split: str) -> list[tuple[str, dict]]:
    """An HF hub dataset: NAME (HuggingFaceTB/smoltalk) or NAME:CONFIG (openai/gsm8k:main,
    allenai/ai2_arc:ARC-Easy, cais/mmlu:all); needs network access or a local HF cache."""
    import datasets

    path, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None, split=split)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if config else " (a dataset with several configs needs NAME:CONFIG, e.g. openai/gsm8k:main)"
        raise DataError(f"{name}: cannot load this HF dataset ({msg}){hint}; pass a local .jsonl file "
                        "instead") from None
    return [(f"{name}[{i}]", dict(r)) for i, r in enumerate(ds)]
