"""Text sources: resolve a SourceConfig to files and load its documents as an HF `datasets.Dataset`.

A source path is one of:
  * `bundled:train` / `bundled:val`: the corpus shipped in kiln/data/corpus;
  * a file (.txt, .jsonl, .json, .parquet, .arrow; .txt/.jsonl/.json may be .gz/.bz2/.xz/.zst);
  * a glob (`data/*.jsonl`, `**` recurses) or a folder (every supported file inside, recursively,
    hidden entries skipped), in sorted path order;
  * otherwise an HF hub dataset name (`HuggingFaceFW/fineweb-edu` with `hf_config`, `split`).

Local files load map-style (memory-mapped Arrow, converted once into `$KILN_CACHE/datasets`, never
beside the user's data) with one column, "text" (the bundled corpus, 6 MB of known-clean text, is read
into memory instead: `TextList`, so the default run never imports datasets); `streaming: true` opens
the same sources as an HF IterableDataset instead (`open_stream`: nothing downloaded or converted first). `skip` / `take`
select a range of documents either way. A folder holding a `manifest.json` is a `kiln data prepare`
output (pre-tokenized shards, kiln.data.shards), not text. Every user mistake is a one-line DataError.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.cache import cache_root
from kiln.config import SourceConfig, build, validate_source
from kiln.errors import DataError, first_line

if TYPE_CHECKING:
    import datasets

CORPUS_DIR = Path(__file__).parent / "corpus"
BUNDLED = {"train": "train.jsonl.gz", "val": "val.jsonl.gz"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# file extension -> datasets builder
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
           ".arrow": "arrow"}


def file_format(path: Path) -> str | None:
    """The datasets builder for `path` ('json', 'text', 'parquet', 'arrow'), or None if unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
        fmt = FORMATS.get(suffixes[-1]) if suffixes else None
        return fmt if fmt in ("text", "json") else None  # columnar formats compress internally
    return FORMATS.get(suffixes[-1]) if suffixes else None


def check_text_column_flag(column: str, sources: list[SourceConfig]) -> None:
    """A command's --text-column NAME on a plain-text source (one document per line or file: no columns) would
    be silently ignored: one line instead."""
    for src in sources:
        if column != "text" and file_format(Path(src.path)) == "text":
            raise DataError(f"--text-column applies to jsonl, json and parquet sources; {src.path} is plain text: "
                            "drop it")


def _looks_local(path: str) -> bool:
    """A path the user meant as a file, not an HF dataset name."""
    p = Path(path).expanduser()
    return (path.startswith((".", "/", "~")) or os.sep in path and p.parent.exists()
            or file_format(p) is not None or any(c in path for c in "*?["))


def is_hub_source(src: SourceConfig) -> bool:
    """True when `src.path` names an HF hub dataset (no local file, glob or bundled split matches)."""
    return not (src.path.startswith("bundled:") or Path(src.path).expanduser().exists() or _looks_local(src.path))


def resolve_files(src: SourceConfig) -> list[Path]:
    """The local files behind `src`, sorted. An HF hub dataset resolves to []."""
    path = src.path
    supported = ", ".join(sorted({*FORMATS, ".jsonl.gz", ".txt.gz"}))
    if path.startswith("bundled:"):
        split = path.split(":", 1)[1]
        if split not in BUNDLED:
            raise DataError(f"{path}: unknown bundled split; use bundled:train or bundled:val")
        f = CORPUS_DIR / BUNDLED[split]
        if not f.is_file():
            raise DataError(f"{path}: the bundled corpus file {f} is missing; reinstall kiln")
        return [f]
    p = Path(path).expanduser()
    if p.is_file():
        if file_format(p) is None:
            raise DataError(f"{path}: unsupported file type; use one of {supported}")
        return [p]
    if p.is_dir():
        if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():  # Dataset.save_to_disk: the
            arrow = sorted(p.glob("*.arrow"))  # arrow files hold the rows; its json files are metadata
            if not arrow:
                raise DataError(f"{path}: a datasets save_to_disk folder without its .arrow files")
            return arrow
        files = sorted(f for f in p.rglob("*") if f.is_file() and file_format(f) is not None
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"{path}: folder holds no {supported} files")
        return files
    if any(c in path for c in "*?["):
        matched = sorted(Path(m) for m in glob.glob(os.path.expanduser(path), recursive=True))
        matched = [m for m in matched if m.is_file()]
        if not matched:
            raise DataError(f"{path}: glob matches no files")
        bad = [m for m in matched if file_format(m) is None]
        if bad:
            raise DataError(f"{path}: glob matches {bad[0]}, an unsupported file type; use one of {supported}")
        return matched
    if _looks_local(path):
        raise DataError(f"{path}: no such file or folder")
    return []


