"""kiln checkpoint -> one GGUF file for llama.cpp (and the tools built on it), written with `gguf`,
llama.cpp's own writer package.

Architectures (llama.cpp's names), chosen from the model section:

    llama    the default decoder (GQA, tied or untied head, any head_dim)
    qwen3    model.qk_norm (per-head RMSNorm on q and k before RoPE)
    smollm3  model.nope_every = 4: llama.cpp's smollm3 skips RoPE on layers (i + 1) % 4 == 0, a step
             it hard-codes, so no other nope_every can be written
    refused  model.residual=deepnorm, NoPE with QK-norm, nope_every other than 4 (one-line ExportError)

RoPE layout: kiln rotates the two halves of each head (HF's rotate_half), which is llama.cpp's NEOX
rope; qwen3 uses NEOX, so q/k are written as they are. llama and smollm3 use llama.cpp's NORM rope
(adjacent pairs), so each head's q/k rows are interleaved from half-split order, the same
permutation llama.cpp's convert_hf_to_gguf.py applies. model.embed_scale is folded into the
weights exactly as in the HF export (kiln.export.to_hf_state_dict).

Tokenizer: written from the tokenizer.json kiln encodes with (kiln.data.tokenizer), never from a
separate SentencePiece file, so llama.cpp sees the ids the model was trained on:

    BPE + byte fallback + Metaspace ("_" pieces; kiln's default mistral-v3, the v1 vocabulary, or a
        trained SentencePiece-style BPE) -> llama.cpp's SentencePiece vocab ("llama"). Its tokenizer
        merges the adjacent pair whose concatenation has the highest score, so each token's score
        is minus the rank of the first merge that makes it: the merge order kiln's BPE follows.
        Byte tokens (<0xNN>) are BYTE, other special added tokens CONTROL, the remaining added
        tokens USER_DEFINED.
    ByteLevel BPE (GPT-2 style, `kiln.data.tokenizer.train_bpe`) -> "gpt2" with its merges and
        llama.cpp's gpt-2 pre-tokenizer.
    anything else -> ExportError.

kiln never puts BOS before a text (pretraining, generation, eval), so add_bos_token is false and
llama.cpp's tokenizer agrees; EOS is the tokenizer's. Ids the tokenizer lacks below model.vocab_size
become UNUSED "[PADi]" tokens. The chat template kiln trains with goes into tokenizer.chat_template
(kiln's own one adapted to llama.cpp's space after special tokens: gguf_chat_template).

Weights: --dtype f32 | f16 | bf16 | q8_0; norms (1-D tensors) stay f32, as llama.cpp expects. q8_0
quantizes every matrix whose rows are a multiple of 32 and writes the others as f16.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kiln import __version__
from kiln.config import ModelConfig
from kiln.data.tokenizer import SPACE, Tokenizer, load_tokenizer
from kiln.errors import DataError
from kiln.export import ExportError, context_note, to_hf_state_dict
from kiln.posttrain.chat import KILN_TEMPLATE, resolve_template
from kiln.train.checkpoint import load_for_inference, read_config, resolve_checkpoint

DTYPES = ("f32", "f16", "bf16", "q8_0")
DTYPE_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "bfloat16": "bf16"}
LLAMA, QWEN3, SMOLLM3 = "llama", "qwen3", "smollm3"
NORM_ROPE = (LLAMA, SMOLLM3)  # llama.cpp rotates adjacent pairs for these: q/k rows are permuted
NOPE_STEP = 4  # llama.cpp's smollm3: hparams.n_no_rope_layer_step = 4, not read from the file
WRITABLE = f"{LLAMA} (default), {QWEN3} (model.qk_norm), {SMOLLM3} (model.nope_every={NOPE_STEP})"
PAD_SCORE = -1e9  # tokens no merge makes: a merge candidate only after every real one
QK = 32  # block size of q8_0

# HF name (kiln.export's mapping) -> GGUF name; per layer "model.layers.{i}." -> "blk.{i}."
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# llama.cpp token types (gguf.TokenType), spelled out so this module imports without gguf
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _gguf():
    """The `gguf` package (an optional dependency: only GGUF export needs it)."""
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install 'kiln[gguf]' (or pip install gguf)") from None
    return gguf


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture that computes exactly what kiln computes for `cfg`, or ExportError."""
    if cfg.residual != "prenorm":
        raise ExportError(f"model.residual={cfg.residual} cannot be written as GGUF: llama.cpp has no DeepNet "
                          f"post-norm residuals; writable: {WRITABLE}")
    nope = cfg.nope_layers()
    if nope and cfg.qk_norm:
        raise ExportError(f"model.nope_every={cfg.nope_every} with model.qk_norm=true cannot be written as GGUF: no "
                          f"llama.cpp architecture has both; writable: {WRITABLE}")
    if cfg.qk_norm:
        return QWEN3
    if nope and cfg.nope_every != NOPE_STEP:
        raise ExportError(f"model.nope_every={cfg.nope_every} cannot be written as GGUF: llama.cpp's smollm3 skips "
                          f"RoPE on every {NOPE_STEP}th layer only; writable: {WRITABLE}")
    return SMOLLM3 if nope else LLAMA


