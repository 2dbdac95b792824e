"""`kiln tokenizer train`: a Mistral-v3-style BPE with byte fallback, trained deterministically, used by
training, `kiln data prepare`, export (transformers encodes and scores alike) and the chat template."""

from __future__ import annotations

import collections
import gzip
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_kiln
from kiln.config import Config, ModelConfig, SourceConfig
from kiln.data.sources import CORPUS_DIR
from kiln.data.tokenizer import load_tokenizer, tokenizer_digest
from kiln.data.tokenizer_train import BYTE_TOKENS, CONTROL_TOKENS, choose_alphabet, train_tokenizer
from kiln.errors import DataError
from kiln.model.loss import shared_rows
from kiln.train.preflight import check_tokenizer, unused_vocab_note

# runs of spaces, newlines, tabs, unicode (in and outside the alphabet), digits, control tokens as text
TEXTS = [
    "Of the liberty of",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "line one\nline two\n\n\nthree   spaces  and\ttabs\t\tend ",
    "code:\n    def f(x):\n        return x  # indented\n",
    "naive cafe -- na\u00efve caf\u00e9, \u00c6sop, \u65e5\u672c\u8a9e, emoji \U0001f600.",
    "In 2024, 12345 apples cost $3.50 (or 0.07 each).",
    "[INST] a question[/INST] an answer</s>",
    "<0x41> is not a byte token, <s> is BOS",
    "\n\nstarts with newlines",
    "  two leading spaces",
]