def source_name(src: SourceConfig) -> str:
    """Label for metrics: src.name, else the file stem (without .jsonl.gz etc.; for a glob its fixed words,
    "web-*.jsonl" -> web, or else its folder), else the dataset name."""
    if src.name:
        return src.name
    if src.path.startswith("bundled:"):
        return "bundled-" + src.path.split(":", 1)[1]
    p = Path(src.path.rstrip("/"))
    if _looks_local(src.path) or p.exists():
        name = p.name
        for _ in range(2):
            stem, ext = os.path.splitext(name)
            if ext.lower() in (*COMPRESSIONS, *FORMATS):
                name = stem
        if any(c in src.path for c in "*?["):  # a glob: its fixed words ("web-*" -> web), else its folder
            name = re.sub(r"\[[^\]]*\]|[*?]", "", name).strip("-_. ")
            if not name:
                fixed = [part for part in p.parts[:-1] if not any(c in part for c in "*?[")]
                name = Path(*fixed).expanduser().resolve().name if fixed else Path.cwd().name
        return name or src.path
    return src.path


def _quiet_datasets() -> None:
    import datasets
    import huggingface_hub

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # failures become DataErrors
    # and the hub client's own retry lines ("Retrying in 8s [Retry 5/5]") with them: one line, not eleven
    huggingface_hub.utils.logging.set_verbosity(huggingface_hub.utils.logging.CRITICAL)


def datasets_cache_dir() -> Path:
    """Where local files are converted to Arrow: `<kiln cache>/datasets`."""
    return cache_root() / "datasets"


class TextList:
    """Documents held in memory, with the part of `datasets.Dataset`'s interface kiln's readers use (len,
    ds[i] / ds[a:b] / ds[ids] -> {"text": ...}, ds["text"], select, iter). The bundled corpus loads as one:
    importing datasets alone costs 0.6 s of every command that reads it, more than reading the corpus."""

    column_names = ["text"]

    def __init__(self, texts: list[str]) -> None:
        self._texts = texts

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if key != "text":
                raise KeyError(key)
            return list(self._texts)
        if isinstance(key, int | slice):
            return {"text": self._texts[key]}
        return {"text": [self._texts[i] for i in key]}

    def select(self, indices: Any) -> TextList:
        return TextList([self._texts[i] for i in indices])

    def iter(self, batch_size: int) -> Any:
        for a in range(0, len(self._texts), batch_size):
            yield {"text": self._texts[a:a + batch_size]}


def _bundled_documents(f: Path) -> TextList:
    import gzip
    import json

    with gzip.open(f, "rt", encoding="utf-8") as fh:
        return TextList([json.loads(line)["text"] or "" for line in fh if line.strip()])


def load_documents(src: SourceConfig) -> datasets.Dataset | TextList:
    """Map-style dataset of `src`'s documents with one column, "text", in file order."""
    _not_prepared(src)
    files = resolve_files(src)
    if src.path.startswith("bundled:"):
        return _skip_take(_bundled_documents(files[0]), src)
    if not files:
        return _load_hub(src)
    import datasets

    _quiet_datasets()
    files = [f for f in files if f.stat().st_size > 0]  # datasets cannot infer a schema from 0 bytes
    if not files:
        raise DataError(f"{src.path}: empty source (0 documents)")
    parts = [_load_local(src, run, fmt) for fmt, run in _format_runs(files)]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    ds = _skip_take(ds, src)
    _check_not_empty(ds, src.path)
    return ds


def is_prepared(path: str) -> bool:
    """True when `path` is a folder written by `kiln data prepare` (it holds manifest.json)."""
    return (Path(path).expanduser() / "manifest.json").is_file()


def _not_prepared(src: SourceConfig) -> None:
    """A prepared folder holds .json files too: read as text, it would fail on a missing 'text' column (or,
    half prepared, on its .bin shards)."""
    if (Path(src.path).expanduser() / "plan.json").is_file() and not is_prepared(src.path):  # shards.PLAN
        raise DataError(f"{src.path}: `kiln data prepare` did not finish here; run the same command again to resume")
    if is_prepared(src.path):
        raise DataError(f"{src.path}: a folder written by `kiln data prepare` (pre-tokenized shards), not text; "
                        f"train from it with --data.shards {src.path} (or data.format=shards), or point at the text "
                        "it came from")


def _format_runs(files: list[Path]) -> list[tuple[str | None, list[Path]]]:
    """Consecutive runs of one format, so file order is kept."""
    runs: list[tuple[str | None, list[Path]]] = []
    for f in files:
        fmt = file_format(f)
        if runs and runs[-1][0] == fmt:
            runs[-1][1].append(f)
        else:
            runs.append((fmt, [f]))
    return runs


