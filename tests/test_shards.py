"""Pre-tokenized shards: `kiln data prepare` (exact stream, parallel and interrupted runs give the same
bytes), the block order (every block once per epoch over ranks x workers), resume across data-parallel
sizes, validation per source, and `kiln data inspect` / `verify`.

References: the tokenizer's own encode of each document (+ EOS), a reference walk over the raw token
file, and an uninterrupted single-rank run of the same global sequence, all compared exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers

from kiln.cli import main as cli
from kiln.config import SourceConfig
from kiln.data.loader import PackedLoader
from kiln.data.packing import IGNORE, Row, make_batch
from kiln.data.perm import mix_key
from kiln.data.prepare import prepare
from kiln.data.shards import Permutation, ShardLoader, ShardSet, shard_validation_sets
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import DataError
from test_loader import write_jsonl

T = 16  # every window of 16 tokens holds a marker (documents have at most 11 x's): blocks are unique


@pytest.fixture(autouse=True)
def _caches(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path_factory.getbasetemp() / "kiln-cache"))


def word_tokenizer(path: Path, size: int) -> str:
    """Whitespace word-level tokenizer: marker m -> id m, 'x' -> 3, '</s>' (EOS) -> 2."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "x": 3, **{str(i): i for i in range(4, size)}}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two sources (with an empty document), a 32K word tokenizer, and the folder prepared from them."""
    d = tmp_path_factory.mktemp("shards")
    a = write_jsonl(d / "a.jsonl", list(range(1000, 1150)))
    with open(a, "a") as f:
        f.write(json.dumps({"text": ""}) + "\n")
    b = write_jsonl(d / "b.jsonl", list(range(5000, 5050)))
    tok = word_tokenizer(d / "tok.json", 32768)
    sources = [SourceConfig(path=str(a), name="web"), SourceConfig(path=str(b), name="code")]
    out = d / "prepared"
    with pytest.MonkeyPatch.context() as mp:  # the module fixture must not leak KILN_CACHE into later tests
        mp.setenv("KILN_CACHE", str(d / "cache"))
        prepare(sources, out, tokenizer=tok, workers=2, shard_docs=40, quiet=True)
    return {"dir": d, "sources": sources, "tok": tok, "out": out}


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_permutation_is_a_seeded_bijection_with_constant_memory():
    for n in (1, 2, 3, 7, 64, 1000, 4099):
        p = Permutation(n, 11)(np.arange(n))
        assert sorted(p.tolist()) == list(range(n)), n
    a, b = Permutation(1000, 1)(np.arange(1000)), Permutation(1000, 2)(np.arange(1000))
    assert (a != b).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9
    assert np.array_equal(Permutation(1000, 1)(np.array([5, 900])), a[[5, 900]])  # elementwise, no table


def test_permutation_keys_and_order_are_pinned_and_small_inputs_take_the_same_bits():
    """Resume and every prepared folder's order depend on these bits: a faster path must not move them
    (values from the all-numpy implementation)."""
    assert mix_key(1234, 7, 0, 3) == 6870022928532046195 and mix_key(-1, 2**64 + 5) == 11162696052992267970
    p = Permutation(50, mix_key(9))
    whole = p(np.arange(50))  # over 16 positions: the vectorised path
    assert whole[:8].tolist() == [30, 6, 9, 7, 29, 13, 24, 32]
    assert np.concatenate([p(np.arange(i, min(i + 5, 50))) for i in range(0, 50, 5)]).tolist() == whole.tolist()


