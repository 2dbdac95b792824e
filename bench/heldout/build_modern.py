"""Build bench/heldout/modern.jsonl.gz: modern English held-out text, the other kind from heldout.jsonl.gz.

heldout.jsonl.gz is literary English of the bundled corpus's kind; RESULTS.md's "Tenth sitting" found that the
kiln/HF ratio depends on the held-out text's domain, so `bench/quality.py --also-score bench/heldout/modern.jsonl.gz`
scores both final models on modern English too. The texts: three licences as Debian's base-files package ships them
in /usr/share/common-licenses (GPL-3, Apache-2.0, MPL-2.0: modern legal English; each may be copied verbatim, which
this is, apart from the corpus's whitespace cleaning). Debian only: other systems lack that folder.

    python bench/heldout/build_modern.py            # write bench/heldout/modern.jsonl.gz
    python bench/heldout/build_modern.py --check    # rebuild in memory, compare with the shipped file
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import check_disjoint, clean, jsonl_gz, write_or_check  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "modern.jsonl.gz"
LICENSES = Path("/usr/share/common-licenses")
# sha256 of the files this was built from (Debian 12 base-files 12.4+deb12u11)
EXPECTED_SHA256 = {
    "GPL-3": "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986",
    "Apache-2.0": "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30",
    "MPL-2.0": "fab3dd6bdab226f1c08630b1dd917e11fcb4ec5e1e020e2c16f83a0a13863e85",
}
TITLES = {"GPL-3": "GNU General Public License, version 3", "Apache-2.0": "Apache License, Version 2.0",
          "MPL-2.0": "Mozilla Public License, version 2.0"}


def build(folder: Path = LICENSES) -> bytes:
    """The bytes of modern.jsonl.gz."""
    docs = []
    for name, title in TITLES.items():
        data = (folder / name).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != EXPECTED_SHA256[name]:
            print(f"note: {folder / name} sha256 {digest} differs from the one this file was built from",
                  file=sys.stderr)
        docs.append({"text": clean(data.decode("utf-8")), "source": "licenses", "title": title})
    check_disjoint(docs, notices=False)
    return jsonl_gz(docs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    args = ap.parse_args()
    if not LICENSES.is_dir():
        print(f"{LICENSES}: not found (Debian's base-files package ships it)", file=sys.stderr)
        return 2
    return write_or_check(OUT, build(), check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())