def run(*args: str, ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    res = run_kiln(*args, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert res.returncode == 0, f"kiln {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def last_json(res: subprocess.CompletedProcess) -> dict:
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 110 KB of the bundled validation split as jsonl, in 1.5 KB documents."""
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with gzip.open(CORPUS_DIR / "val.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"][:8000] for line in f]
    chunks = [d[i:i + 1500].strip() for d in docs for i in range(0, len(d), 1500)]
    path.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks if c))
    return path


def test_cli_trains_the_same_tokenizer_twice_and_transformers_encodes_alike(corpus, tmp_path):
    from transformers import AutoTokenizer

    a, b = tmp_path / "a", tmp_path / "b"
    first = run("tokenizer", "train", "--source", str(corpus), "--vocab-size", "500", "--out", str(a))
    assert "rounded up to 512" in first.stderr and f"--data.tokenizer {a} --model.vocab_size 512" in first.stderr
    run("tokenizer", "train", "--source", str(corpus), "--vocab-size", "500", "--out", str(b), "--quiet")
    # another process (another Rust hash seed): the same bytes
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    record = last_json(first)
    assert record["vocab_size"] == 512 and record["reserved"] == 0

    tok = load_tokenizer(str(a))
    assert (tok.vocab_size, tok.unk_token, tok.bos_id, tok.eos_id) == (512, "<unk>", 1, 2)  # Mistral v3's ids
    assert tokenizer_digest(tok) == record["digest"] == tokenizer_digest(load_tokenizer(str(b)))
    backend = tok.backend
    assert [backend.id_to_token(i) for i in range(len(CONTROL_TOKENS) + 256)] == [*CONTROL_TOKENS, *BYTE_TOKENS]
    assert backend.to_str().count('"type":"Metaspace"') == 1 and '"byte_fallback":true' in backend.to_str()

    hf = AutoTokenizer.from_pretrained(a)
    assert (len(hf), hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (512, 1, 2, 0)
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf(text).input_ids == ids  # add_special_tokens=True must not add BOS
        assert hf.decode(ids) == tok.decode(ids)
        # lossless through byte fallback, but for the one leading space the prefix "▁" takes (as Mistral v3)
        assert tok.decode(ids) == (text[1:] if text.startswith(" ") else text)
    inst = tok.encode(TEXTS[6])
    assert inst[0] == 3 and 4 in inst and inst[-1] == 2  # [INST], [/INST], </s>: single tokens
    assert backend.id_to_token(tok.encode("\u65e5")[-1]) == "<0xA5>"  # not in the alphabet: UTF-8 bytes
    assert tok.encode("12345")[-4:] == [backend.token_to_id(d) for d in "2345"]  # digits are pieces of their own

    # it compresses the text it learned from, and `kiln tokenizer stats` counts what kiln's encoder gives
    stats = last_json(run("tokenizer", "stats", "--tokenizer", str(a), "--source", str(corpus)))
    texts = [json.loads(line)["text"] for line in corpus.open()]
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    nbytes = sum(len(t.encode()) for t in texts)
    assert (stats["tokens"], stats["bytes"]) == (tokens, nbytes) and nbytes / tokens > 1.5  # 1.0: a token per character


def test_bad_input_is_one_line_and_writes_nothing(corpus, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "tok")
    cases = [
        (["--source", str(tmp_path / "missing.txt"), "--vocab-size", "512", "--out", out], "no such file or folder"),
        (["--source", "no-such-org/no-such-dataset", "--vocab-size", "512", "--out", out],
         "cannot load it as an HF dataset"),
        (["--source", "bundled:nope", "--vocab-size", "512", "--out", out], "use bundled:train or bundled:val"),
        (["--source", str(corpus), "--vocab-size", "300", "--out", out], "too small; the 5 control and 256 byte tokens take 261 ids"),
        (["--source", str(corpus), "--vocab-size", "100000000", "--out", out], "--vocab-size 100000000: too large; "),
        (["--source", str(corpus), "--vocab-size", "512", "--out", str(tmp_path / "afile" / "tok")],
         "is a file, not a folder"),
        (["--source", str(corpus), "--vocab-size", "512", "--out", str(tmp_path / "notes")],
         "folder is not empty; pass a new or empty --out"),
        (["--source", str(corpus), "--vocab-size", "512", "--multiple-of", "0", "--out", out], "--multiple-of"),
    ]
    for args, hint in cases:
        res = run("tokenizer", "train", *args, ok=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("kiln: error:"), res.stderr
        assert hint in lines[0], lines[0]
    assert not Path(out).exists() and (tmp_path / "notes" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "notes"]  # no temp folder left


def test_an_unwritable_out_is_one_line(corpus):
    probe = Path("/sys/kiln-write-probe")  # a read-only mount (as root, chmod does not stop writes)
    try:
        probe.mkdir()
        probe.rmdir()
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    res = run("tokenizer", "train", "--source", str(corpus), "--vocab-size", "512", "--out", str(probe), ok=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"kiln: error: --out {probe}: not writable (") and lines[0].endswith("pass another --out")


def test_a_small_corpus_fills_the_vocabulary_with_reserved_tokens(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("the cat sat on the mat. " * 50)
    record = train_tokenizer([SourceConfig(path=str(text))], tmp_path / "tok", vocab_size=512, quiet=True)
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.vocab_size == record["vocab_size"] == 512 and record["reserved"] > 0
    first = 512 - record["reserved"]
    assert tok.backend.id_to_token(first) == f"<reserved_{first}>" and tok.backend.id_to_token(511) == "<reserved_511>"
    pieces = [tok.backend.id_to_token(i) for i in tok.encode("the cat sat on the mat.")]
    assert pieces == ["\u2581the", "\u2581cat", "\u2581sat", "\u2581on", "\u2581the", "\u2581mat", "."]  # every word
    assert tok.decode(tok.encode(TEXTS[4])) == TEXTS[4]
    # an empty --out folder is taken; with --multiple-of 1 the size is exact
    (tmp_path / "empty").mkdir()
    record = train_tokenizer([SourceConfig(path=str(text))], tmp_path / "empty", vocab_size=600, multiple_of=1,
                             quiet=True)
    assert load_tokenizer(str(tmp_path / "empty")).vocab_size == record["vocab_size"] == 600


def test_an_existing_tokenizer_is_never_replaced(tmp_path):
    """Runs and prepared shards made with a tokenizer check its digest: training another into its folder
    would strand them, so --out must be new or empty (as for `kiln data prepare` and `kiln import`)."""
    text, out = tmp_path / "tiny.txt", tmp_path / "tok"
    text.write_text("the cat sat on the mat. " * 50)
    run("tokenizer", "train", "--source", str(text), "--vocab-size", "512", "--out", str(out), "--quiet")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    text.write_text("THE DOG SAT ON THE LOG. " * 50)
    res = run("tokenizer", "train", "--source", str(text), "--vocab-size", "512", "--out", str(out), ok=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0] == (f"kiln: error: --out {out}: already holds a tokenizer (runs and shards made with it check "
                        "its digest); pass another --out, or remove that folder yourself to retrain in its place")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt", "tok"]  # no temp folder left


def test_a_trained_tokenizer_missing_its_tokenizer_json_is_not_called_a_cache(tmp_path, capsys):
    """A `kiln tokenizer train` folder whose tokenizer.json is gone or cut was told "delete that folder to rebuild
    it", advice for kiln's cache that would lose the user's own tokenizer."""
    from kiln.cli import main

    text, tok = tmp_path / "tiny.txt", tmp_path / "tok"
    text.write_text("the cat sat on the mat. " * 50)
    train_tokenizer([SourceConfig(path=str(text))], tok, vocab_size=512, quiet=True)
    json_file = tok / "tokenizer.json"
    json_file.write_text(json_file.read_text()[:500])
    assert main(["tokenizer", "stats", "--tokenizer", str(tok), "--source", str(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kiln: error: tokenizer '{tok}': {tok}: unreadable (") and err[0].endswith(
        "; restore the folder, or train it again with `kiln tokenizer train`"), err
    json_file.unlink()
    assert main(["tokenizer", "stats", "--tokenizer", str(tok), "--source", str(text)]) == 2
    assert capsys.readouterr().err.strip() == (f"kiln: error: tokenizer '{tok}': {json_file}: missing; restore the "
                                               "folder, or train it again with `kiln tokenizer train`")
    fake = tmp_path / "fake.json"  # JSON, not a tokenizer: the reader's "expected ','" read as a syntax error
    fake.write_text('{"a": 1}')
    assert main(["tokenizer", "stats", "--tokenizer", str(fake), "--source", str(text)]) == 2
    assert f"cannot load {fake}: valid JSON but not a tokenizer.json as HF tokenizers writes it (" in \
        capsys.readouterr().err


def test_several_sources_and_a_stream_train_the_same_tokenizer(corpus, tmp_path):
    lines = corpus.read_text().splitlines(keepends=True)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(lines[:40]))
    second.write_text("".join(lines[40:]))
    both = train_tokenizer([SourceConfig(path=str(first)), SourceConfig(path=str(second))], tmp_path / "two",
                           vocab_size=512, quiet=True)
    one = train_tokenizer([SourceConfig(path=str(corpus))], tmp_path / "one", vocab_size=512, quiet=True)
    stream = train_tokenizer([SourceConfig(path=str(corpus), streaming=True)], tmp_path / "stream", vocab_size=512,
                             quiet=True)
    assert both["documents"] == one["documents"] == stream["documents"] == len(lines)
    tokenizer_json = {(tmp_path / n / "tokenizer.json").read_bytes() for n in ("two", "one", "stream")}
    assert len(tokenizer_json) == 1  # the same documents, whatever the files or the reader
    head = train_tokenizer([SourceConfig(path=str(corpus), take=10)], tmp_path / "head", vocab_size=512, quiet=True)
    assert head["documents"] == 10 and head["digest"] != one["digest"]
    with pytest.raises(DataError, match=r"weight=2 has no effect; balance sources with take") as e:
        train_tokenizer([SourceConfig(path=str(corpus), weight=2.0)], tmp_path / "w", vocab_size=512, quiet=True)
    assert "\n" not in str(e.value) and not (tmp_path / "w").exists()


def test_alphabet_covers_the_text_and_ascii_and_is_deterministic():
    counts = collections.Counter({"a": 10_000, "b": 10_000, " ": 5000, "\u00e9": 20, "\u65e5": 1, "\u00df": 20})
    alphabet = choose_alphabet(counts, coverage=0.9995, limit=1000)
    assert "\u65e5" not in alphabet and "\u00e9" in alphabet and "\u00df" in alphabet  # 99.95% of the characters
    assert {"\u2581", "\n", "\t", "~", "0"} <= set(alphabet) and " " not in alphabet  # spaces are "▁" to BPE
    assert alphabet == sorted(alphabet)
    small = choose_alphabet(counts, coverage=0.9995, limit=3)
    assert small == sorted(["a", "b", "\u2581"])  # the most frequent; ties by code point


def test_a_model_vocab_that_does_not_fit_the_tokenizer_is_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 50)
    train_tokenizer([SourceConfig(path=str(text))], tmp_path / "tok", vocab_size=576, quiet=True)
    tok = load_tokenizer(str(tmp_path / "tok"))
    cfg = Config(model=ModelConfig(vocab_size=384, d_model=64))
    cfg.data.tokenizer = str(tmp_path / "tok")
    with pytest.raises(DataError, match="has 576 ids but model.vocab_size is 384; set --model.vocab_size 576"):
        check_tokenizer(tok, cfg, where="config")
    cfg.model.vocab_size = 32768
    note = unused_vocab_note(tok, cfg)
    assert note == (f"warning: model.vocab_size is 32768 but tokenizer '{cfg.data.tokenizer}' has 576 ids, so 32192 "
                    "embedding/head rows (2,060,288 parameters) are never used; set --model.vocab_size 576")
    cfg.model.vocab_size = 640  # padding up to a multiple of 128 is not worth a warning
    assert unused_vocab_note(tok, cfg) is None


SMALL_MODEL = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--model.n_kv_heads", "1",
               "--model.ffn_dim", "64", "--train.seq_len", "64", "--train.micro_batch_size", "2",
               "--train.global_batch_size", "4", "--train.log_every", "1", "--train.eval_tokens", "256",
               "--train.sample_tokens", "0", "--optim.warmup_steps", "1"]


@pytest.mark.slow
def test_trained_tokenizer_through_prepare_train_export_transformers_and_sft(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.data.shards import ShardSet
    from kiln.posttrain.chat import ChatFormat
    from kiln.train.checkpoint import load_for_inference

    tok_dir, shards, run_dir, hf_dir = (tmp_path / n for n in ("tok", "shards", "run", "hf"))
    vocab = last_json(run("tokenizer", "train", "--source", str(corpus), "--vocab-size", "512", "--out",
                          str(tok_dir), "--quiet"))["vocab_size"]
    tok = load_tokenizer(str(tok_dir))

    # kiln data prepare shards with it: every document's ids, then EOS
    run("data", "prepare", "--source", str(corpus), "--tokenizer", str(tok_dir), "--out", str(shards),
        "--workers", "1", "--quiet")
    texts = [json.loads(line)["text"] for line in corpus.open()]
    expected = [i for t in texts for i in [*tok.encode(t), tok.eos_id]]
    assert ShardSet(shards).read(0, len(expected)).tolist() == expected

    # train on those shards (the manifest's tokenizer digest must match --data.tokenizer), then export
    res = run("train", "tiny", "--run.out_dir", str(run_dir), "--data.shards", str(shards), "--data.tokenizer",
              str(tok_dir), "--model.vocab_size", str(vocab), "--data.val", json.dumps([{"path": str(corpus)}]),
              "--train.max_steps", "3", "--train.eval_every", "3", "--train.save_every", "3", *SMALL_MODEL)
    assert "warning: model.vocab_size" not in res.stderr
    run("export", "--checkpoint", str(run_dir), "--out", str(hf_dir))

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    assert [hf_tok(t).input_ids for t in TEXTS] == tok.encode_batch(TEXTS)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model, cfg, _ = load_for_inference(run_dir, device="cpu")
    assert cfg.data.tokenizer == str(tok_dir) and hf.config.vocab_size == vocab
    x = torch.tensor([[i for t in TEXTS for i in tok.encode(t)][:64]])
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-5

    # the chat template: the exported tokenizer renders and encodes conversations exactly as kiln trains them
    chats = [[{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
             for a in range(4) for b in range(4)]
    fmt = ChatFormat(tok)
    for msgs in chats[:3]:
        enc = fmt.encode(msgs)
        assert hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=False) == enc.ids.tolist()
        assert enc.ids[0] == 3 and 4 in enc.ids.tolist() and enc.ids[-1] == 2 and enc.mask[-1]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    res = run("sft", "--checkpoint", str(run_dir), "--data", str(data), "--run.out_dir", str(tmp_path / "sft"),
              "--train.max_steps", "2", "--train.seq_len", "64", "--train.micro_batch_size", "2",
              "--train.global_batch_size", "2", "--train.sample_tokens", "0", "--train.log_every", "1")
    assert "chat template 'kiln'" in res.stdout
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)

    # the folder removed and retrained in place (same size, other text): every checkpoint recorded the digest of
    # the tokenizer it trained with, so inference, a stage from it and a resume refuse the new one
    upper = tmp_path / "upper.jsonl"
    upper.write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in texts))
    shutil.rmtree(tok_dir)
    run("tokenizer", "train", "--source", str(upper), "--vocab-size", "512", "--out", str(tok_dir), "--quiet")
    for args in (("generate", "--checkpoint", str(run_dir), "--prompt", "hi"),
                 ("sft", "--checkpoint", str(run_dir), "--data", str(data), "--run.out_dir", str(tmp_path / "sft2")),
                 ("train", "tiny", "--run.out_dir", str(run_dir), "--data.shards", str(shards), "--data.tokenizer",
                  str(tok_dir), "--model.vocab_size", str(vocab), "--train.max_steps", "4", *SMALL_MODEL)):
        bad = run(*args, ok=False)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        assert "(retrained or edited since); restore the tokenizer it was trained with" in bad.stderr, bad.stderr
    assert not (tmp_path / "sft2").exists()


def test_the_shipped_bundled_4k_is_what_kiln_tokenizer_train_makes_and_trains(tmp_path):
    """src/kiln/data/tokenizers/bundled-4k is reproducible from the bundled corpus by the command its
    kiln_tokenizer.json records, and `--data.tokenizer bundled-4k` trains and evaluates with it."""
    shipped = load_tokenizer("bundled-4k")
    assert shipped.vocab_size == 4096
    meta = json.loads((Path(CORPUS_DIR).parent / "tokenizers" / "bundled-4k" / "kiln_tokenizer.json").read_text())
    assert meta["sources"] == ["bundled:train"] and meta["vocab_size"] == 4096
    res = run("tokenizer", "train", "--source", "bundled:train", "--vocab-size", "4096", "--out", str(tmp_path / "t"))
    assert last_json(res)["digest"] == meta["digest"] == tokenizer_digest(shipped)
    text = "It is a truth universally acknowledged"
    assert shipped.decode(shipped.encode(text)) == text
    assert "1.84M parameters" in train_demo(tmp_path, "--data.tokenizer", "bundled-4k", "--model.vocab_size", "4096")


def train_demo(tmp_path: Path, *overrides: str) -> str:
    """`kiln train demo` for 6 steps with 3 evals, which must improve; its stdout."""
    res = run("train", "demo", *overrides, "--run.out_dir", str(tmp_path / "run"), "--train.time_budget", "",
              "--train.max_steps", "6", "--train.eval_every", "3", "--train.sample_tokens", "4",
              "--train.eval_tokens", "2048")
    assert "sample:" in res.stdout
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in evals if r["kind"] == "eval"]
    assert len(evals) == 3 and evals[-1] < evals[0]
    return res.stdout


