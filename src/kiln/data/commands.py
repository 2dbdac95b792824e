"""`kiln data prepare | inspect | verify`: parse arguments and hand off to kiln.data.prepare / verify."""

from __future__ import annotations

import argparse
import json
import sys

from kiln.cliargs import int_at_least, parse_with_sources, unknown_command
from kiln.config import Config, load_config
from kiln.data.sources import check_text_column_flag, source_arg
from kiln.errors import DataError, KilnError

USAGE = """kiln data <command>

  prepare --source PATH_OR_DATASET [--source ...] --out DIR [--tokenizer T]
          [--workers N]
      pre-tokenize into memory-mapped shards (resumable)
  inspect DIR
      tokens, documents, length histogram per source (last line JSON)
  verify PATH [--val PATH] [--seq-len T] [--config C]
      exit 0 when clean: integrity, duplicated content, val overlap; prints
      the batches' diversity (documents per batch vs random rows)

kiln data COMMAND -h shows a command's options and their defaults.
"""


def _prepare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln data prepare", description="Tokenize sources into memory-mapped shards.",
                                allow_abbrev=False)
    p.add_argument("--source", action="append", default=[], metavar="SOURCE",
                   help="file, glob, folder, bundled:train, HF dataset, or a JSON object like "
                   "'{\"path\": \"web/*.jsonl\", \"name\": \"web\"}'; repeat for several; required unless "
                   "--config gives the sources")
    p.add_argument("--config", metavar="PRESET_OR_YAML",
                   help="take the sources (data.train) and tokenizer from this preset or YAML")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (new, or an interrupted prepare to resume)")
    p.add_argument("--tokenizer", default=None, help="mistral-v3 (default), mistral-v1, bundled-4k, or a tokenizer folder/json")
    p.add_argument("--workers", type=int_at_least(0), default=0, metavar="N",
                   help="processes (0, the default: one per CPU core)")
    p.add_argument("--shard-docs", type=int_at_least(1), default=65536, metavar="N",
                   help="documents per shard (default 65536)")
    p.add_argument("--text-column", default="text", metavar="NAME",
                   help="the column holding the text in jsonl/parquet/HF sources (default text)")
    p.add_argument("--hf-config", default="", metavar="NAME",
                   help="HF dataset configuration, e.g. sample-10BT (default: none)")
    p.add_argument("--split", default="train", help="HF dataset split (default train)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parse_with_sources(p, argv)
    from kiln.data.prepare import prepare

    sources = [source_arg(s, i, text_column=args.text_column, hf_config=args.hf_config, split=args.split)
               for i, s in enumerate(args.source)]
    check_text_column_flag(args.text_column, [s for s in sources if s.text_column == args.text_column])
    tokenizer = args.tokenizer
    if args.config:
        cfg = load_config(args.config)
        sources = sources or list(cfg.data.train)
        tokenizer = tokenizer or cfg.data.tokenizer
    try:
        m = prepare(sources, args.out, tokenizer=tokenizer or "mistral-v3", workers=args.workers,
                    shard_docs=args.shard_docs, quiet=args.quiet,
                    tokenizer_key="--tokenizer" if args.tokenizer else "data.tokenizer")
    except DataError as e:  # the source's key, as this command spells it
        raise DataError(str(e).replace("; set text_column on the source", "; pass --text-column NAME (or "
                                       "text_column in a --source JSON object)")) from None
    print(json.dumps({"out": args.out, "tokens": m["tokens"], "documents": m["documents"], "shards": len(m["shards"]),
                      "dtype": m["dtype"]}))
    return 0


def _inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln data inspect", description="Summarise a prepared folder.",
                                allow_abbrev=False)
    p.add_argument("dir", metavar="DIR", help="a folder written by kiln data prepare")
    args = p.parse_args(argv)
    from kiln.data.verify import hist_labels, inspect

    info = inspect(args.dir)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{args.dir}: {info['tokenizer']}, {info['dtype']}, {info['shards']} shards")
        for col in ["source", "documents", "tokens", "mean len", *hist_labels()]:
            t.add_column(col, justify="left" if col == "source" else "right")
        for name, s in info["sources"].items():
            t.add_row(name, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['mean_length']:.0f}",
                      *[f"{h:,}" for h in s["histogram"]])
        Console().print(t)
    else:
        labels = hist_labels()
        for name, s in info["sources"].items():
            hist = " ".join(f"{lab}:{h}" for lab, h in zip(labels, s["histogram"]))
            print(f"{name}: {s['documents']:,} documents, {s['tokens']:,} tokens, mean {s['mean_length']:.0f}; {hist}")
    print(json.dumps({"tokens": info["tokens"], "documents": info["documents"],
                      "sources": {k: {"tokens": v["tokens"], "documents": v["documents"]}
                                  for k, v in info["sources"].items()}}))
    return 0