def half_split_to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """q/k projection rows (n_heads * hd, d): each head from (x_0..x_{hd/2-1}, y_0..y_{hd/2-1}), which kiln
    rotates as (x_i, y_i) pairs, to (x_0, y_0, x_1, y_1, ...), the pairs llama.cpp's NORM rope rotates."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model_or_state: nn.Module | dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """GGUF name -> fp32 tensor (PyTorch layout, out x in) for the architecture `gguf_architecture(cfg)`.
    A tied model has no output.weight: llama.cpp then reads token_embd.weight for the head."""
    arch = gguf_architecture(cfg)
    _, _, hf_state = to_hf_state_dict(model_or_state, cfg)  # names checked, embed_scale folded
    out: dict[str, Tensor] = {}
    for name, t in hf_state.items():
        t = t.detach().to("cpu", torch.float32)
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = t
            continue
        _, _, i, rest = name.split(".", 3)
        if arch in NORM_ROPE and rest == "self_attn.q_proj.weight":
            t = half_split_to_interleaved(t, cfg.n_heads)
        elif arch in NORM_ROPE and rest == "self_attn.k_proj.weight":
            t = half_split_to_interleaved(t, cfg.n_kv_heads)
        out[f"blk.{i}.{LAYER_NAMES[rest]}"] = t.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class GGUFVocab:
    """What llama.cpp's tokenizer.ggml.* keys hold."""

    model: str  # "llama" (SentencePiece-style) | "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    bos_id: int | None
    eos_id: int
    unk_id: int | None = None
    scores: list[float] | None = None  # llama
    add_space_prefix: bool = False  # llama
    pre: str | None = None  # gpt2: llama.cpp's pre-tokenizer name
    merges: list[str] = field(default_factory=list)  # gpt2


def _metaspace_prefix(pre: dict | None, norm: dict | None) -> bool | None:
    """Whether a SentencePiece-style tokenizer prepends the dummy space; None if it is not one."""
    if pre and pre.get("type") == "Metaspace" and norm is None and pre.get("replacement") == SPACE:
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        return scheme != "never"
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else []
    kinds = [(s.get("type"), s.get("prepend") or s.get("content")) for s in steps]
    if pre is None and kinds in ([("Prepend", SPACE), ("Replace", SPACE)], [("Replace", SPACE)]):
        return kinds[0][0] == "Prepend"  # the older HF Llama conversion: spaces replaced by a normalizer
    return None


def _is_gpt2_bytelevel(pre: dict | None, norm: dict | None) -> bool:
    return bool(pre and pre.get("type") == "ByteLevel" and norm is None and not pre.get("add_prefix_space", False)
                and pre.get("use_regex", True))