def test_prepare_writes_the_tokenizer_stream_and_a_document_index(data, tmp_path):
    tok = load_tokenizer(data["tok"])
    m = json.loads((data["out"] / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["eos_id"] == 2 and len(m["shards"]) == 4 + 2  # 151 docs / 40, 50 / 40
    s = ShardSet(data["out"])
    expected, lengths = [], []
    for src in data["sources"]:
        for line in open(src.path):
            ids = tok.encode(json.loads(line)["text"])
            if ids:  # empty documents are skipped, as the packer does
                expected += [*ids, tok.eos_id]
                lengths.append(len(ids) + 1)
    assert s.read(0, s.n_tokens).tolist() == expected
    starts = np.concatenate([np.asarray(s.index(k))[:-1] + s.bounds[k] for k in range(len(s.records))])
    assert np.array_equal(np.diff(np.append(starts, s.n_tokens)), lengths)
    assert [(n, hi - lo) for n, lo, hi in s.source_ranges()] == [
        ("web", sum(lengths[:150])), ("code", sum(lengths[150:]))]
    assert m["sources"][0]["documents"] == 150 and m["sources"][0]["input_documents"] == 151
    # one process or two, and a vocabulary over 65536 ids (uint32): the same stream
    one = tmp_path / "one"
    prepare(data["sources"], one, tokenizer=data["tok"], workers=1, shard_docs=40, quiet=True)
    assert files_of(one) == files_of(data["out"])
    big = tmp_path / "big"
    prepare(data["sources"], big, tokenizer=word_tokenizer(tmp_path / "big.json", 70000), workers=1,
            shard_docs=40, quiet=True)
    assert ShardSet(big).dtype == np.uint32 and ShardSet(big).read(0, s.n_tokens).tolist() == expected


def test_interrupted_prepare_resumes_to_byte_identical_shards(data, tmp_path, monkeypatch, capsys):
    import kiln.data.prepare as prep

    out = tmp_path / "out"
    real, calls = prep.write_shard, []

    def dying(out_dir, *args, **kw):
        if len(calls) == 3:  # killed while writing the 4th shard: a partial temporary file is left
            (out_dir / ".shard-00003.bin.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        calls.append(1)
        return real(out_dir, *args, **kw)

    monkeypatch.setattr(prep, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(data["sources"], out, tokenizer=data["tok"], workers=1, shard_docs=40, quiet=True)
    monkeypatch.setattr(prep, "write_shard", real)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="did not finish here; run the same command again"):
        ShardSet(out)
    # verify and a training run said it was a folder of unreadable json, and "no manifest.json here"
    unfinished = f"kiln: error: {out}: `kiln data prepare` did not finish here; run the same command again to resume"
    assert cli(["data", "verify", str(out), "--batches", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[0] == unfinished
    assert cli(["train", "tiny", "--data.format", "shards", "--data.train", str(out), "--data.tokenizer", data["tok"],
                "--run.out_dir", str(tmp_path / "run"), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [unfinished]
    (out / "shard-00001.json").unlink()  # killed after the tokens were renamed, before the record
    args = ["data", "prepare", "--source", json.dumps({"path": data["sources"][0].path, "name": "web"}),
            "--source", json.dumps({"path": data["sources"][1].path, "name": "code"}), "--out", str(out),
            "--tokenizer", data["tok"], "--workers", "2", "--shard-docs", "40", "--quiet"]
    assert cli(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["shards"] == 6
    assert files_of(out) == files_of(data["out"])  # byte-identical, no temporary file left
    # another prepare there is refused, naming what differs (it said "other sources, tokenizer or --shard-docs")
    with pytest.raises(DataError, match=r"holds a prepare of other input \(--shard-docs 40, now 41\); pass another"):
        prepare(data["sources"], out, tokenizer=data["tok"], workers=1, shard_docs=41, quiet=True)
    grown = tmp_path / "a.jsonl"  # the same source, a line longer: rerunning "the same command" names the file
    grown.write_text(Path(data["sources"][0].path).read_text() + json.dumps({"text": "9999"}) + "\n")
    size = Path(data["sources"][0].path).stat().st_size
    with pytest.raises(DataError, match=rf"\(source 'web': a.jsonl was {size:,} bytes, now {grown.stat().st_size:,} "
                                        r"bytes\)"):
        prepare([SourceConfig(path=str(grown), name="web"), data["sources"][1]], out, tokenizer=data["tok"],
                workers=1, shard_docs=40, quiet=True)


def reference_row(tokens: np.ndarray, starts: set[int], block: int) -> Row:
    lo = block * T
    doc = np.cumsum([1 if p in starts and p > lo else 0 for p in range(lo, lo + T + 1)]).astype(np.int32)
    return Row(tokens=tokens[lo:lo + T + 1].astype(np.int64), doc_ids=doc)


def test_one_epoch_over_two_ranks_by_two_workers_reads_every_block_once(data):
    s = ShardSet(data["out"])
    tokens = s.read(0, s.n_tokens)
    starts = {int(p) for k in range(len(s.records)) for p in np.asarray(s.index(k))[:-1] + s.bounds[k]}
    nb = (s.n_tokens - 1) // T
    block_of = {tokens[b * T:(b + 1) * T].tobytes(): b for b in range(nb)}
    assert len(block_of) == nb  # inputs identify blocks
    W, B = 2, 3
    rounds = -(-nb // (W * B)) + 1
    by_pos: dict[int, int] = {}
    for r in range(W):
        ld = ShardLoader([SourceConfig(path=str(data["out"]))], load_tokenizer(data["tok"]), seq_len=T,
                         batch_size=B, seed=3, rank=r, world_size=W, num_workers=2)
        for k in range(rounds):
            batch = ld.next_batch()
            for j in range(B):
                b = block_of[batch.tokens[j].numpy().astype(tokens.dtype).tobytes()]
                ref = make_batch([reference_row(tokens, starts, b)])
                assert torch.equal(batch.tokens[j], ref.tokens[0]) and torch.equal(batch.targets[j], ref.targets[0])
                assert torch.equal(batch.doc_ids[j], ref.doc_ids[0])
                by_pos[k * W * B + r + j * W] = b
        ld.close()
    epoch0 = [by_pos[p] for p in range(nb)]
    assert sorted(epoch0) == list(range(nb))  # every block exactly once, across ranks and workers
    assert epoch0 != sorted(epoch0)  # shuffled
    assert (batch.targets == IGNORE).any()


def global_sequence(src, tok, *, world: int, batch: int, rounds: int, state=None, workers: int = 0):
    """Rows of `rounds` rounds, in global position order, and rank 0's state after them."""
    lds = [ShardLoader(src, tok, seq_len=T, batch_size=batch, seed=9, rank=r, world_size=world, num_workers=workers)
           for r in range(world)]
    for ld in lds:
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))
    rows = []
    for _ in range(rounds):
        bs = [ld.next_batch() for ld in lds]
        rows += [(bs[r].tokens[j], bs[r].targets[j], bs[r].doc_ids[j]) for j in range(batch) for r in range(world)]
    st = lds[0].state_dict()
    assert all(ld.state_dict()["cursor"] == st["cursor"] for ld in lds)  # the position is global
    for ld in lds:
        ld.close()
    return rows, st


def test_resume_is_exact_across_data_parallel_sizes(data, tmp_path):
    tok = load_tokenizer(data["tok"])
    web = tmp_path / "web"  # a second folder, weighted 3:1 against the first, so the mix is exercised too
    prepare([data["sources"][0]], web, tokenizer=data["tok"], workers=1, shard_docs=64, quiet=True)
    src = [SourceConfig(path=str(data["out"]), weight=1.0), SourceConfig(path=str(web), weight=3.0)]
    ref, _ = global_sequence(src, tok, world=1, batch=4, rounds=40)  # 160 samples: past one epoch of each
    part, st = global_sequence(src, tok, world=2, batch=2, rounds=10)  # 2 ranks ...
    rest, _ = global_sequence(src, tok, world=1, batch=4, rounds=30, state=st)  # ... resumed on 1
    assert len(part) + len(rest) == len(ref)
    assert all(all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(part + rest, ref))
    one, st = global_sequence(src, tok, world=1, batch=4, rounds=12)  # 1 rank ...
    four, _ = global_sequence(src, tok, world=4, batch=1, rounds=28, state=st, workers=2)  # ... on 4, 2 workers
    assert all(all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(one + four, ref))
    ld = ShardLoader(src, tok, seq_len=T, batch_size=4, seed=9)
    draws = ld.order.sources(np.arange(20000))
    assert abs(draws.mean() - 0.75) < 4 * (0.75 * 0.25 / 20000) ** 0.5  # weights within 4 sigma
    with pytest.raises(DataError, match="seed=9, this run has 10"):
        ShardLoader(src, tok, seq_len=T, batch_size=4, seed=10).load_state_dict(st)
    with pytest.raises(DataError, match="prepared with tokenizer .* the digest differs"):
        ShardLoader(src, load_tokenizer(word_tokenizer(tmp_path / "other.json", 40000)), seq_len=T, batch_size=4,
                    seed=9)


def test_validation_per_source_of_a_prepared_folder(data):
    tok = load_tokenizer(data["tok"])
    sets = shard_validation_sets(SourceConfig(path=str(data["out"])), tok, seq_len=T, batch_size=2, max_tokens=5 * T)
    assert list(sets) == ["web", "code"]
    s = ShardSet(data["out"])
    for (_, lo, _), batches in zip(s.source_ranges(), sets.values()):
        assert [tuple(b.tokens.shape) for b in batches] == [(2, T), (2, T), (1, T)]
        assert torch.cat([b.tokens.flatten() for b in batches]).tolist() == s.read(lo, 5 * T).tolist()


def test_inspect_and_verify_commands(data, tmp_path, capsys):
    out = str(data["out"])
    assert cli(["data", "inspect", out]) == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    s = ShardSet(out)
    assert (last["tokens"], last["documents"]) == (s.n_tokens, s.n_docs) == (s.n_tokens, 200)
    assert last["sources"]["code"]["documents"] == 50
    assert cli(["data", "verify", out, "--seq-len", str(T)]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["ok"] is True and "ranks" not in summary  # no simulated coverage: it checked kiln, not the data
    held_out = write_jsonl(tmp_path / "val.jsonl", [9000, 9001])
    assert cli(["data", "verify", out, "--seq-len", str(T), "--val", str(held_out)]) == 0
    leaky = write_jsonl(tmp_path / "leak.jsonl", [9000, 1003])  # 1003 is a training document
    assert cli(["data", "verify", out, "--seq-len", str(T), "--val", str(leaky)]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 validation documents" in err and err.count("\n") == 1
    assert cli(["data", "verify", data["sources"][0].path, "--seq-len", str(T), "--tokenizer", data["tok"]]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["documents"] == 151  # text source
    dup = tmp_path / "dup.jsonl"
    write_jsonl(dup, [1000, 1001, 1002, 1001])
    assert cli(["data", "verify", str(dup)]) == 1
    assert "documents 1 and 3 are identical" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    prepare([data["sources"][1]], corrupt, tokenizer=data["tok"], workers=1, shard_docs=64, quiet=True)
    raw = bytearray((corrupt / "shard-00000.bin").read_bytes())
    raw[10] ^= 1
    (corrupt / "shard-00000.bin").write_bytes(bytes(raw))
    assert cli(["data", "verify", str(corrupt), "--seq-len", str(T)]) == 1
    assert "sha256 differs" in capsys.readouterr().err


def test_bad_input_to_prepare_is_one_line_and_exit_2(data, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode() + "na\u00efve".encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text("")
    cases = [(str(tmp_path / "missing.jsonl"), "no such file"), (str(tmp_path / "none-*.jsonl"), "glob matches no"),
             (str(tmp_path / "empty.jsonl"), "empty source"), (str(tmp_path / "latin1.txt"), "not valid UTF-8"),
             (data["sources"][0].path, "no column 'body'"), (str(data["out"]), "already a prepared folder")]
    for path, hint in cases:
        extra = ["--text-column", "body"] if "body" in hint else []
        assert cli(["data", "prepare", "--source", path, "--out", str(tmp_path / "o"), "--tokenizer", data["tok"],
                    *extra]) == 2
        err = capsys.readouterr().err
        assert hint in err and err.count("\n") == 1, err
    assert cli(["data", "inspect", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts file descriptors in /proc")
def test_a_shard_set_keeps_at_most_max_open_files_mapped(data, monkeypatch):
    import kiln.data.shards as shards

    monkeypatch.setattr(shards, "MAX_OPEN", 3)
    raw = np.concatenate([np.fromfile(data["out"] / f"shard-{k:05d}.bin", dtype=np.uint16) for k in range(6)])
    before = open_fds()
    s = ShardSet(data["out"])  # 6 shards: 12 files
    for _ in range(2):
        for b in range((s.n_tokens - 1) // T):  # every block, twice: each file is mapped again after eviction
            assert s.row(b * T, T + 1).tokens.tolist() == raw[b * T:b * T + T + 1].tolist()
            assert len(s._open) <= 3 and open_fds() - before <= 3  # a mapping holds a descriptor


def test_tokenizer_digest_follows_the_ids_not_the_json_layout(tmp_path):
    from tokenizers import decoders

    from kiln.data.tokenizer import Tokenizer, tokenizer_digest

    def digest(model, added=()) -> tuple[str, str]:
        tk = tokenizers.Tokenizer(model)
        tk.add_special_tokens(["</s>", *added])
        tok = Tokenizer(tk, name="t", eos_token="</s>", bos_token=None)
        return tokenizer_digest(tok), tk.to_str()

    vocab = {"a": 0, "b": 1, "ab": 2}
    bpe, text = digest(models.BPE(vocab, [("a", "b")]))
    tk = tokenizers.Tokenizer.from_str(text)
    tk.decoder = decoders.BPEDecoder()  # another serialization, the same ids
    assert tk.to_str() != text and tokenizer_digest(Tokenizer(tk, name="t", eos_token="</s>", bos_token=None)) == bpe
    assert digest(models.BPE(vocab, [("a", "b")]))[0] == bpe  # stable
    assert digest(models.BPE(vocab, []))[0] != bpe  # merges
    assert digest(models.BPE({**vocab, "ba": 3}, [("a", "b")]))[0] != bpe  # vocabulary
    assert digest(models.BPE(vocab, [("a", "b")]), added=["<tool>"])[0] != bpe  # added tokens


def test_prepare_pins_the_tokenizer_path_and_verify_checks_its_digest(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    word_tokenizer(tmp_path / "tok.json", 32768)
    out = tmp_path / "prepared"
    prepare([data["sources"][1]], out, tokenizer="tok.json", workers=1, shard_docs=64, quiet=True)
    assert json.loads((out / "manifest.json").read_text())["tokenizer"] == str(tmp_path / "tok.json")  # absolute
    val = str(write_jsonl(tmp_path / "val.jsonl", [9000, 9001]))
    assert cli(["data", "verify", str(out), "--seq-len", str(T), "--val", val]) == 0
    capsys.readouterr()
    word_tokenizer(tmp_path / "tok.json", 40000)  # the file the folder names was replaced since
    assert cli(["data", "verify", str(out), "--seq-len", str(T), "--val", val]) == 1
    err = capsys.readouterr().err
    assert "tok.json' has changed since the folder was prepared" in err and err.count("\n") == 1, err


def test_verify_names_the_first_repeated_document_and_block(data, tmp_path, capsys):
    # repeated documents in a prepared folder: found as in a text source (a shard's blocks were all it checked)
    src = SourceConfig(path=str(write_jsonl(tmp_path / "rep.jsonl", [1000, 1001, 1002] * 5, lengths=[6] * 15)))
    out = tmp_path / "rep"
    prepare([src], out, tokenizer=data["tok"], workers=1, shard_docs=64, quiet=True)
    assert cli(["data", "verify", str(out), "--seq-len", str(T)]) == 1
    out_lines, err = capsys.readouterr()
    assert err.strip() == f"kiln data verify: FAILED: {out}: documents 0 and 3 hold identical tokens; deduplicate the sources"
    assert json.loads(out_lines.splitlines()[-1]) == {"ok": False, "error": err.strip().split("FAILED: ", 1)[1]}
    # distinct documents, one of them periodic: blocks at stride 16 repeat inside it
    (tmp_path / "periodic.jsonl").write_text(
        json.dumps({"text": " ".join(["1000 1001 1002", *["x"] * 13] * 4)}) + "\n" + json.dumps({"text": "1003 x"}) + "\n")
    out = tmp_path / "periodic"
    prepare([SourceConfig(path=str(tmp_path / "periodic.jsonl"))], out, tokenizer=data["tok"], workers=1, quiet=True)
    s = ShardSet(out)
    seen: dict[bytes, int] = {}
    for b in range((s.n_tokens - 1) // T):  # reference: the first block equal to an earlier one
        key = s.read(b * T, T + 1).tobytes()
        if key in seen:
            break
        seen[key] = b
    assert key in seen and cli(["data", "verify", str(out), "--seq-len", str(T)]) == 1
    assert f"blocks {seen[key]} and {b} (seq_len {T}) hold identical tokens" in capsys.readouterr().err


def test_prepare_refuses_what_it_would_ignore_and_checks_json_sources(data, tmp_path, capsys):
    path = data["sources"][1].path
    cases = [(json.dumps({"path": path, "weight": 2}), "does not use weight=2"),
             (json.dumps({"path": path, "streaming": True}), "does not use streaming=true"),
             (json.dumps({"name": "web"}), "data source 0: path is empty"),
             (json.dumps({"path": path, "skip": -1}), "skip and take must be >= 0")]
    for arg, hint in cases:
        assert cli(["data", "prepare", "--source", arg, "--out", str(tmp_path / "o"), "--tokenizer", data["tok"]]) == 2
        err = capsys.readouterr().err
        assert hint in err and err.count("\n") == 1, err
    assert "prepare one folder per source and weight them in data.train" in cli_err(
        ["data", "prepare", "--config", "mix-smollm", "--out", str(tmp_path / "o")], capsys)
    # --text-column on a .txt source was ignored; a column not there named the config key, not this flag
    txt = tmp_path / "a.txt"
    txt.write_text("one\ntwo\n")
    assert cli_err(["data", "prepare", "--source", str(txt), "--text-column", "body", "--out", str(tmp_path / "o"),
                    "--tokenizer", data["tok"]], capsys).strip() == (
        f"kiln: error: --text-column applies to jsonl, json and parquet sources; {txt} is plain text: drop it")
    err = cli_err(["data", "prepare", "--source", path, "--text-column", "body", "--out", str(tmp_path / "o"),
                   "--tokenizer", data["tok"]], capsys).strip()
    assert err.count("\n") == 0 and err.endswith("no column 'body' (columns: text, id); pass --text-column NAME (or "
                                                 "text_column in a --source JSON object)"), err
    assert not (tmp_path / "o").exists()


def cli_err(args: list[str], capsys) -> str:
    assert cli(args) == 2
    return capsys.readouterr().err


def test_a_prepared_folder_is_not_read_as_text(data, tmp_path, capsys):
    out = str(data["out"])
    for streaming in (False, True):
        with pytest.raises(DataError, match="written by `kiln data prepare` .*not text; train from it with --data"):
            PackedLoader([SourceConfig(path=out, streaming=streaming)], load_tokenizer(data["tok"]), seq_len=T,
                         batch_size=2, seed=0)
    err = cli_err(["data", "verify", data["sources"][1].path, "--val", out], capsys)
    assert "written by `kiln data prepare`" in err and "no column" not in err, err


def test_a_cut_or_missing_index_file_is_one_line_naming_it(data, tmp_path, capsys):
    """A truncated shard-*.idx.npy was a numpy ValueError traceback (inspect, verify, train), and a missing one
    was reported as its .bin file; the refused train run leaves no run folder."""
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(data["out"], cut)
    idx = sorted(cut.glob("shard-*.idx.npy"))[0]
    idx.write_bytes(idx.read_bytes()[:50])
    for argv in (["data", "inspect", str(cut)], ["data", "verify", str(cut), "--seq-len", str(T)],
                 ["train", "tiny", "--data.shards", str(cut), "--data.tokenizer", data["tok"], "--run.out_dir",
                  str(tmp_path / "run"), "--model.vocab_size", "32768", "--train.max_steps", "2"]):
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"kiln: error: {idx}: unreadable (") and err[0].endswith(
            "the file is truncated or replaced: prepare the folder again"), err
    assert not (tmp_path / "run").exists()
    idx.unlink()
    assert cli(["data", "inspect", str(cut)]) == 2
    assert capsys.readouterr().err.strip() == f"kiln: error: {idx}: shard file missing; prepare the folder again"


def test_a_shard_overwritten_with_ids_beyond_the_vocabulary_is_one_line_naming_it(data, tmp_path, capsys):
    """Token ids past the vocabulary (a shard overwritten in place: its size, so the manifest's byte counts, kept)
    were an IndexError traceback from the embedding; the refused run leaves no run folder."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data["out"], bad)
    for shard in sorted(bad.glob("shard-*.bin")):
        a = np.memmap(shard, dtype=np.uint16, mode="r+")
        a[::5] = 40000  # 32768 ids
        a.flush()
        del a
    assert cli(["train", "tiny", "--data.shards", str(bad), "--data.tokenizer", data["tok"], "--run.out_dir",
                str(tmp_path / "run"), "--model.vocab_size", "32768", "--train.max_steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kiln: error: {bad}/shard-") and err[0].endswith(
        f": token id 40000 >= the vocabulary's 32768; the shard is damaged: `kiln data verify {bad}` checks every "
        "shard, or prepare the folder again"), err
    assert not (tmp_path / "run").exists()


def test_dry_run_checks_prepared_folders_as_the_run_does(data, tmp_path):
    """`--dry-run` passed a data.shards folder that does not exist, one prepared with another tokenizer and a
    text file listed under data.format=shards; the run then refused each. Now the dry run does, in one line."""
    from conftest import run_kiln

    text = data["sources"][0].path
    cases = [
        (["--data.shards", str(tmp_path / "nothere")], f"{tmp_path / 'nothere'}: no such folder; prepare one with "
                                                        f"`kiln data prepare --source ... --out {tmp_path / 'nothere'}`"),
        (["--data.shards", str(data["out"])], f"{data['out']}: prepared with tokenizer '{data['tok']}' (digest "),
        (["--data.format", "shards", "--data.train", json.dumps([{"path": str(data["out"])}, {"path": text}])],
         f"{text}: data.format=shards needs folders written by `kiln data prepare` (no manifest.json here); run "
         f"`kiln data prepare --source {text} --out DIR` and pass DIR or set data.format=text"),
    ]
    for args, line in cases:
        res = run_kiln("train", "tiny", *args, "--run.out_dir", str(tmp_path / "run"), "--dry-run",
                       capture_output=True, text=True, timeout=300)
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(err) == 1 and err[0].startswith(f"kiln: error: {line}"), res.stderr[-2000:]
    ok = run_kiln("train", "tiny", "--data.shards", str(data["out"]), "--data.tokenizer", data["tok"],
                  "--run.out_dir", str(tmp_path / "run"), "--dry-run", capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_verify_ends_with_its_json_line_on_input_it_cannot_read(tmp_path, capsys):
    """data.md: the last line is JSON "also when it fails"; a path that is not there (exit 2) printed none."""
    missing = tmp_path / "nothing"
    assert cli(["data", "verify", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == {"ok": False, "error": f"{missing}: no such file or folder"}
    assert err.strip().splitlines() == [f"kiln: error: {missing}: no such file or folder"]


def test_inspect_on_a_text_file_says_it_is_one(data, capsys):
    """`kiln data inspect a.jsonl` said "no such folder" of a file that is there, and offered to prepare into a
    folder of the data file's own name."""
    from kiln.cli import main

    text = data["sources"][0].path
    assert main(["data", "inspect", text]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kiln: error: {text}: a file, not a prepared folder; prepare one from it with `kiln data prepare --source "
        f"{text} --out DIR` (`kiln data verify {text}` checks the text itself)")
