#!/usr/bin/env python3
"""Build bench/heldout/heldout.jsonl.gz: public-domain English prose that is NOT in kiln's bundled corpus.

Two documents, one {"text", "source", "title"} object per line (the bundled corpus's layout, so
`kiln eval --data bench/heldout/heldout.jsonl.gz` reads it too), gzip with mtime 0, so a rebuild
gives the same bytes:

  * Lewis Carroll, "Alice's Adventures in Wonderland" (1865), whole: `tests/testdata/alice29.txt`
    (the Canterbury corpus file, Millennium Fulcrum Edition 2.9) in the PyPI sdist brotli==1.2.1.
  * Herman Melville, "Moby-Dick; or, The Whale" (1851), chapters 1-22 (Ishmael's story up to the
    Pequod sailing): the `mobydick` data set (Project Gutenberg EBook #2701) of the R package
    tokenizers, in the Debian package r-cran-tokenizers 0.3.0-1; the Gutenberg header, the
    transcriber's note, Etymology and Extracts (quotations, some of them Shakespeare's) are not taken.

Inputs are fetched with the ordinary clients unless given:

  python -m pip download --no-deps --no-binary :all: brotli==1.2.1 -d DIR
  apt-get download r-cran-tokenizers=0.3.0-1        (after apt-get update)

Decoding the R data needs the PyPI package `rdata` (a build-time dependency only; tested with 1.1.0):
`pip install --target DIR rdata` and pass `--rdata-path DIR` to keep it out of the venv.

    python bench/heldout/build.py [--sdist brotli-1.2.1.tar.gz] [--deb r-cran-tokenizers_0.3.0-1_amd64.deb]
                                  [--check]   # rebuild in memory and compare with the shipped file

The build fails if any 200-character passage of the output (every 50th offset) occurs in the
bundled corpus (train or val), or if a Gutenberg / licence notice survived the cleaning.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import warnings
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT = HERE / "heldout.jsonl.gz"
CORPUS = REPO / "src" / "kiln" / "data" / "corpus"

BROTLI = "brotli==1.2.1"
TOKENIZERS_DEB = "r-cran-tokenizers=0.3.0-1"
EXPECTED_SHA256 = {  # a mismatch is reported, not fatal: the output check below is what matters
    "brotli-1.2.1.tar.gz": "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
    "r-cran-tokenizers_0.3.0-1_amd64.deb": "6312f013ebfde5650235bfd7ba5c44d9e4cf9f2da9855337c9483fe778f0d8c7",
}
MOBY_FIRST, MOBY_END = "CHAPTER 1. Loomings.", "CHAPTER 23. The Lee Shore."  # chapters 1-22
NOTICE = re.compile(r"gutenberg|\be-?texts?\b|\be-?books?\b|copyright|www\.|https?://|public domain|transcriber",
                    re.IGNORECASE)
PASSAGE, STRIDE = 200, 50


def clean(text: str) -> str:
    """The bundled corpus's cleaning: no BOM, LF line ends, NFC, no trailing whitespace, at most two blank
    lines in a row, no leading/trailing blank lines. Indentation and line breaks are kept."""
    text = unicodedata.normalize("NFC", text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n")


def alice_text(sdist: Path) -> str:
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("/tests/testdata/alice29.txt"))
        f = tf.extractfile(member)
        assert f is not None
        return clean(f.read().decode("ascii"))


def ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a .deb (an ar archive), unpacked in pure Python."""
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit("not a .deb (ar archive)")
    pos, out = 8, {}
    while pos + 60 <= len(data):
        hdr = data[pos:pos + 60]
        size = int(hdr[48:58].decode().strip())
        out[hdr[:16].decode().strip().rstrip("/")] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def moby_text(deb: Path) -> str:
    try:
        import rdata  # build-time only dependency (decodes R's serialisation)
    except ImportError:
        raise SystemExit("build.py needs the 'rdata' package: pip install rdata (or --rdata-path DIR)") from None
    members = ar_members(deb.read_bytes())
    blobs: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(members[next(n for n in members if n.startswith("data.tar"))])) as tf:
        for m in tf.getmembers():
            if m.isfile() and "/tokenizers/data/Rdata.rd" in m.name:
                f = tf.extractfile(m)
                assert f is not None
                blobs[m.name.rsplit("/", 1)[-1]] = f.read()

    def load(blob: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(blob))

    rdx, rdb = blobs["Rdata.rdx"], blobs["Rdata.rdb"]
    index = load(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx))
    off, length = (int(x) for x in index["variables"]["mobydick"])
    blob = rdb[off:off + length]  # 4-byte big-endian length, then a zlib stream
    full = str(load(zlib.decompress(blob[4:]))[0]).replace("\r\n", "\n")
    start, end = full.index(MOBY_FIRST), full.index(MOBY_END)
    return clean(full[start:end])