def gguf_vocab(tok: Tokenizer, *, n_vocab: int) -> GGUFVocab:
    """llama.cpp's vocabulary for kiln's tokenizer `tok`, padded to the model's `n_vocab` rows."""
    if tok.vocab_size > n_vocab:
        raise DataError(f"tokenizer '{tok.name}' has {tok.vocab_size} ids but model.vocab_size is {n_vocab}; "
                        "the model could not embed every token")
    spec = json.loads(tok.backend.to_str())
    model, pre, norm = spec["model"], spec.get("pre_tokenizer"), spec.get("normalizer")
    prefix = _metaspace_prefix(pre, norm)
    gpt2 = _is_gpt2_bytelevel(pre, norm)
    odd = model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges")
    if model.get("type") != "BPE" or odd or not (gpt2 or (prefix is not None and model.get("byte_fallback"))):
        kind = f"{model.get('type')} model, pre-tokenizer {(pre or {}).get('type')}, normalizer {(norm or {}).get('type')}"
        raise ExportError(f"tokenizer '{tok.name}' ({kind}) has no llama.cpp equivalent (GGUF holds SentencePiece-"
                          "style BPE with byte fallback, or GPT-2 byte-level BPE); export this model with --format hf")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    unk_id = tok.backend.token_to_id(tok.unk_token) if tok.unk_token else None
    if unk_id is None and model.get("unk_token"):
        unk_id = model["vocab"].get(model["unk_token"])
    if unk_id is not None:
        types[unk_id] = UNKNOWN
    pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges") or []]
    common = dict(tokens=tokens, types=types, bos_id=tok.bos_id, eos_id=tok.eos_id, unk_id=unk_id)
    if gpt2:
        return GGUFVocab(model="gpt2", pre="gpt-2", merges=[f"{a} {b}" for a, b in pairs], **common)
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(pairs):
        rank.setdefault(a + b, r)  # a token several merges make: the earliest one decides
    scores = [-float(rank[t]) if t in rank else PAD_SCORE for t in tokens]
    for i, t in enumerate(tokens):  # the byte fallback's pieces, added tokens or not (a trainer's specials)
        if types[i] != UNUSED and re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            types[i] = BYTE
    return GGUFVocab(model="llama", scores=scores, add_space_prefix=prefix, **common)


def gguf_chat_template(template: str, vocab: GGUFVocab) -> str:
    """The chat template for llama.cpp, rendering text that llama.cpp tokenizes into kiln's tokens.

    llama.cpp's SentencePiece-style tokenizer puts a space before the text after every special token;
    kiln's only at the start of the whole text. kiln's own template writes one space after [INST] and
    after [/INST]: where those (and EOS) are control tokens, the GGUF copy leaves that space out, which
    llama.cpp then adds back. Any other template is written as it is."""
    control = {t for t, kind in zip(vocab.tokens, vocab.types) if kind == CONTROL}
    marks = {"[INST]", "[/INST]", vocab.tokens[vocab.eos_id]}
    if template != KILN_TEMPLATE or vocab.model != "llama" or not marks <= control:
        return template
    pairs = [("'[INST] '", "'[INST]'"), ("' ' + m['content'] + eos_token", "m['content'] + eos_token")]
    for old, new in pairs:
        assert template.count(old) == 1, old
        template = template.replace(old, new)
    return template


# ---------------------------------------------------------------------------------------------
# Writing


def check_dtype(dtype: str) -> str:
    """The canonical GGUF dtype name for `dtype` (f32 | f16 | bf16 | q8_0, or float32 ...), or ExportError."""
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} for GGUF: expected one of {', '.join(DTYPES)}")
    return name


