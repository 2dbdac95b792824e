"""Tokenizers: load (Mistral SentencePiece, HF folder, tokenizer.json), a legacy ByteLevel BPE trainer, export.

`kiln tokenizer train` (kiln.data.tokenizer_train) trains the Mistral-v3-style BPE with byte
fallback users train with; `train_bpe` below is the small GPT-2-style one the tests build.

Every tokenizer runs through one `tokenizers.Tokenizer` (the HF fast implementation), in
training and in the exported HF folder alike, so an exported model sees exactly the tokens it
was trained on. The Mistral SentencePiece models shipped in `mistral-common` are converted once
to that format and cached under `$KILN_CACHE/tokenizers` (default `~/.cache/kiln/tokenizers`).
Note the fast conversion is not identical to SentencePiece on runs of spaces (FACTS.md); we
never use SentencePiece itself for that reason.

Encoding never adds BOS or EOS; the packer appends EOS to each document.

Known property of the converted Mistral tokenizers (as transformers itself converts them: a
Metaspace pre-tokenizer that prepends the SentencePiece dummy prefix only if the text does not
already start with a space): decode(encode(t)) == t for every t that does not start with a
space; one leading space merges into the prefix. `decode` of a slice of ids likewise drops the
leading space of its first piece, so decode whole sequences and diff when streaming.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from kiln.cache import cache_root
from kiln.errors import DataError, first_line

# spec -> (file name suffix inside mistral_common/data, preferred file name, expected vocab size)
MISTRAL_SPECS: dict[str, tuple[str, str, int]] = {
    "mistral-v3": (".model.v3", "mistral_instruct_tokenizer_240323.model.v3", 32768),
    "mistral-v1": (".model.v1", "tokenizer.model.v1", 32000),
}
# Tokenizers shipped inside the package (src/kiln/data/tokenizers/<name>), each trained on the bundled
# corpus by `kiln tokenizer train` (its kiln_tokenizer.json says how; tests/test_tokenizer_train.py retrains
# it and checks the digest): the CPU demo's small vocabulary.
BUNDLED_TOKENIZERS = Path(__file__).resolve().parent / "tokenizers"


def bundled_tokenizers() -> list[str]:
    return sorted(p.name for p in BUNDLED_TOKENIZERS.iterdir() if (p / "tokenizer.json").is_file()) \
        if BUNDLED_TOKENIZERS.is_dir() else []


SPACE = "\u2581"  # SentencePiece's meta symbol for a space (U+2581), which Metaspace pre-tokenizers write
# Names tried, in order, when a bare tokenizer.json does not say which tokens are EOS / BOS.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "<|startoftext|>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids kiln needs. Encoding never adds special tokens."""

    def __init__(self, backend: tokenizers.Tokenizer, *, name: str, eos_token: str, bos_token: str | None,
                 unk_token: str | None = None) -> None:
        self._tk = backend
        self._digest: str | None = None  # tokenizer_digest's, computed on first use
        self.name = name
        self.eos_token, self.bos_token, self.unk_token = eos_token, bos_token, unk_token
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer '{name}': its EOS token {eos_token!r} is not in the vocabulary")
        self.eos_id: int = eos_id
        self.bos_id: int | None = backend.token_to_id(bos_token) if bos_token else None
        # ids the model must have: every id in the vocabulary, added tokens included
        top = max(backend.get_vocab(with_added_tokens=True).values(), default=-1)
        self.vocab_size: int = max(backend.get_vocab_size(with_added_tokens=True), top + 1)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})"

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying fast tokenizer (shared, do not mutate)."""
        return self._tk

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS, no EOS."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (Rust, multi-threaded); no BOS, no EOS."""
        return [e.ids for e in self._tk.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens included (the decoder may drop the leading space of the first piece)."""
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def save_hf(self, out_dir: Path) -> None:
        """Write tokenizer.json + tokenizer_config.json so `AutoTokenizer.from_pretrained(out_dir)`
        encodes exactly like `encode` (no BOS added, even with add_special_tokens=True) and decodes alike."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tk = tokenizers.Tokenizer.from_str(self._tk.to_str())
        if tk.encode("a", add_special_tokens=True).ids != tk.encode("a", add_special_tokens=False).ids:
            tk.post_processor = None  # it would add BOS/EOS: kiln never does
        tk.no_padding()
        tk.no_truncation()
        tk.save(str(out_dir / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # use tokenizer.json as is, no class-specific patches
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "unk_token": self.unk_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "kiln_spec": self.name,
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        special = {k: config[k] for k in ("eos_token", "bos_token", "unk_token") if config[k]}
        (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """sha256 of what decides the ids: the model type, the vocabulary, the BPE merges (or Unigram
    scores) and the added tokens. Not of `to_str()` itself, whose layout changes between tokenizers
    releases (merges were "a b" strings before 0.20, pairs since) without changing a single id."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:  # not a kiln.data.tokenizer.Tokenizer (tests): what it exposes
        text = f"{tokenizer.name}:{tokenizer.vocab_size}:{tokenizer.eos_id}"
        return hashlib.sha256(text.encode()).hexdigest()
    if tokenizer._digest is None:  # once per Tokenizer, and kept in kiln's cache (0.6 s for Mistral v3's)
        tokenizer._digest = _cached_digest(backend)
    return tokenizer._digest


def _cached_digest(backend: tokenizers.Tokenizer) -> str:
    """_digest(backend), read from `<kiln cache>/tokenizer-digests/<sha256 of its serialization>` when an
    earlier process wrote it (that hash costs 0.07 s of the 0.6 s). Without a writable cache: computed."""
    key = hashlib.sha256(backend.to_str().encode()).hexdigest()
    path = cache_root() / "tokenizer-digests" / key
    try:
        cached = path.read_text().strip()
        if len(cached) == 64:
            return cached
    except OSError:
        pass
    digest = _digest(backend)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}")
        tmp.write_text(digest + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
    return digest


def _digest(backend: tokenizers.Tokenizer) -> str:
    model = json.loads(backend.to_str()).get("model", {})
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges") or []]
    scores = [float(s) for _, s in model["vocab"]] if isinstance(model.get("vocab"), list) else []  # Unigram
    added = sorted((i, t.content, t.special) for i, t in backend.get_added_tokens_decoder().items())
    payload = {"type": model.get("type"), "vocab": sorted(backend.get_vocab(with_added_tokens=False).items()),
               "merges": merges, "scores": scores, "added": added}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading


def portable_spec(spec: str) -> str:
    """`spec` as a run's saved config keeps it: a shipped name as it is, a local path made absolute, so
    `kiln generate`, export or a resume started in another folder still finds it (as load_tokenizer reads it)."""
    if spec in MISTRAL_SPECS or spec in bundled_tokenizers():
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def load_tokenizer(spec: str, *, key: str = "data.tokenizer") -> Tokenizer:
    """'mistral-v3' | 'mistral-v1' | a tokenizer shipped in the package ('bundled-4k') | path to an HF
    tokenizer folder | path to a tokenizer.json file. `key`: what the user typed it as, for errors."""
    if spec in MISTRAL_SPECS:
        return _from_folder(_mistral_folder(spec), name=spec)
    if spec in bundled_tokenizers():
        return _from_folder(BUNDLED_TOKENIZERS / spec, name=spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise DataError(f"{key}: tokenizer '{spec}': expected a tokenizer.json file or an HF tokenizer folder")
        return _from_json_file(path, name=spec)
    if path.is_dir():
        if (path / "tokenizer_config.json").is_file() and _kiln_written(path):
            return _from_folder(path, name=spec)
        return _from_hf_folder(path, name=spec, key=key)
    named = ", ".join([*MISTRAL_SPECS, *bundled_tokenizers()])
    raise DataError(f"{key}: unknown tokenizer '{spec}' (no such name, file or folder): use {named}, an HF tokenizer "
                    "folder, or a tokenizer.json file")


def _kiln_written(folder: Path) -> bool:
    try:
        return "kiln_spec" in json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False


def _token_str(value: Any) -> str | None:
    """tokenizer_config stores a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _guess(tk: tokenizers.Tokenizer, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if tk.token_to_id(n) is not None), None)


def _from_folder(folder: Path, *, name: str) -> Tokenizer:
    """A folder written by `save_hf` (kiln's own cache): tokenizer.json is the whole truth."""
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:
        cached = cache_root().resolve() in folder.resolve().parents  # a conversion kiln rebuilds; else the user's
        what = next((f for f in ("tokenizer_config.json", "tokenizer.json") if not (folder / f).is_file()), None)
        what = f"{folder / what}: missing" if what else f"{folder}: unreadable ({first_line(e)})"
        raise DataError(f"tokenizer '{name}': {what}; " + ("delete that folder to rebuild it" if cached else
                        "restore the folder, or train it again with `kiln tokenizer train`")) from None
    return Tokenizer(tk, name=name, eos_token=cfg["eos_token"], bos_token=cfg.get("bos_token"),
                     unk_token=cfg.get("unk_token"))


def _from_json_file(path: Path, *, name: str) -> Tokenizer:
    try:
        tk = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        try:  # JSON, but not a tokenizer's: the reader's "expected ','" reads as a syntax error
            json.loads(path.read_text())
            what = "valid JSON but not a tokenizer.json as HF tokenizers writes it"
        except (OSError, ValueError):
            what = "not a tokenizer.json"
        raise DataError(f"tokenizer '{name}': cannot load {path}: {what} ({first_line(e)})") from None
    cfg: dict[str, Any] = {}
    if (path.parent / "tokenizer_config.json").is_file():
        try:
            cfg = json.loads((path.parent / "tokenizer_config.json").read_text())
        except ValueError:
            cfg = {}
    eos = _token_str(cfg.get("eos_token")) or _guess(tk, EOS_NAMES)
    if eos is None:
        raise DataError(f"tokenizer '{name}': no end-of-sequence token found (tried {', '.join(EOS_NAMES)}); "
                        "add a tokenizer_config.json with eos_token next to it")
    bos = _token_str(cfg.get("bos_token")) or _guess(tk, BOS_NAMES)
    return Tokenizer(tk, name=name, eos_token=eos, bos_token=bos, unk_token=_token_str(cfg.get("unk_token")))


def _from_hf_folder(folder: Path, *, name: str, key: str) -> Tokenizer:
    """Any AutoTokenizer folder: take the backend exactly as transformers builds it."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise DataError(f"tokenizer '{name}': AutoTokenizer cannot load this folder ({first_line(e)}); point "
                        f"{key} at a folder with tokenizer.json or tokenizer.model") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer '{name}': {type(hf).__name__} has no fast (tokenizers) backend; "
                        "convert it to tokenizer.json first")
    eos = hf.eos_token or _guess(backend, EOS_NAMES)
    if eos is None:
        raise DataError(f"tokenizer '{name}': no eos_token set in its tokenizer_config.json")
    tk = tokenizers.Tokenizer.from_str(backend.to_str())  # own copy
    return Tokenizer(tk, name=name, eos_token=eos, bos_token=hf.bos_token, unk_token=hf.unk_token)


# ---------------------------------------------------------------------------------------------
# Mistral SentencePiece -> fast tokenizer, converted once and cached


def mistral_model_file(spec: str) -> Path:
    """The SentencePiece file for `spec` inside the installed mistral-common package."""
    suffix, preferred, _ = MISTRAL_SPECS[spec]
    try:
        data = Path(str(importlib.resources.files("mistral_common") / "data"))
    except ModuleNotFoundError:
        raise DataError(f"tokenizer '{spec}' needs the mistral-common package: pip install mistral-common") from None
    if (data / preferred).is_file():
        return data / preferred
    found = sorted(p for p in data.glob(f"*{suffix}") if p.is_file())
    if not found:
        raise DataError(f"tokenizer '{spec}': no *{suffix} file in {data}; reinstall mistral-common")
    return found[-1]


def _mistral_folder(spec: str) -> Path:
    """Cached converted folder for `spec`, converting on first use (atomic, safe if processes race)."""
    model = mistral_model_file(spec)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:12]
    final = cache_root() / "tokenizers" / f"{spec}-{digest}"
    if (final / "tokenizer.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec}-", dir=final.parent))
    except OSError as e:
        raise DataError(f"tokenizer '{spec}' is converted once into kiln's cache, and {final.parent} is not writable "
                        f"({e.strerror or e}); set KILN_CACHE to a writable folder") from None
    try:
        tok = _convert_sentencepiece(model, work=tmp / "sp", spec=spec)
        tok.save_hf(tmp / "out")
        try:
            os.rename(tmp / "out", final)
        except OSError:  # another process won the race; its folder is equivalent
            if not (final / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_sentencepiece(model: Path, *, work: Path, spec: str) -> Tokenizer:
    try:
        import google.protobuf  # noqa: F401  (transformers needs it to read SentencePiece models)
        from transformers import LlamaTokenizer
    except ImportError as e:
        raise DataError(f"tokenizer '{spec}': converting SentencePiece needs {e.name}: pip install protobuf") from None
    work.mkdir(parents=True)
    shutil.copyfile(model, work / "tokenizer.model")
    # LlamaTokenizer.from_pretrained(dir) converts correctly; LlamaTokenizerFast(vocab_file=...)
    # silently gives an empty tokenizer in transformers 5.x (FACTS.md).
    hf = LlamaTokenizer.from_pretrained(str(work))
    expected = MISTRAL_SPECS[spec][2]
    if len(hf) != expected:
        raise DataError(f"tokenizer '{spec}': conversion of {model.name} gave {len(hf)} ids, expected {expected}; "
                        "check the transformers version")
    tk = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok = Tokenizer(tk, name=spec, eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    assert (tok.eos_id, tok.bos_id) == (2, 1), (tok.eos_id, tok.bos_id)
    return tok


# ---------------------------------------------------------------------------------------------
# Training


def train_bpe(files: list[Path], *, vocab_size: int, out_dir: Path) -> Tokenizer:
    """Train a ByteLevel BPE (GPT-2 style, lossless on any UTF-8) on text files; save it to out_dir.

    Special tokens: `<s>` (id 0, BOS) and `</s>` (id 1, EOS). Writes tokenizer.json and an
    AutoTokenizer-loadable config; `load_tokenizer(str(out_dir))` loads it back.
    """
    files = [Path(f) for f in files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"train_bpe: no such file {missing[0]}")
    if vocab_size < 256 + 2:
        raise DataError(f"train_bpe: vocab_size {vocab_size} is below the 258 ids a byte-level BPE needs")
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train([str(f) for f in files], trainer=trainer)
    tok = Tokenizer(tk, name=str(out_dir), eos_token="</s>", bos_token="<s>")
    tok.save_hf(Path(out_dir))
    return tok
