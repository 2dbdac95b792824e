"""GGUF export without llama.cpp: the written file read back with gguf.GGUFReader (metadata, vocabulary,
tensor names, shapes and values against the checkpoint), the RoPE permutation against llama.cpp's
NORM rope written out here, dtypes, refusals, and the `kiln export --format gguf` command.

llama.cpp itself loads and runs the files in tests/test_gguf_llama_cpp.py (marked external)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from conftest import run_kiln
from kiln.config import Config, ModelConfig, TrainConfig
from kiln.convert.gguf import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    export_gguf,
    gguf_architecture,
    gguf_chat_template,
    gguf_tensors,
    gguf_vocab,
    half_split_to_interleaved,
    write_gguf,
)
from kiln.data.tokenizer import Tokenizer, load_tokenizer
from kiln.errors import DataError
from kiln.export import ExportError
from kiln.model import Transformer, build_model
from kiln.model.layers import RotaryEmbedding, apply_rope

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'kiln[gguf]')")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=32768, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=128,
                norm_eps=1e-6, init_std=0.1, rope_theta=5000.0)
    return ModelConfig(**{**base, **kw})


def kiln_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A built model with non-trivial norm weights, so a misplaced norm cannot hide."""
    model = build_model(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("mistral-v3")


def read(path) -> tuple[dict, dict[str, tuple[str, list[int], np.ndarray]]]:
    """(metadata key -> value, tensor name -> (GGML type name, ggml shape ne, fp32 array in PyTorch layout))."""
    r = gguf.GGUFReader(str(path))
    meta = {name: f.contents() for name, f in r.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = (t.tensor_type.name, [int(x) for x in t.shape], data.reshape(tuple(reversed(t.shape))))
    return meta, tensors


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse permutation, written independently: row 2i of a head is x_i, row 2i+1 is y_i."""
    hd = w.shape[0] // n_heads
    heads = w.reshape(n_heads, hd, -1)
    return np.concatenate([heads[:, 0::2], heads[:, 1::2]], axis=1).reshape(w.shape)


CASES = {
    "llama": (tiny(), "llama"),
    "llama-untied-mha": (tiny(tie_embeddings=False, n_kv_heads=4), "llama"),
    "llama-head-dim": (tiny(d_model=72, head_dim=32, n_heads=4, n_kv_heads=1), "llama"),
    "llama-embed-scale": (tiny(embed_scale=True), "llama"),
    "qwen3": (tiny(qk_norm=True, tie_embeddings=False), "qwen3"),
    "smollm3": (tiny(nope_every=4), "smollm3"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_file_reads_back_with_metadata_and_weights(name, tok, tmp_path):
    cfg, arch = CASES[name]
    assert gguf_architecture(cfg) == arch
    model = kiln_model(cfg)
    path = write_gguf(tmp_path / "m.gguf", model, cfg, tok, name="tiny-test")
    meta, tensors = read(path)
    assert meta["general.architecture"] == arch and meta["general.name"] == "tiny-test"
    expect = {"context_length": 128, "embedding_length": cfg.d_model, "block_count": 4, "feed_forward_length": 96,
              "attention.head_count": cfg.n_heads, "attention.head_count_kv": cfg.n_kv_heads,
              "attention.key_length": cfg.hd, "attention.value_length": cfg.hd, "rope.dimension_count": cfg.hd,
              "rope.freq_base": 5000.0, "vocab_size": 32768}
    assert {k: meta[f"{arch}.{k}"] for k in expect} == expect
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    want = {"token_embd.weight": state["tok_emb.weight"], "output_norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        want["output.weight"] = state["head.weight"]
    if cfg.embed_scale:  # folded: the table scaled by sqrt(d); a tied head's norm divided by it
        want["token_embd.weight"] = want["token_embd.weight"] * np.float32(8.0)
        want["output_norm.weight"] = want["output_norm.weight"] / 8.0
    kiln_names = {"attn_norm": "attn_norm", "attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv",
                  "attn_output": "attn.wo", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.w_gate", "ffn_up": "mlp.w_up",
                  "ffn_down": "mlp.w_down"}
    if cfg.qk_norm:
        kiln_names |= {"attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm"}
    for i in range(cfg.n_layers):
        for g, k in kiln_names.items():
            want[f"blk.{i}.{g}.weight"] = state[f"layers.{i}.{k}.weight"]
    assert set(tensors) == set(want)
    for tname, (ttype, ne, data) in tensors.items():
        assert ttype == "F32" and ne == list(reversed(want[tname].shape)), tname
        if arch != "qwen3" and (".attn_q." in tname or ".attn_k." in tname):  # NORM rope: rows interleaved
            heads = cfg.n_heads if ".attn_q." in tname else cfg.n_kv_heads
            assert not np.array_equal(data, want[tname])
            data = interleaved_to_half_split(data, heads)
        np.testing.assert_array_equal(data, want[tname], err_msg=tname)


def ggml_rope_norm(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's NORM rope (ggml_rope_ext, mode 0): adjacent pairs (x[2i], x[2i+1]) rotated by pos * theta^(-2i/hd).
    x: (T, H, hd), pos: (T,)."""
    hd = x.shape[-1]
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos[:, None].double() * freq  # (T, hd/2)
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty(x.shape, dtype=torch.float64)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def test_rope_permutation_gives_kiln_attention_scores_under_ggml_norm_rope():
    """q.k after kiln's half-split RoPE equals q.k after llama.cpp's NORM rope on the permuted projections."""
    H, Hkv, hd, d, T, theta = 4, 2, 16, 32, 9, 10000.0
    g = torch.Generator().manual_seed(0)
    wq, wk, x = torch.randn(H * hd, d, generator=g), torch.randn(Hkv * hd, d, generator=g), torch.randn(T, d, generator=g)
    rope = RotaryEmbedding(hd, theta)
    rope.reset_parameters()
    cos, sin = rope(torch.arange(T)[None])
    q = apply_rope((x @ wq.T).view(1, T, H, hd), cos, sin)[0].double()
    k = apply_rope((x @ wk.T).view(1, T, Hkv, hd), cos, sin)[0].double()
    pos = torch.arange(T)
    q2 = ggml_rope_norm((x @ half_split_to_interleaved(wq, H).T).view(T, H, hd), pos, theta)
    k2 = ggml_rope_norm((x @ half_split_to_interleaved(wk, Hkv).T).view(T, Hkv, hd), pos, theta)
    rep = H // Hkv
    s1 = torch.einsum("thd,shd->hts", q, k.repeat_interleave(rep, dim=1))
    s2 = torch.einsum("thd,shd->hts", q2, k2.repeat_interleave(rep, dim=1))
    assert (s1 - s2).abs().max().item() < 1e-4
    # and without the permutation the scores are wrong: the test can fail
    q3 = ggml_rope_norm((x @ wq.T).view(T, H, hd), pos, theta)
    k3 = ggml_rope_norm((x @ wk.T).view(T, Hkv, hd), pos, theta)
    s3 = torch.einsum("thd,shd->hts", q3, k3.repeat_interleave(rep, dim=1))
    assert (s1 - s3).abs().max().item() > 1e-2


def test_mistral_vocab_is_kilns_with_types_and_merge_scores(tok, tmp_path):
    cfg = tiny(n_layers=1)
    meta, _ = read(write_gguf(tmp_path / "m.gguf", kiln_model(cfg), cfg, tok))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    scores = meta["tokenizer.ggml.scores"]
    assert meta["tokenizer.ggml.model"] == "llama" and len(tokens) == 32768
    assert tokens == [tok.backend.id_to_token(i) for i in range(32768)]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.unknown_token_id"] == 0
    assert meta["tokenizer.ggml.add_bos_token"] is False  # kiln never puts BOS before a text
    assert meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    assert types[0] == UNKNOWN and types[1] == types[2] == types[3] == CONTROL  # <unk> <s> </s> [INST]
    assert types.count(BYTE) == 256 and tokens[types.index(BYTE)] == "<0x00>"
    assert types.count(USER_DEFINED) == sum(not t.special for t in tok.backend.get_added_tokens_decoder().values())
    assert types.count(UNUSED) == 0
    # the merge order is the score order: "▁t" (an early merge) outscores "▁the", a later one
    ids = tok.backend.token_to_id
    assert scores[ids("\u2581t")] > scores[ids("\u2581the")] > scores[ids("\u2581truth")]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Emma?"},
        {"role": "assistant", "content": "Jane Austen."}, {"role": "user", "content": " And Persuasion?"}]


def test_kiln_chat_template_leaves_out_the_space_llama_cpp_adds_after_control_tokens(tok):
    import dataclasses

    from kiln.posttrain.chat import KILN_TEMPLATE, ChatFormat

    v = gguf_vocab(tok, n_vocab=32768)
    adapted = gguf_chat_template(KILN_TEMPLATE, v)
    kiln_text = ChatFormat(tok).render(CHAT, add_generation_prompt=True)
    text = ChatFormat(tok, template=adapted).render(CHAT, add_generation_prompt=True)
    assert kiln_text == "[INST] Be brief.\n\nWho wrote Emma?[/INST] Jane Austen.</s>[INST]  And Persuasion?[/INST]"
    assert text == "[INST]Be brief.\n\nWho wrote Emma?[/INST]Jane Austen.</s>[INST] And Persuasion?[/INST]"
    assert gguf_chat_template("{{ messages }}", v) == "{{ messages }}"  # another template: as it is
    plain = dataclasses.replace(v, types=[t if x not in ("[INST]", "[/INST]") else 1 for x, t in zip(v.tokens, v.types)])
    assert gguf_chat_template(KILN_TEMPLATE, plain) == KILN_TEMPLATE  # [INST] as plain text: no space added


def test_vocab_is_padded_to_the_model_rows(tok):
    v = gguf_vocab(tok, n_vocab=32800)
    assert len(v.tokens) == len(v.types) == len(v.scores) == 32800
    assert v.tokens[32768:] == [f"[PAD{i}]" for i in range(32768, 32800)] and set(v.types[32768:]) == {UNUSED}
    with pytest.raises(DataError, match="32768 ids but model.vocab_size is 1000"):
        gguf_vocab(tok, n_vocab=1000)


def test_bytelevel_bpe_is_written_as_gpt2_with_merges(tmp_path):
    from kiln.data.tokenizer import train_bpe

    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 50)
    bpe = train_bpe([text], vocab_size=300, out_dir=tmp_path / "bpe")
    v = gguf_vocab(bpe, n_vocab=320)
    assert (v.model, v.pre, v.bos_id, v.eos_id) == ("gpt2", "gpt-2", 0, 1)
    assert v.types[:2] == [CONTROL, CONTROL] and v.types[2] == NORMAL and v.types[300:] == [UNUSED] * 20
    merges = [list(m) for m in __import__("json").loads(bpe.backend.to_str())["model"]["merges"]]
    assert v.merges == [f"{a} {b}" for a, b in merges] and v.merges


