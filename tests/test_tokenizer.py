"""Tokenizers: Mistral specs, HF export that encodes identically, ByteLevel BPE training, errors."""

from __future__ import annotations

import json

import pytest

from kiln.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from kiln.errors import DataError

TEXTS = [
    "Of the liberty of",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "line one\nline two\n\n\nthree   spaces  and\ttabs\t\tend ",
    "code:\n    def f(x):\n        return x  # indented\n",
    "naive cafe -- na\u00efve caf\u00e9, \u00c6sop, \u65e5\u672c\u8a9e, emoji \U0001f600.",
]


@pytest.fixture(scope="module")
def v3() -> Tokenizer:
    # The first call converts SentencePiece -> tokenizer.json and caches it (~/.cache/kiln or $KILN_CACHE).
    return load_tokenizer("mistral-v3")


def test_mistral_v3_ids_and_roundtrip(v3):
    assert (v3.vocab_size, v3.eos_id, v3.bos_id, v3.name) == (32768, 2, 1, "mistral-v3")
    assert v3.encode("Of the liberty of") == [5297, 1040, 27508, 1070]  # no BOS in front (FACTS.md)
    for t in TEXTS:
        ids = v3.encode(t)
        assert ids and ids[0] != v3.bos_id and v3.eos_id not in ids
        assert v3.decode(ids) == t
    assert v3.encode_batch(TEXTS) == [v3.encode(t) for t in TEXTS]
    assert v3.decode([*v3.encode("end"), v3.eos_id]) == "end</s>"  # decode skips nothing
    # Known, as in transformers' own Llama/Mistral conversion: one leading space merges into the
    # SentencePiece dummy prefix, so it does not survive a roundtrip (documents are stripped anyway).
    assert v3.encode(" leading") == v3.encode("leading")


def test_save_hf_autotokenizer_encodes_and_decodes_identically(v3, tmp_path):
    from transformers import AutoTokenizer

    v3.save_hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "</s>" and cfg["bos_token"] == "<s>"
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf.eos_token_id, hf.bos_token_id, len(hf)) == (2, 1, 32768)
    for t in TEXTS:
        ids = v3.encode(t)
        assert hf(t).input_ids == ids  # default add_special_tokens=True must not add BOS either
        assert hf(t, add_special_tokens=False).input_ids == ids
        assert hf.decode(ids) == v3.decode(ids)
    # the exported folder loads back into kiln unchanged
    again = load_tokenizer(str(tmp_path / "hf"))
    assert (again.vocab_size, again.eos_id, again.bos_id) == (32768, 2, 1)
    assert again.encode_batch(TEXTS) == v3.encode_batch(TEXTS)
    single = load_tokenizer(str(tmp_path / "hf" / "tokenizer.json"))
    assert single.eos_id == 2 and single.encode(TEXTS[2]) == v3.encode(TEXTS[2])


def test_mistral_v1_converts_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    v1 = load_tokenizer("mistral-v1")
    assert (v1.vocab_size, v1.eos_id, v1.bos_id) == (32000, 2, 1)
    assert v1.decode(v1.encode(TEXTS[1])) == TEXTS[1]
    (folder,) = (tmp_path / "tokenizers").iterdir()  # renamed into place; no temp dirs left behind
    assert folder.name.startswith("mistral-v1-") and (folder / "tokenizer.json").is_file()


def test_train_bpe_roundtrip(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS * 30))
    tok = train_bpe([corpus], vocab_size=400, out_dir=tmp_path / "bpe")
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()
    assert tok.vocab_size == 400 and (tok.bos_id, tok.eos_id) == (0, 1)
    unseen = "Zebras quietly juggle \u00fcber-quick \u2603 snowmen\n\n  twice"
    for t in [*TEXTS, unseen]:
        assert tok.decode(tok.encode(t)) == t  # byte-level: lossless even on unseen characters
    assert len(tok.encode(TEXTS[1])) < len(TEXTS[1].encode())  # it learned merges
    again = load_tokenizer(str(tmp_path / "bpe"))
    assert again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path / "bpe")
    assert (hf.eos_token, hf.bos_token) == ("</s>", "<s>")
    assert [hf(t).input_ids for t in TEXTS] == tok.encode_batch(TEXTS)


def test_bad_specs_raise_one_line_data_errors(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.json").write_text("{not json")
    cases = {"mistral-v9": "mistral-v3", str(tmp_path / "missing" / "tokenizer.json"): "unknown tokenizer",
             str(tmp_path / "empty_dir"): "AutoTokenizer cannot load", str(tmp_path / "notes.txt"): "tokenizer.json",
             str(tmp_path / "broken.json"): "cannot load"}
    for spec, hint in cases.items():
        with pytest.raises(DataError) as e:
            load_tokenizer(spec)
        msg = str(e.value)
        assert spec in msg and hint in msg and "\n" not in msg, msg


def test_the_digest_is_kept_in_the_cache_and_a_damaged_entry_is_recomputed(v3, tmp_path, monkeypatch):
    from kiln.data import tokenizer as tk

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    want = tk._digest(v3.backend)  # the definition, computed
    first = tk.tokenizer_digest(load_tokenizer("bundled-4k")), tk.tokenizer_digest(load_tokenizer("mistral-v3"))
    (entry,) = [p for p in (tmp_path / "cache" / "tokenizer-digests").iterdir()
                if p.read_text().strip() == want]
    assert first[1] == want and first[0] != want
    entry.write_text("garbage\n")  # damaged: recomputed and rewritten
    assert tk.tokenizer_digest(load_tokenizer("mistral-v3")) == want and entry.read_text().strip() == want
    entry.write_text("f" * 64)  # the entry is what later processes read
    assert tk.tokenizer_digest(load_tokenizer("mistral-v3")) == "f" * 64
    monkeypatch.setenv("KILN_CACHE", "/proc/no-such-cache")  # nowhere to write: computed each time
    fresh = Tokenizer(v3.backend, name=v3.name, eos_token=v3.eos_token, bos_token=v3.bos_token)
    assert tk.tokenizer_digest(fresh) == want
