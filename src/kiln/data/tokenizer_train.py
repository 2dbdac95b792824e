"""`kiln tokenizer train | stats`: train a SentencePiece-style BPE with byte fallback on kiln sources.

The trained tokenizer is the same family as the Mistral v3 tokenizer kiln uses by default, so
everything downstream (packing, chat template, export, generation) treats it alike:

  * ids 0-4: `<unk>`, `<s>` (BOS), `</s>` (EOS), `[INST]`, `[/INST]`: the control tokens of kiln's
    chat template (kiln.posttrain.chat.KILN_TEMPLATE), special added tokens as in Mistral v3, so
    every turn boundary is a token boundary; padding uses EOS everywhere in kiln, so no pad token;
  * ids 5-260: the 256 byte tokens `<0x00>` ... `<0xFF>`: a character outside the learned alphabet
    encodes as its UTF-8 bytes (byte fallback), so any text round-trips;
  * then the alphabet (the most frequent characters covering 99.95% of the text, SentencePiece's
    default character_coverage, and printable ASCII; in code point order) and the learned merges,
    in merge order;
  * Metaspace pre-tokenization (spaces become U+2581, one prepended to a text that does not start
    with a space) and Mistral v3's decoder.

Words for BPE (what a merge may never cross) follow SentencePiece's defaults: a piece starts at a
space; letters, digits and punctuation are split apart (split_by_unicode_script), each digit is
its own piece (split_digits; Mistral v3 has no multi-digit tokens either); runs of spaces before a
word are one piece ("    def" -> "___", "_def" with _ for U+2581, as Mistral v3's tokens of four
U+2581 keep indentation cheap), as are runs of other whitespace ("\\n\\n"). Pieces are at most 16
characters (SentencePiece's max_piece_length). The same pre-tokenizer encodes, in kiln and in the
exported HF folder alike.

The vocabulary is rounded up to a multiple of 64 (--multiple-of; 1 keeps the number given), so
the embedding and the output head have GPU-friendly shapes, and every id is a real token: a
corpus too small for that many merges gets `<reserved_N>` placeholders at the end instead.

Sources are written as for `kiln data prepare --source` (kiln.data.sources): files, globs, folders,
bundled:train, HF dataset names, or JSON objects of source fields; every document of every source
is read once, in order (`take` / `skip` select a range; `streaming: true` reads a stream instead of
converting it to Arrow first, twice: characters are counted before the words).

Deterministic: the same sources and options give a byte-identical tokenizer.json. BPE depends on
the counts of words only (ties go to the smaller pair of ids), and the alphabet, whose ids those
are, is chosen here rather than by the trainer's limit_alphabet, which breaks ties in hash order.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from kiln.cliargs import parse_with_sources, unknown_command
from kiln.config import SourceConfig
from kiln.data.sources import load_documents, open_stream, source_arg, stream_error
from kiln.data.tokenizer import SPACE, Tokenizer, load_tokenizer, tokenizer_digest
from kiln.errors import DataError, first_line

CONTROL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
FIXED = len(CONTROL_TOKENS) + len(BYTE_TOKENS)  # 261 ids every trained tokenizer has
MIN_VOCAB = 512  # FIXED, an alphabet (printable ASCII and more: up to half the rest) and some merges
MAX_VOCAB = 1 << 20  # 4x Gemma 3's 262,144; 10^8 ran out of 23 GiB of memory after ten minutes, saying nothing
# BPE words: a run of spaces before a word (all but the word's own space); letters (with combining
# marks); one digit; punctuation; then leftover spaces, other whitespace. Each may start with one space.
WORDS = (rf"{SPACE}+(?={SPACE}[^{SPACE}\s])|{SPACE}?[\p{{L}}\p{{M}}]+|{SPACE}?\p{{N}}"
         rf"|{SPACE}?[^\s\p{{L}}\p{{M}}\p{{N}}{SPACE}]+|{SPACE}+|\s+")
CHAR_COVERAGE = 0.9995
ASCII = (SPACE, "\t", "\n", *(chr(c) for c in range(0x21, 0x7F)))
MAX_TOKEN_CHARS = 16
RECORD = "kiln_tokenizer.json"  # how the folder was trained: sources, sizes, digest
PROGRESS_EVERY_S = 10.0


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Metaspace as in Mistral v3 (prepend U+2581 to the first piece only), then the BPE word split."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False),
        pre_tokenizers.Split(Regex(WORDS), behavior="isolated"),
    ])


def decoder() -> decoders.Decoder:
    """Mistral v3's decoder: U+2581 -> space, byte tokens -> bytes, drop the prepended space."""
    return decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                              decoders.Strip(" ", 1, 0)])