@pytest.mark.parametrize("form,prefix", [("first", True), ("always", True), ("never", False), ("legacy", True)])
def test_sentencepiece_style_forms(form, prefix):
    """Metaspace with each prepend scheme, and the older HF Llama form (a Prepend + Replace normalizer)."""
    import tokenizers
    from tokenizers import models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x41>": 3, "\u2581": 4, "a": 5, "\u2581a": 6}
    tk = tokenizers.Tokenizer(models.BPE(vocab, [("\u2581", "a")], byte_fallback=True, unk_token="<unk>"))
    if form == "legacy":
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=form)
    v = gguf_vocab(Tokenizer(tk, name=form, eos_token="</s>", bos_token="<s>", unk_token="<unk>"), n_vocab=8)
    assert (v.model, v.add_space_prefix, v.unk_id) == ("llama", prefix, 0)
    assert v.types[:7] == [UNKNOWN, NORMAL, NORMAL, BYTE, NORMAL, NORMAL, NORMAL] and v.types[7] == UNUSED
    assert v.scores[6] == 0.0 and v.scores[5] < v.scores[6]  # "_a" is merge 0; "a" no merge makes


def test_unsupported_tokenizer_is_refused(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tk = tokenizers.Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ExportError, match="WordLevel model, pre-tokenizer Whitespace.*has no llama.cpp equivalent .*; export this model with --format hf$"):
        gguf_vocab(Tokenizer(tk, name="words", eos_token="</s>", bos_token=None), n_vocab=2)