def _verify(argv: list[str]) -> int:
    from kiln.data.diversity import BATCHES  # torch, tokenizers: only for this command
    from kiln.data.verify import VerifyFailed, verify

    p = argparse.ArgumentParser(prog="kiln data verify", description="Check data integrity, duplicated content and "
                                "val overlap; measure the training batches' diversity.", allow_abbrev=False)
    p.add_argument("path", help="a prepared folder, or a text source (file, glob, folder)")
    p.add_argument("--val", default=None, help="validation data (prepared folder or text source) to check overlap")
    p.add_argument("--config", help="take train.seq_len, train.micro_batch_size, run.seed and the data settings "
                   "(tokenizer, row_shuffle, ...) from this preset or YAML; the flags below override them")
    p.add_argument("--seq-len", type=int_at_least(1), default=None, help="block length of the training order (default 2048)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="rows per batch for the diversity (default 8)")
    p.add_argument("--seed", type=int_at_least(0), default=None, help="the loader's seed (run.seed; default 0)")
    p.add_argument("--tokenizer", default=None, help="text sources: data.tokenizer (default mistral-v3)")
    p.add_argument("--row-shuffle", type=int_at_least(0), default=None, help="text sources: data.row_shuffle")
    p.add_argument("--batches", type=int_at_least(0), default=BATCHES, help=f"batches the diversity reads (default {BATCHES}; "
                   "0: not measured)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else Config()
        d, t = cfg.data, cfg.train
        seq_len = args.seq_len or (t.seq_len if args.config else 2048)
        stream = {"shuffle": d.shuffle, "encode_batch": d.encode_batch, "shuffle_buffer": d.shuffle_buffer,
                  "row_shuffle": d.row_shuffle if args.row_shuffle is None else args.row_shuffle,
                  "remainder": d.remainder}
        summary = verify(args.path, val=args.val, seq_len=seq_len, batch_size=args.batch_size or t.micro_batch_size,
                         seed=cfg.run.seed if args.seed is None else args.seed, batches=args.batches,
                         tokenizer=args.tokenizer or d.tokenizer, stream=stream)
    except VerifyFailed as e:
        print(f"kiln data verify: FAILED: {e}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": str(e)}))  # the last line is JSON either way
        return 1
    except KilnError as e:  # bad input (a path that is not there, ...): the one error line, and the JSON line
        print(json.dumps({"ok": False, "error": str(e)}))
        raise
    if "diversity" in summary:
        div = summary["diversity"]
        print(f"diversity: {div['status']}: {div['detail']}")
    print(json.dumps(summary))
    return 0


COMMANDS = {"prepare": _prepare, "inspect": _inspect, "verify": _verify}


def main(argv: list[str]) -> int:
    """`kiln data SUB ...`"""
    if not argv:  # no command: a mistake, so the usage goes to stderr with exit 2
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        print(unknown_command("kiln data", argv[0], COMMANDS), file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