def rounded(vocab_size: int, multiple_of: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple_of`."""
    return math.ceil(vocab_size / multiple_of) * multiple_of


def check_vocab_size(vocab_size: int, *, multiple_of: int) -> int:
    """The vocabulary a --vocab-size gives (rounded up); one-line DataError when it cannot hold the fixed ids."""
    if multiple_of < 1:
        raise DataError(f"--multiple-of must be positive, got {multiple_of}")
    if rounded(vocab_size, multiple_of) < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size}: too small; the {len(CONTROL_TOKENS)} control and "
                        f"{len(BYTE_TOKENS)} byte tokens take {FIXED} ids, the alphabet and merges need the rest: "
                        f"use {MIN_VOCAB} or more")
    if rounded(vocab_size, multiple_of) > MAX_VOCAB:
        raise DataError(f"--vocab-size {vocab_size}: too large; the trainer's memory grows with it (10^8 ran out of "
                        f"23 GiB); use {MAX_VOCAB:,} or fewer (Gemma 3's vocabulary is 262,144)")
    return rounded(vocab_size, multiple_of)


class _Progress:
    """A line on stderr every PROGRESS_EVERY_S seconds while reading, and one per phase (unless quiet)."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet, self.t0, self._last = quiet, time.time(), time.time()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"kiln tokenizer: {text} ({time.time() - self.t0:.1f} s)", file=sys.stderr, flush=True)

    def tick(self, phase: str, docs: int, nbytes: int) -> None:
        if time.time() - self._last >= PROGRESS_EVERY_S:
            self._last = time.time()
            self.say(f"{phase}: {docs:,} documents, {nbytes / 1e6:,.1f} MB")


def _open(src: SourceConfig) -> Any:
    """`src`'s documents: map-style (the Arrow cache `kiln data prepare` uses), or a stream with streaming: true
    (read twice, once to count characters: give it a `take`)."""
    if src.weight != 1:
        raise DataError(f"{src.path}: tokenizer training reads every source whole, once, so weight={src.weight:g} "
                        "has no effect; balance sources with take (a JSON --source) instead")
    return open_stream(src) if src.streaming else load_documents(src)


def _texts(sources: list[SourceConfig], opened: list[Any], progress: _Progress, phase: str) -> Iterator[list[str]]:
    """Batches of non-empty documents of every source, in order."""
    docs = nbytes = 0
    for src, ds in zip(sources, opened):
        batches = ds.iter(batch_size=1024)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:  # a stream fails while read: one line naming the source
                raise stream_error(e, src) from None
            texts = [t for t in batch["text"] if t]
            docs += len(texts)
            nbytes += sum(len(t.encode()) for t in texts)
            progress.tick(phase, docs, nbytes)
            yield texts


def choose_alphabet(counts: collections.Counter[str], *, coverage: float, limit: int) -> list[str]:
    """The most frequent characters covering `coverage` of all characters, plus printable ASCII, tab and
    newline (seen or not: text the corpus lacks, code or numbers, still gets readable single-character
    tokens), at most `limit` of them by frequency; U+2581 always. Ties go by code point: deterministic."""
    counts = collections.Counter(counts)
    counts[SPACE] += counts.pop(" ", 0) + 1  # the pre-tokenizer turns spaces into U+2581 before BPE sees them
    total = sum(counts.values())
    keep, covered = set(ASCII), 0
    for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if covered >= coverage * total:
            break
        keep.add(ch)
        covered += n
    by_frequency = sorted(keep, key=lambda ch: (-counts[ch], ch))
    return sorted(by_frequency[:limit])


def assemble(trained: tokenizers.Tokenizer, *, alphabet: list[str], vocab_size: int) -> tuple[tokenizers.Tokenizer,
                                                                                            dict[str, int]]:
    """The final tokenizer from a trained BPE (controls, alphabet, merges): the byte tokens go after the
    controls, then the alphabet and each merge's new token in merge order; `<reserved_N>` placeholders
    fill the ids the corpus gave no merge for."""
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokens = [*CONTROL_TOKENS, *BYTE_TOKENS, *alphabet]
    known = set(tokens)
    for a, b in merges:
        # every byte token holds a digit, and digits are pieces of their own (WORDS): no merge can spell one
        assert a in known and b in known and a + b not in BYTE_TOKENS, (a, b)
        if a + b not in known:  # two merges may spell one token ("ab"+"c", "a"+"bc"): one id
            tokens.append(a + b)
            known.add(a + b)
    assert len(tokens) <= vocab_size, (len(tokens), vocab_size)
    reserved = [f"<reserved_{i}>" for i in range(len(tokens), vocab_size)]
    tokens.extend(reserved)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>",
                     fuse_unk=True, byte_fallback=True)
    tk = tokenizers.Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizer()
    tk.decoder = decoder()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*CONTROL_TOKENS, *reserved)])
    return tk, {"alphabet": len(alphabet), "merges": len(merges), "reserved": len(reserved)}


def _check_out(out: Path) -> None:
    """--out must be new or empty, and writable. A tokenizer there is never replaced: the runs and prepared
    shards made with it record its digest and would refuse the new one (as `kiln data prepare` and
    `kiln import` refuse an occupied --out)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder; pass another --out")
    if (out / RECORD).is_file() or (out / "tokenizer.json").is_file():
        raise DataError(f"--out {out}: already holds a tokenizer (runs and shards made with it check its digest); "
                        "pass another --out, or remove that folder yourself to retrain in its place")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"--out {out}: folder is not empty; pass a new or empty --out")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(f"--out {out}: {existing} is a file, not a folder; pass another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DataError(f"--out {out}: not writable ({e.strerror or first_line(e)}); pass another --out") from None


def train_tokenizer(sources: list[SourceConfig], out: str | Path, *, vocab_size: int, multiple_of: int = 64,
                    quiet: bool = False) -> dict[str, Any]:
    """Train the tokenizer on `sources` (every document once, in order) and write it to `out` as an HF
    folder that `load_tokenizer(out)` and `AutoTokenizer.from_pretrained(out)` load. Returns the record
    also written to out/kiln_tokenizer.json."""
    if not sources:
        raise DataError("kiln tokenizer train: pass at least one --source")
    target = check_vocab_size(vocab_size, multiple_of=multiple_of)
    out = Path(out).expanduser()
    _check_out(out)
    progress = _Progress(quiet=quiet)
    opened = [_open(src) for src in sources]  # every source checked before any long work
    counts: collections.Counter[str] = collections.Counter()
    docs = nbytes = 0
    for texts in _texts(sources, opened, progress, "counting characters"):
        for t in texts:
            counts.update(t)
        docs += len(texts)
        nbytes += sum(len(t.encode()) for t in texts)
    if not docs:
        raise DataError(f"{', '.join(s.path for s in sources)}: no text to train on (every document is empty)")
    alphabet = choose_alphabet(counts, coverage=CHAR_COVERAGE, limit=(target - FIXED) // 2)
    progress.say(f"{docs:,} documents, {nbytes / 1e6:,.1f} MB, {len(counts):,} distinct characters, "
                 f"alphabet {len(alphabet)}; counting words")
    # the trainer's vocabulary is the controls, the alphabet and the merges: the bytes come after training
    trainer = trainers.BpeTrainer(vocab_size=target - len(BYTE_TOKENS), special_tokens=list(CONTROL_TOKENS),
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  max_token_length=MAX_TOKEN_CHARS, min_frequency=2,
                                  show_progress=not quiet and sys.stderr.isatty())
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizer()
    t0 = time.time()
    tk.train_from_iterator(_texts(sources, opened, progress, "counting words"), trainer=trainer)
    final, stats = assemble(tk, alphabet=alphabet, vocab_size=target)
    seconds = time.time() - t0
    progress.say(f"learned {stats['merges']:,} merges in {seconds:.1f} s")
    if stats["reserved"]:
        progress.say(f"the sources gave only {target - stats['reserved']:,} tokens; ids "
                     f"{target - stats['reserved']}-{target - 1} are <reserved_N> placeholders (more text fills them)")
    tok = Tokenizer(final, name=f"kiln-bpe-{target}", eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    record = {"vocab_size": tok.vocab_size, "requested_vocab_size": vocab_size, "multiple_of": multiple_of,
              **stats, "sources": [s.path for s in sources], "documents": docs, "bytes": nbytes,
              "character_coverage": CHAR_COVERAGE, "max_token_chars": MAX_TOKEN_CHARS,
              "tokenizers_version": tokenizers.__version__, "digest": tokenizer_digest(tok)}
    _write(tok, out, record)
    return {**record, "out": str(out), "train_seconds": round(seconds, 2)}


def _write(tok: Tokenizer, out: Path, record: dict[str, Any]) -> None:
    """Write the folder next to `out`, then move it in: it appears whole or not at all."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok.save_hf(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            _check_out(out)  # still empty: nothing was put there while training
            out.rmdir()
        tmp.rename(out)
    except OSError as e:
        raise DataError(f"--out {out}: cannot write the tokenizer ({e.strerror or first_line(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_stats(spec: str, sources: list[SourceConfig]) -> dict[str, Any]:
    """Bytes (UTF-8) per token of `spec` on `sources`, and its encode speed on this machine."""
    tok = load_tokenizer(spec, key="--tokenizer")
    texts = [t for batch in _texts(sources, [_open(s) for s in sources], _Progress(quiet=True), "") for t in batch]
    t0 = time.time()
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    seconds = time.time() - t0
    nbytes = sum(len(t.encode()) for t in texts)
    return {"tokenizer": spec, "vocab_size": tok.vocab_size, "documents": len(texts), "bytes": nbytes,
            "tokens": tokens, "bytes_per_token": round(nbytes / max(tokens, 1), 4),
            "encode_tokens_per_sec": round(tokens / max(seconds, 1e-9))}


# ---- the command -----------------------------------------------------------------------------

USAGE = """kiln tokenizer <command>

  train --source PATH_OR_DATASET [--source ...] --vocab-size N --out DIR
        [--multiple-of 64]
      a BPE with byte fallback (Mistral v3 style) on the sources; use it with
      --data.tokenizer DIR and --model.vocab_size <its vocab_size>
  stats --tokenizer T [--tokenizer ...] --source PATH_OR_DATASET [--source ...]
      bytes per token on the sources, one JSON line per tokenizer

kiln tokenizer COMMAND -h shows a command's options and their defaults.
"""


def _add_sources(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", action="append", default=[], required=True,
                   help="file, glob, folder, bundled:train, HF dataset, or a JSON object of source fields "
                        "('{\"path\": \"web/*.jsonl\", \"take\": 10000}'); repeat for several")


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln tokenizer train", description="Train a BPE tokenizer with byte fallback.",
                                allow_abbrev=False)
    _add_sources(p)
    p.add_argument("--vocab-size", type=int, required=True, help="ids in all (rounded up to --multiple-of)")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--multiple-of", type=int, default=64, help="round the vocabulary up to this (1: exactly N)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parse_with_sources(p, argv)
    sources = [source_arg(s, i) for i, s in enumerate(args.source)]
    target = check_vocab_size(args.vocab_size, multiple_of=args.multiple_of)
    if target != args.vocab_size and not args.quiet:
        print(f"kiln tokenizer: vocab size {args.vocab_size} rounded up to {target}, a multiple of "
              f"{args.multiple_of} (--multiple-of 1 keeps {args.vocab_size})", file=sys.stderr)
    record = train_tokenizer(sources, args.out, vocab_size=args.vocab_size, multiple_of=args.multiple_of,
                             quiet=args.quiet)
    if not args.quiet:
        print(f"kiln tokenizer: wrote {args.out}; train with --data.tokenizer {args.out} --model.vocab_size "
              f"{record['vocab_size']}", file=sys.stderr)
    print(json.dumps({k: record[k] for k in ("out", "vocab_size", "alphabet", "merges", "reserved", "documents",
                                             "bytes", "train_seconds", "digest")}))
    return 0


def _stats(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln tokenizer stats", description="Bytes per token of tokenizers on text.",
                                allow_abbrev=False)
    p.add_argument("--tokenizer", action="append", default=[], required=True,
                   help="mistral-v3, mistral-v1, bundled-4k, or a tokenizer folder/json; repeat to compare")
    _add_sources(p)
    args = parse_with_sources(p, argv)
    sources = [source_arg(s, i) for i, s in enumerate(args.source)]
    for spec in args.tokenizer:
        print(json.dumps(tokenizer_stats(spec, sources)), flush=True)
    return 0


COMMANDS = {"train": _train, "stats": _stats}


def main(argv: list[str]) -> int:
    """`kiln tokenizer SUB ...`"""
    if not argv:  # no command: a mistake, so the usage goes to stderr with exit 2
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        print(unknown_command("kiln tokenizer", argv[0], COMMANDS), file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