@pytest.mark.parametrize("dtype,ttype,tol", [("f16", "F16", 1e-3), ("bf16", "BF16", 8e-3), ("q8_0", "Q8_0", 2e-2)])
def test_dtypes(dtype, ttype, tol, tok, tmp_path):
    cfg = tiny(n_layers=1, ffn_dim=80)  # ffn_down rows of 80: not whole q8_0 blocks, written as f16
    model = kiln_model(cfg)
    meta, tensors = read(write_gguf(tmp_path / "m.gguf", model, cfg, tok, dtype=dtype))
    file_type = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[dtype]
    assert meta["general.file_type"] == gguf.LlamaFileType[file_type]
    ref = {k: v.numpy() for k, v in gguf_tensors(model, cfg).items()}
    for name, (t, _, data) in tensors.items():
        if ref[name].ndim == 1:
            assert t == "F32"
            np.testing.assert_array_equal(data, ref[name])
            continue
        assert t == ("F16" if name == "blk.0.ffn_down.weight" and dtype == "q8_0" else ttype), name
        err = np.abs(data - ref[name]).max() / np.abs(ref[name]).max()
        assert 0 < err < tol, (name, err)


# ---------------------------------------------------------------------------------------------
# Refusals, and the command line


def write_checkpoint(root, model_cfg: ModelConfig, *, tokenizer: str = "mistral-v3"):
    from kiln.train.checkpoint import save_checkpoint

    cfg = Config(model=model_cfg, train=TrainConfig(seq_len=64))
    cfg.data.tokenizer = tokenizer
    return save_checkpoint(root / "run" / "checkpoints", 3, model=kiln_model(model_cfg), cfg=cfg,
                           train_state={}, meta={})