def _skip_take(ds: datasets.Dataset, src: SourceConfig) -> datasets.Dataset:
    if not (src.skip or src.take):
        return ds
    n = len(ds)
    start = min(src.skip, n)
    end = min(n, start + src.take) if src.take else n
    if end <= start:
        raise DataError(f"{src.path}: skip={src.skip} leaves no documents (the source has {n}); lower skip")
    return ds.select(range(start, end))


def _text_kwargs(src: SourceConfig) -> dict[str, str]:
    """The text reader's options: documents by src.txt_sample_by; a UTF-8 byte-order mark (Windows editors write
    one) is no text to train on (jsonl's reader drops it already)."""
    return {"sample_by": src.txt_sample_by, "encoding": "utf-8-sig"}


def open_stream(src: SourceConfig) -> datasets.IterableDataset:
    """`src` as an HF IterableDataset with one column, "text" (skip/take applied). Reads nothing yet,
    except what datasets needs to infer the columns; a missing column is a DataError here."""
    import datasets

    _not_prepared(src)
    _quiet_datasets()
    files = resolve_files(src)
    if files:
        files = [f for f in files if f.stat().st_size > 0]
        if not files:
            raise DataError(f"{src.path}: empty source (0 documents)")
        parts = []
        for fmt, run in _format_runs(files):
            kwargs = _text_kwargs(src) if fmt == "text" else {}
            try:
                ds = datasets.load_dataset(fmt, data_files=[str(f) for f in run], split="train", streaming=True,
                                           **kwargs)
            except Exception as e:
                raise _read_error(e, run, fmt, src.path) from None
            parts.append(_text_column(ds, "text" if fmt == "text" else src.text_column, where=src.path))
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    else:
        try:
            ds = datasets.load_dataset(src.path, src.hf_config or None, split=src.split, streaming=True)
        except Exception as e:
            raise DataError(f"{src.path}: not a local file and cannot stream it as an HF dataset ({first_line(e)})"
                            ) from None
        ds = _text_column(ds, src.text_column, where=src.path)
    if src.skip:
        ds = ds.skip(src.skip)
    if src.take:
        ds = ds.take(src.take)
    return ds


def stream_error(e: Exception, src: SourceConfig) -> DataError:
    """A failure while iterating a stream, as one line naming the source (and the bad byte for text files)."""
    if isinstance(e, DataError):
        return e
    files = [f for f in resolve_files(src) if f.stat().st_size > 0] if not is_hub_source(src) else []
    if files:
        return _read_error(e, files, file_format(files[0]), src.path)
    return DataError(f"{src.path}: reading the stream failed ({type(e).__name__}: {first_line(e)})")


def _load_local(src: SourceConfig, files: list[Path], fmt: str | None) -> datasets.Dataset:
    import datasets

    kwargs = _text_kwargs(src) if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train",
                                   cache_dir=str(datasets_cache_dir()), **kwargs)
    except Exception as e:  # datasets wraps reader errors in several exception types
        raise _read_error(e, files, fmt, src.path) from None
    column = "text" if fmt == "text" else src.text_column
    where = src.path if len(files) > 1 else str(files[0])
    ds = _text_column(ds, column, where=where)
    if fmt == "json":  # pyarrow's JSON reader does not check UTF-8; a bad byte would fail mid-training
        _check_utf8(ds, where=where)
    return ds


def _check_utf8(ds: datasets.Dataset, *, where: str) -> None:
    """Validate the text column's UTF-8 (vectorised in Arrow) and name the first bad document. Once per
    Arrow conversion: a marker keyed by the dataset's fingerprint (datasets derives it from the files'
    paths and mtimes, as it does the cache) spares later processes (ranks, workers, restarts) the pass."""
    marker = datasets_cache_dir() / "utf8-valid" / ds._fingerprint
    if marker.is_file():
        return
    _validate_utf8(ds, where=where)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def _validate_utf8(ds: datasets.Dataset, *, where: str) -> None:
    import pyarrow as pa

    start = 0
    for chunk in ds.data.column("text").chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid as e:
            index = str(e).rsplit(" ", 1)[-1]
            row = start + int(index) if index.isdigit() else start
            raise DataError(f"{where}: document {row} is not valid UTF-8 ({e}); re-encode the file as UTF-8") from None
        start += len(chunk)