def passages(text: str) -> set[str]:
    return {text[i:i + PASSAGE] for i in range(0, max(len(text) - PASSAGE, 0) + 1, STRIDE)}


def check_disjoint(docs: list[dict[str, str]], *, notices: bool = True) -> None:
    """No 200-character passage of the held-out text (every 50th offset) occurs in the bundled corpus; with
    `notices`, no Gutenberg or transcriber notice either (the licence texts of build_modern.py are notices)."""
    corpus = []
    for split in ("train", "val"):
        with gzip.open(CORPUS / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            corpus += [json.loads(line)["text"] for line in f]
    everything = "\x00".join(corpus)
    for d in docs:
        hits = [p for p in passages(d["text"]) if p in everything]
        if hits:
            raise SystemExit(f"{d['title']}: {len(hits)} passages also in the bundled corpus, e.g. {hits[0][:80]!r}")
        if notices and (m := NOTICE.search(d["text"])):
            raise SystemExit(f"{d['title']}: a notice survived the cleaning near {d['text'][m.start() - 40:m.end()]!r}")


def build(sdist: Path, deb: Path) -> bytes:
    """The bytes of heldout.jsonl.gz."""
    for p in (sdist, deb):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if EXPECTED_SHA256.get(p.name) not in (None, digest):
            print(f"note: {p.name} sha256 {digest} differs from the one this file was built from", file=sys.stderr)
    docs = [{"text": alice_text(sdist), "source": "carroll", "title": "Alice's Adventures in Wonderland"},
            {"text": moby_text(deb), "source": "melville", "title": "Moby-Dick, Chapters 1-22"}]
    check_disjoint(docs)
    return jsonl_gz(docs)


def jsonl_gz(docs: list[dict[str, str]]) -> bytes:
    """The documents as gzipped JSON lines, byte for byte reproducible (gzip mtime 0, no file name)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for d in docs:
            gz.write(json.dumps(d, ensure_ascii=False).encode("utf-8") + b"\n")
    return buf.getvalue()


def write_or_check(out: Path, data: bytes, *, check: bool) -> int:
    """--check: whether `out` is byte-identical to the rebuild (exit status 0 / 1); else write it."""
    if check:
        same = out.is_file() and out.read_bytes() == data
        print(f"{out}: {'identical' if same else 'DIFFERS from a rebuild'}")
        return 0 if same else 1
    out.write_bytes(data)
    with gzip.open(out, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            print(f"{d['title']}: {len(d['text']):,} chars, {len(d['text'].encode()):,} bytes")
    print(f"wrote {out} ({len(data):,} bytes)")
    return 0


def fetch(tmp: Path, sdist: Path | None, deb: Path | None) -> tuple[Path, Path]:
    if sdist is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", BROTLI,
                        "-d", str(tmp)], check=True)
        sdist = next(tmp.glob("brotli-*.tar.gz"))
    if deb is None:
        subprocess.run(["apt-get", "download", TOKENIZERS_DEB], check=True, cwd=tmp)
        deb = next(tmp.glob("r-cran-tokenizers_*.deb"))
    return sdist, deb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist", type=Path, help="brotli-1.2.1.tar.gz (else pip download)")
    ap.add_argument("--deb", type=Path, help="r-cran-tokenizers_0.3.0-1_amd64.deb (else apt-get download)")
    ap.add_argument("--rdata-path", default="", help="a folder holding the rdata package (pip install --target)")
    ap.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    args = ap.parse_args()
    if args.rdata_path:
        sys.path.insert(0, args.rdata_path)
    with tempfile.TemporaryDirectory() as tmp:
        data = build(*fetch(Path(tmp), args.sdist, args.deb))
    return write_or_check(OUT, data, check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())