@pytest.mark.parametrize("kw,match", [
    (dict(residual="deepnorm", init="deepnet"), "model.residual=deepnorm cannot be written as GGUF"),
    (dict(nope_every=2), "model.nope_every=2 cannot be written as GGUF: llama.cpp's smollm3 skips RoPE on every 4th"),
    (dict(nope_every=4, qk_norm=True), "with model.qk_norm=true cannot be written as GGUF"),
])
def test_unrepresentable_architectures_are_refused(kw, match):
    with pytest.raises(ExportError, match=match):
        gguf_architecture(tiny(**kw))


def test_nope_every_beyond_the_depth_is_plain_llama():
    assert gguf_architecture(tiny(nope_every=8)) == "llama"  # no layer skips RoPE


def test_export_overwrites_only_gguf_files(tmp_path):
    write_checkpoint(tmp_path, tiny(n_layers=1))
    out = export_gguf(tmp_path / "run", tmp_path / "m.gguf")
    first = out.read_bytes()
    export_gguf(tmp_path / "run", out, dtype="q8_0")  # a previous GGUF is replaced
    assert out.read_bytes()[:4] == b"GGUF" and len(out.read_bytes()) < len(first)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    meta, _ = read(out)
    assert meta["kiln.checkpoint"].endswith("step_3") and meta["tokenizer.chat_template"].startswith("{%-")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ExportError, match="exists and is not a GGUF file"):
        export_gguf(tmp_path / "run", notes)
    assert notes.read_text() == "mine"


def test_cli_refuses_to_overwrite_a_gguf_file_kiln_did_not_write(tmp_path):
    """A downloaded model.gguf at --out is the user's: refused in one line and left as it was (a GGUF file an
    earlier export wrote, which carries kiln.version, is replaced: test_export_overwrites_only_gguf_files)."""
    write_checkpoint(tmp_path, tiny(n_layers=1))
    theirs = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(str(theirs), "llama")
    w.add_name("someone else's model")
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = theirs.read_bytes()
    res = kiln("export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out", str(theirs))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0] == (f"kiln: error: {theirs}: a GGUF file kiln did not write (no kiln.version key); choose another "
                        "--out, or remove it yourself")
    assert theirs.read_bytes() == before


def kiln(*args: str) -> subprocess.CompletedProcess:
    return run_kiln(*args, capture_output=True, text=True, timeout=300)


def test_cli_exports_gguf(tmp_path):
    write_checkpoint(tmp_path, tiny(n_layers=2, qk_norm=True))
    res = kiln("export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
               "--dtype", "f16")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"exported to {tmp_path / 'm.gguf'}: llama-cli -m {tmp_path / 'm.gguf'}"
    meta, tensors = read(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "qwen3" and tensors["blk.1.attn_q.weight"][0] == "F16"


@pytest.mark.parametrize("case", ["deepnorm", "dtype", "folder", "new-folder/", "under-a-file", "proc"])
def test_cli_bad_input_is_one_line(case, tmp_path):
    model = tiny(n_layers=1, residual="deepnorm", init="deepnet") if case == "deepnorm" else tiny(n_layers=1)
    write_checkpoint(tmp_path, model)
    (tmp_path / "a_file").write_text("x")
    out = {"folder": tmp_path, "under-a-file": tmp_path / "a_file" / "m.gguf", "proc": "/proc/kiln-test.gguf",
           "new-folder/": f"{tmp_path / 'new'}/"}.get(case, tmp_path / "m.gguf")  # a slash: wrote a file "new"
    dtype = "q4_k" if case == "dtype" else "f32"
    res = kiln("export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out", str(out), "--dtype", dtype)
    expected = {"deepnorm": "model.residual=deepnorm cannot be written as GGUF",
                "dtype": "--dtype 'q4_k' for GGUF: expected one of f32, f16, bf16, q8_0",
                "folder": "is a folder; give --out a file name", "under-a-file": "cannot write there",
                "proc": "cannot write there",
                "new-folder/": f"{tmp_path / 'new'}/: a folder; give --out a file name such as {tmp_path / 'new'}/model.gguf"
                }[case]
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and expected in lines[0], res.stderr
    assert (tmp_path / "a_file").read_text() == "x" and not (tmp_path / "m.gguf").exists()
    assert not (tmp_path / "new").exists()


def test_gguf_takes_the_dtype_spellings_hf_export_takes():
    from kiln.convert.gguf import check_dtype

    assert [check_dtype(d) for d in ("fp32", "F32", "float16", "fp16", "BF16", "bfloat16", "q8_0")] == \
           ["f32", "f32", "f16", "f16", "bf16", "bf16", "q8_0"]