def _text_column(ds: Any, column: str, *, where: str) -> Any:
    """`ds` (a Dataset or an IterableDataset) reduced to one string column named "text". A stream may
    not know its columns before it is read (column_names / features None): then it is taken on trust."""
    names, features = ds.column_names, ds.features
    if names is not None and column not in names:
        raise DataError(f"{where}: no column '{column}' (columns: {', '.join(names)}); set text_column on the source")
    feature = features.get(column) if features is not None else None
    dtype = getattr(feature, "dtype", None) if feature is not None else "string"
    if dtype not in ("string", "large_string"):
        raise DataError(f"{where}: column '{column}' holds {dtype or type(feature).__name__}, not text; "
                        "set text_column to a string column")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _check_not_empty(ds: datasets.Dataset, where: str) -> None:
    """0 rows, or no row with any text: a one-line DataError. Cheap: arrow compute over the column."""
    if len(ds) == 0:
        raise DataError(f"{where}: empty source (0 documents)")
    import pyarrow.compute as pc

    head = ds.data.column("text").slice(0, 1000)
    if (pc.max(pc.utf8_length(head)).as_py() or 0) > 0:
        return
    if (pc.max(pc.utf8_length(ds.data.column("text"))).as_py() or 0) == 0:
        raise DataError(f"{where}: empty source (all {len(ds)} documents have empty text)")


def _read_error(e: Exception, files: list[Path], fmt: str | None, where: str) -> DataError:
    """Turn a datasets/pyarrow failure into one line naming the file (and byte offset for bad UTF-8)."""
    chain, cur = [], e
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if fmt == "text" or any(isinstance(c, UnicodeDecodeError) for c in chain):
        for f in files:
            offset = _first_bad_utf8(f) if file_format(f) == "text" and f.suffix.lower() not in COMPRESSIONS else None
            if offset is not None:
                return DataError(f"{f}: not valid UTF-8 (first bad byte at offset {offset}); re-encode it as UTF-8")
    root = next((c for c in chain if not type(c).__module__.startswith("datasets")), chain[-1])
    if fmt == "json" and len(files) > 1 and (bad := _first_bad_json_line(files)) is not None:
        return DataError(f"{where}: cannot read as json: {bad}")
    name = str(files[0]) if len(files) == 1 else f"{where} ({len(files)} files)"
    return DataError(f"{name}: cannot read as {fmt} ({type(root).__name__}: {first_line(root)})")


def _first_bad_json_line(files: list[Path]) -> str | None:
    """Where the first JSON-lines file of a glob that pyarrow failed on (its error names no file) goes wrong: "FILE
    line N: ...", or None. Read only when reading has failed."""
    import gzip

    for f in files:
        if ".jsonl" not in [x.lower() for x in f.suffixes] or f.suffix.lower() not in (".jsonl", ".gz"):
            continue
        n = 0
        try:
            with (gzip.open(f, "rt") if f.suffix.lower() == ".gz" else open(f)) as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip() and not isinstance(json.loads(line), dict):
                        return f"{f} line {n} is not a JSON object"
        except ValueError as e:  # json's own errors, bad UTF-8, a gzip file that is not one
            return f"{f}{f' line {n}' if isinstance(e, json.JSONDecodeError) else ''}: {first_line(e)}"
        except OSError:
            continue
    return None


def _first_bad_utf8(path: Path, chunk: int = 1 << 20) -> int | None:
    """Byte offset of the first invalid UTF-8 byte in `path`, or None if the file decodes."""
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            pending = len(dec.getstate()[0])  # bytes of a split character carried from the last block
            try:
                dec.decode(block, final=not block)
            except UnicodeDecodeError as err:
                return offset - pending + err.start
            if not block:
                return None
            offset += len(block)


def _load_hub(src: SourceConfig) -> datasets.Dataset:
    """An HF hub dataset, map-style (downloaded into the HF cache). Not exercised offline."""
    import datasets

    _quiet_datasets()
    try:
        ds = datasets.load_dataset(src.path, src.hf_config or None, split=src.split, streaming=False)
    except Exception as e:
        raise DataError(f"{src.path}: not a local file and cannot load it as an HF dataset ({first_line(e)})"
                        ) from None
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{src.path}: expected one split, got {type(ds).__name__}; set split on the source")
    ds = _text_column(ds, src.text_column, where=src.path)
    ds = _skip_take(ds, src)
    _check_not_empty(ds, src.path)
    return ds


def source_arg(arg: str, i: int, **defaults: str | None) -> SourceConfig:
    """The i-th --source value of `kiln data prepare` / `kiln tokenizer train|stats`: a path, glob or dataset name
    (with the command's `defaults` for the other SourceConfig fields), or a JSON object of SourceConfig fields,
    checked as in a config file."""
    if arg.lstrip().startswith("{"):
        try:
            data = json.loads(arg)
        except ValueError as e:
            raise DataError(f"--source {arg}: not valid JSON ({e})") from None
        src = build(SourceConfig, data, where="--source")
    else:
        src = SourceConfig(path=arg, **{k: v for k, v in defaults.items() if v is not None})
    validate_source(src, i, where="--source")
    return src