def test_demo_as_make_train_runs_it_trains_and_exports_its_context(tmp_path):
    """`kiln train demo` (what `make train` runs, shortened): Mistral v3's vocabulary, the untied 9.2M-parameter
    model, evals that improve; its export declares the 256-token context it trains on, so no note about one.
    Its head started at zero: the rows of the ids six steps never targeted left zero as one vector (the loss
    computed them once), and the export keeps them so."""
    out = train_demo(tmp_path)
    assert "9.18M parameters" in out and "unseen_smoothing" not in out  # it acts: no line saying it does not
    res = run("export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["max_position_embeddings"], config["vocab_size"], config["tie_word_embeddings"]) == (256, 32768, False)
    assert "max_seq_len" not in res.stderr
    head = load_file(str(tmp_path / "hf" / "model.safetensors"))["lm_head.weight"].float()
    group = shared_rows(head)
    assert 25_000 < group.size < 32_768 - 1_000  # 6 x 2048 targets reach a few thousand ids
    assert head[group.rep].abs().sum() > 0  # trained as one row, away from zero
    controls = torch.arange(10, 700)  # Mistral v3's [control_N] ids, which no text encodes to
    assert bool((group.column[controls] == group.own.numel()).all())  # all in the group


def test_demo_with_a_tied_head_says_its_unseen_smoothing_does_nothing(tmp_path):
    """demo's train.unseen_smoothing needs the untied zero-init head's equal rows: with a tied head the run trains
    (it is not an error over a key the user did not set) and says, once, that the smoothing does nothing."""
    res = run("train", "demo", "--model.tie_embeddings", "true", "--run.out_dir", str(tmp_path / "run"),
              "--train.time_budget", "", "--train.max_steps", "1", "--train.eval_every", "100",
              "--train.sample_tokens", "0", "--train.eval_tokens", "2048")
    assert res.stdout.count("train.unseen_smoothing 0.03 does nothing here: the head is tied to the embedding") == 1


@pytest.mark.parametrize("command", [["tokenizer", "stats"], ["data", "prepare", "--out", "OUT"]])
def test_a_folder_that_is_no_tokenizer_is_named_as_the_flag_typed(tmp_path, capsys, command):
    """They said "point data.tokenizer at a folder ...", a key these commands do not read when --tokenizer is
    given. (In-process through kiln.cli.main: refused while the tokenizer loads, before anything is written.)"""
    from kiln.cli import main

    (tmp_path / "empty").mkdir()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "hello there"}) + "\n")
    command = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main([*command, "--tokenizer", str(tmp_path / "empty"), "--source", str(corpus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("point --tokenizer at a folder with tokenizer.json or tokenizer.model"), err
    assert not (tmp_path / "out").exists()