def _encode(t: Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) as gguf.GGUFWriter.add_tensor takes them."""
    gguf = _gguf()
    a = t.numpy()
    if a.ndim == 1 or dtype == "f32":
        return a, None
    if dtype == "bf16":
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if dtype == "q8_0" and a.shape[-1] % QK == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None  # f16, and q8_0's fallback for rows that are not whole blocks


def _written_by_kiln(path: Path) -> bool:
    """Whether the GGUF file at `path` holds the kiln.version key `export_gguf` writes into every file."""
    try:
        return "kiln.version" in _gguf().GGUFReader(str(path), "r").fields
    except Exception:  # a truncated or damaged file, whatever the reader trips on: not one kiln can vouch for
        return False


def _check_out(out: Path) -> None:
    """Refuse a folder, a file kiln did not write at `out` (a downloaded model), and an unwritable place,
    before any slow work."""
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; give --out a file name such as model.gguf")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ExportError(f"{out}: exists and is not a GGUF file; choose another --out")
        if not _written_by_kiln(out):
            raise ExportError(f"{out}: a GGUF file kiln did not write (no kiln.version key); choose another --out, "
                              "or remove it yourself")
    probe = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ExportError(f"{out}: cannot write there ({e.strerror or type(e).__name__}); choose another --out") from None


def write_gguf(path: str | Path, model_or_state: nn.Module | dict[str, Tensor], cfg: ModelConfig, tok: Tokenizer, *,
               dtype: str = "f32", name: str = "kiln", chat_template: str | None = None,
               extra: dict[str, str] | None = None) -> Path:
    """Write the model and its tokenizer to `path` as GGUF (not atomic; `export_gguf` is)."""
    gguf = _gguf()
    dtype = check_dtype(dtype)
    arch = gguf_architecture(cfg)
    vocab = gguf_vocab(tok, n_vocab=cfg.vocab_size)
    tensors = gguf_tensors(model_or_state, cfg)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.hd)
    w.add_value_length(cfg.hd)
    w.add_rope_dimension_count(cfg.hd)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w.add_file_type(file_types[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(w, vocab)
    if chat_template:
        w.add_chat_template(gguf_chat_template(chat_template, vocab))
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for tname, t in tensors.items():
        array, raw = _encode(t, dtype)
        w.add_tensor(tname, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _add_vocab(w: Any, vocab: GGUFVocab) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre or "default")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    if vocab.unk_id is not None:
        w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(False)  # kiln never puts BOS before a text
    w.add_add_eos_token(False)
    if vocab.model == "llama":
        w.add_add_space_prefix(vocab.add_space_prefix)


def export_gguf(ckpt_path: str | Path, out_path: str | Path, *, dtype: str = "f32") -> Path:
    """Write a kiln checkpoint (or a run folder's latest) as one GGUF file that llama.cpp loads, its
    tokenizer and chat template inside. The file appears whole or not at all; a GGUF file an earlier
    export wrote is replaced, any other file refused."""
    dtype = check_dtype(dtype)
    _gguf()  # a missing package fails before the checkpoint is read
    if str(out_path).endswith(("/", "\\")):  # Path() drops the slash: the user meant a folder
        raise ExportError(f"{out_path}: a folder; give --out a file name such as {out_path}model.gguf")
    out = Path(out_path)
    _check_out(out)
    cfg = read_config(resolve_checkpoint(ckpt_path))
    gguf_architecture(cfg.model)  # refusals come before any weights are read
    tok = load_tokenizer(cfg.data.tokenizer)
    gguf_vocab(tok, n_vocab=cfg.model.vocab_size)
    model, cfg, ckpt = load_for_inference(ckpt_path)
    _, template = resolve_template(cfg.posttrain.chat_template, cfg.data.tokenizer)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        write_gguf(tmp, model, cfg.model, tok, dtype=dtype, name=cfg.run.name or Path(ckpt).parent.parent.name,
                   chat_template=template,
                   extra={"kiln.version": __version__, "kiln.checkpoint": str(Path(ckpt).resolve()),
                          "kiln.tokenizer": cfg.data.tokenizer})
        os.replace(tmp, out)
    except OSError as e:
        raise ExportError(f"{out}: cannot write there ({e.strerror or type(e).__name__}); choose another --out") from None
    finally:
        tmp.unlink(missing_ok=True)
    context_note(cfg, "the GGUF context_length")
    return out
