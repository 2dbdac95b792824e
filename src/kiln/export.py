"""kiln <-> Hugging Face transformers: state dicts, configs, and an exported model folder.

kiln's Transformer is a Llama-style decoder with the HF RoPE layout (half-split, rotate_half), so
weights map one to one by name; no q/k permutation is needed. The HF class depends on the options:

    LlamaForCausalLM    no QK-norm, no NoPE layers
    Qwen3ForCausalLM    model.qk_norm (per-head RMSNorm on q and k), no NoPE layers
    SmolLM3ForCausalLM  model.nope_every > 0 (no_rope_layers[i] == 1 means layer i USES RoPE), no QK-norm;
                        also used for a plain model whose d_model is not a multiple of n_heads,
                        which LlamaConfig refuses (SmolLM3 with every layer on RoPE is Llama)

model.embed_scale (embedding output x sqrt(d)) is folded into the weights: tok_emb' = tok_emb x sqrt(d),
and for a tied head the final norm weight' = norm / sqrt(d), so the logits are unchanged. Importing
such an export gives the folded, embed_scale=false equivalent. model.residual=deepnorm and NoPE together
with QK-norm have no HF class and raise ExportError.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kiln import __version__
from kiln.config import Config, ModelConfig
from kiln.errors import DataError, KilnError, first_line
from kiln.model.init import clean_name

LLAMA, QWEN3, SMOLLM3 = "LlamaForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM"
EXPORTABLE = f"{LLAMA} (default), {QWEN3} (model.qk_norm), {SMOLLM3} (model.nope_every)"
MODEL_TYPES = {"llama": LLAMA, "qwen3": QWEN3, "smollm3": SMOLLM3}
MARKER = "kiln_export.json"  # written into every export, with the files it wrote: only those are replaced
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# short spellings for --dtype (GGUF's f32 / f16 / bf16 among them); config.json records the long name
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}

# kiln name suffix -> HF name suffix, inside layer i ("layers.{i}." -> "model.layers.{i}.")
LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
GLOBAL_MAP = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "head.weight": "lm_head.weight"}


class ExportError(KilnError):
    """A model that no Hugging Face class represents exactly, or an export folder that cannot be written."""


def hf_architecture(cfg: ModelConfig) -> str:
    """The HF class that computes exactly what kiln computes for `cfg`, or ExportError."""
    if cfg.residual != "prenorm":
        raise ExportError(f"model.residual={cfg.residual} cannot be exported: no HF class has DeepNet post-norm "
                          f"residuals; exportable: {EXPORTABLE}")
    if cfg.nope_layers() and cfg.qk_norm:
        raise ExportError(f"model.nope_every={cfg.nope_every} with model.qk_norm=true cannot be exported: no HF class "
                          f"has both NoPE layers and QK-norm; exportable: {EXPORTABLE}")
    if cfg.qk_norm:
        return QWEN3
    if cfg.nope_layers() or cfg.d_model % cfg.n_heads:
        return SMOLLM3
    return LLAMA


def _kiln_keys(cfg: ModelConfig) -> list[str]:
    qk = ("attn.q_norm.weight", "attn.k_norm.weight")
    per_layer = [k for k in LAYER_MAP if cfg.qk_norm or k not in qk]
    keys = ["tok_emb.weight", *(f"layers.{i}.{k}" for i in range(cfg.n_layers) for k in per_layer), "norm.weight"]
    return keys if cfg.tie_embeddings else [*keys, "head.weight"]


def _kiln_state(model_or_state: nn.Module | dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    state = {clean_name(k): v for k, v in state.items()}  # without wrapper prefixes (compile, AC, DDP)
    expected = _kiln_keys(cfg)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise ExportError(f"weights do not fit the model config ({what}); check model.qk_norm / model.tie_embeddings")
    return state


def hf_config_dict(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                   dtype: str = "float32") -> tuple[str, dict[str, Any]]:
    """(architecture, keyword arguments of its HF config class) for `cfg`."""
    arch = hf_architecture(cfg)
    d: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.hd, "max_position_embeddings": cfg.max_seq_len,
        # transformers 5 keeps RoPE settings in rope_parameters (a top-level rope_theta is converted into it)
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "hidden_act": "silu", "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "pad_token_id": None, "dtype": dtype, "architectures": [arch],
    }
    if arch == QWEN3:
        d["use_sliding_window"] = False
    if arch == SMOLLM3:
        nope = set(cfg.nope_layers())
        d["no_rope_layers"] = [0 if i in nope else 1 for i in range(cfg.n_layers)]  # 1 = this layer uses RoPE
        d["no_rope_layer_interval"] = cfg.nope_every if nope else cfg.n_layers + 1
        d["use_sliding_window"] = False
    return arch, d


def to_hf_state_dict(model_or_state: nn.Module | dict[str, Tensor], cfg: ModelConfig, *,
                     bos_token_id: int | None = None, eos_token_id: int | None = None
                     ) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """kiln model or state dict -> (HF architecture, HF config kwargs, HF state dict).

    A tied model's state has no lm_head.weight (HF ties it on load, as its own save_pretrained does).
    """
    arch, hf_cfg = hf_config_dict(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    state = _kiln_state(model_or_state, cfg)
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            out[f"model.layers.{i}.{LAYER_MAP[rest]}"] = v.detach()
        else:
            out[GLOBAL_MAP[k]] = v.detach()
    if cfg.embed_scale:
        s = math.sqrt(cfg.d_model)
        emb = out["model.embed_tokens.weight"]
        out["model.embed_tokens.weight"] = emb * torch.tensor(s, dtype=emb.dtype)  # same product as kiln's forward
        if cfg.tie_embeddings:  # the head reads the scaled table too: undo it in the final norm
            out["model.norm.weight"] = out["model.norm.weight"] / s
    return arch, hf_cfg, out


def hf_config_class(arch: str) -> type:
    import transformers

    return getattr(transformers, arch.replace("ForCausalLM", "Config"))


def to_hf_model(model_or_state: nn.Module | dict[str, Tensor], cfg: ModelConfig, **token_ids: int | None) -> nn.Module:
    """An in-memory HF model (fp32, eval mode) with the same weights as the kiln model."""
    import transformers

    arch, hf_cfg, state = to_hf_state_dict(model_or_state, cfg, **token_ids)
    hf = getattr(transformers, arch)(hf_config_class(arch)(**hf_cfg)).float()
    result = hf.load_state_dict(state, strict=False)  # copies into the params, so HF's tie stays intact
    allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise AssertionError(f"HF {arch} names differ: {result}")
    return hf.eval()


# ---------------------------------------------------------------------------------------------
# Export: kiln checkpoint -> HF folder


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ExportError(f"{out}: folder is not empty and is not a previous kiln export; choose another --out")


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Write a kiln checkpoint (or a run folder's latest) as an HF folder that `AutoModelForCausalLM`
    and `AutoTokenizer` load. Into a previous export only the files it wrote are replaced (a model card or
    eval results added there stay); any other non-empty folder is refused."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from kiln.data.tokenizer import load_tokenizer
    from kiln.train.checkpoint import load_for_inference

    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected float32 (fp32, f32), bfloat16 (bf16) or float16 (fp16, f16)")
    dtype = name  # the HF spelling: config.json's dtype and kiln_export.json record it
    out = Path(out_dir)
    _check_out_dir(out)
    model, cfg, ckpt = load_for_inference(ckpt_path)
    m = cfg.model
    hf_architecture(m)  # fail before any slow work
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > m.vocab_size:
        raise DataError(f"tokenizer '{cfg.data.tokenizer}' has {tok.vocab_size} ids but model.vocab_size is "
                        f"{m.vocab_size}; the exported model could not embed every token")
    arch, hf_cfg, state = to_hf_state_dict(model, m, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    hf_cfg["dtype"] = dtype
    state = {k: v.to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}

    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf_config_class(arch)(**hf_cfg).save_pretrained(str(tmp))
        _add_legacy_keys(tmp / "config.json", m)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o666 & ~_umask())  # save_file makes it 0600, unlike the others
        GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id
                         ).save_pretrained(str(tmp))
        tok.save_hf(tmp)
        from kiln.posttrain.chat import write_chat_template

        # the chat template kiln trains with, so apply_chat_template reproduces kiln's tokens
        write_chat_template(tmp, chat_template=cfg.posttrain.chat_template, tokenizer_spec=cfg.data.tokenizer)
        info = {"kiln_version": __version__, "checkpoint": str(Path(ckpt).resolve()), "architecture": arch,
                "dtype": dtype, "tokenizer": cfg.data.tokenizer, "embed_scale_folded": m.embed_scale,
                "files": sorted(p.name for p in tmp.iterdir())}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    context_note(cfg, "max_position_embeddings")
    return out


def _umask() -> int:
    """The process's umask (os.umask reads it only by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _install(tmp: Path, out: Path) -> None:
    """Move a finished export from `tmp` to `out`. Into an existing folder (empty, or an earlier export) the
    files go one by one and only the files the earlier export listed in its MARKER are removed, so what the
    user put there (a README.md model card, an eval_results/ folder) stays. The MARKER goes last: an
    interrupted install still reads as an export, and exporting again completes it."""
    if not out.exists():
        tmp.rename(out)
        return
    _check_out_dir(out)
    try:
        earlier = set(json.loads((out / MARKER).read_text()).get("files", [])) if (out / MARKER).is_file() else set()
    except (ValueError, AttributeError):
        earlier = set()  # a damaged marker: replace what this export writes, remove nothing else
    written = {p.name for p in tmp.iterdir()}
    for name in sorted(written - {MARKER}):
        os.replace(tmp / name, out / name)
    for name in sorted(earlier - written):
        if Path(name).name == name and (out / name).is_file():  # a plain name, never a path out of the folder
            (out / name).unlink()
    os.replace(tmp / MARKER, out / MARKER)
    tmp.rmdir()


def context_note(cfg: Config, field: str) -> None:
    """One stderr line when the export declares a longer context (`field`, from model.max_seq_len) than the
    checkpoint's run trained on from scratch: tools that take their window from it (lm-eval's perplexity) then
    score the model at lengths whose relative positions it never saw (bench/RESULTS.md, "Ninth sitting: context
    length"). A run started from other weights (post-training, an import) may have seen longer ones before."""
    if not cfg.run.init_from and cfg.train.seq_len < cfg.model.max_seq_len:
        print(f"note: {field} is model.max_seq_len ({cfg.model.max_seq_len}); this run trained on "
              f"{cfg.train.seq_len}-token sequences (model.max_seq_len: {cfg.train.seq_len} declares that)",
              file=sys.stderr)


def _add_legacy_keys(path: Path, cfg: ModelConfig) -> None:
    """Top-level rope_theta for readers older than transformers 5 (5.x folds it into rope_parameters)."""
    data = json.loads(path.read_text())
    data.setdefault("rope_theta", float(cfg.rope_theta))
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Import: HF Llama / Qwen3 / SmolLM3 -> kiln


def _read_hf_folder(folder: Path) -> tuple[Any, dict[str, Tensor]]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ExportError(f"{folder}: not a Hugging Face model folder ({str(e).splitlines()[0]})") from None
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        try:
            files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, no weight_map, not names
            raise ExportError(f"{index}: damaged or incomplete ({first_line(e)}); re-download or re-export "
                              "it") from None
    else:
        raise ExportError(f"{folder}: no model.safetensors (or sharded index); convert the weights to safetensors")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(_load_safetensors(f, index))
    return config, state


def _load_safetensors(path: Path, index: Path) -> dict[str, Tensor]:
    """One weights file; a missing, truncated or damaged one (an interrupted download or copy) is one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ExportError(f"{path}: missing (listed in {index.name}); re-download it")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ExportError(f"{path}: damaged or incomplete ({first_line(e)}); re-download or re-export it") from None
    except OSError as e:
        raise ExportError(f"{path}: cannot read it ({e.strerror or first_line(e)})") from None


def _nope_every(no_rope_layers: list[int], n_layers: int) -> int:
    nope = [i for i in range(n_layers) if not no_rope_layers[i]]
    if not nope:
        return 0
    k = nope[0] + 1
    if nope != [i for i in range(n_layers) if (i + 1) % k == 0]:
        raise ExportError(f"SmolLM3 no_rope_layers={no_rope_layers[:n_layers]} is not every k-th layer; "
                          "kiln's model.nope_every cannot represent it")
    return k


def _model_config_from_hf(config: Any) -> ModelConfig:
    mt = getattr(config, "model_type", None)
    if mt not in MODEL_TYPES:
        raise ExportError(f"HF model_type {mt!r} cannot be imported; supported: {', '.join(MODEL_TYPES)}")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ExportError(f"HF rope_parameters {rope}: only plain RoPE (rope_type default) can be imported")
    # transformers 4.x keeps scaled RoPE (Llama 3.x's "llama3", "linear", "dynamic", "yarn" ...) in
    # rope_scaling, with "rope_type" or the older "type"; kiln's RoPE is the unscaled one
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else scaling
    if kind != "default":
        raise ExportError(f"HF rope_scaling {scaling}: kiln has plain RoPE only (no {kind} scaling); this model "
                          "cannot be imported")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("HF attention_bias / mlp_bias: kiln's linear layers have no bias")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"HF hidden_act={config.hidden_act}: kiln's MLP is SwiGLU (silu)")
    if getattr(config, "use_sliding_window", False):
        raise ExportError("HF use_sliding_window=true: kiln has no sliding-window attention")
    n_layers, d, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // heads
    nope_every = _nope_every(list(config.no_rope_layers), n_layers) if mt == "smollm3" else 0
    return ModelConfig(
        vocab_size=config.vocab_size, d_model=d, n_layers=n_layers, n_heads=heads,
        n_kv_heads=config.num_key_value_heads or heads, head_dim=0 if hd * heads == d else hd,
        ffn_dim=config.intermediate_size, max_seq_len=config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        norm_eps=config.rms_norm_eps, qk_norm=mt == "qwen3", tie_embeddings=bool(config.tie_word_embeddings),
        nope_every=nope_every,
    )


def _hf_name(key: str) -> str:
    """The HF tensor name of a kiln state-dict key."""
    if key in GLOBAL_MAP:
        return GLOBAL_MAP[key]
    _, i, rest = key.split(".", 2)
    return f"model.layers.{i}.{LAYER_MAP[rest]}"


def from_hf(hf_dir_or_model: str | Path | nn.Module) -> tuple[ModelConfig, dict[str, Tensor]]:
    """An HF Llama / Qwen3 / SmolLM3 folder or in-memory model -> (kiln ModelConfig, fp32 kiln state dict).
    A folder's refusals name it (its config.json, or the tensor that does not fit it)."""
    if isinstance(hf_dir_or_model, nn.Module):
        return _from_hf(hf_dir_or_model.config, hf_dir_or_model.state_dict())
    folder = Path(hf_dir_or_model)
    config, hf_state = _read_hf_folder(folder)
    try:
        return _from_hf(config, hf_state)
    except ExportError as e:
        raise ExportError(f"{folder}: {e}") from None


def _from_hf(config: Any, hf_state: dict[str, Tensor]) -> tuple[ModelConfig, dict[str, Tensor]]:
    from kiln.model import Transformer

    cfg = _model_config_from_hf(config)
    inverse = {v: k for k, v in GLOBAL_MAP.items()}
    layer_inv = {v: k for k, v in LAYER_MAP.items()}
    state: dict[str, Tensor] = {}
    for name, v in hf_state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # the same tensor as the embedding
        if name in inverse:
            key = inverse[name]
        elif name.startswith("model.layers.") and name.split(".", 3)[3] in layer_inv:
            _, _, i, rest = name.split(".", 3)
            key = f"layers.{i}.{layer_inv[rest]}"
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        else:
            raise ExportError(f"HF weight {name!r} has no kiln counterpart: kiln imports a plain {config.model_type} "
                              "causal LM's weights (embedding, attention, MLP, norms, lm_head); import the "
                              "unquantized causal-LM checkpoint, with any adapters merged into it")
        state[key] = v.detach().to("cpu", torch.float32).contiguous()
    with torch.device("meta"):  # the shapes config.json's sizes give, without allocating the model
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    missing = [k for k in _kiln_keys(cfg) if k not in state]
    if missing:
        raise ExportError(f"no weight {_hf_name(missing[0])}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                          else "") + " among the safetensors files; config.json's model needs it")
    for key, v in state.items():
        if key in shapes and tuple(v.shape) != shapes[key]:
            raise ExportError(f"weight {_hf_name(key)} has shape {tuple(v.shape)}, config.json's sizes give "
                              f"{shapes[key]}; the weights and config.json are of different models")
    _kiln_state(state, cfg)  # every key present, none extra
    return cfg, state


def _adds_bos(folder: Path) -> str | None:
    """The BOS token an HF tokenizer folder puts before every encoded text, or None."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        ids = tok("a")["input_ids"]
    except Exception:  # no loadable HF tokenizer: nothing to warn about
        return None
    if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id:
        return tok.bos_token
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")


def import_hf_folder(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """An HF Llama / Qwen3 / SmolLM3 folder -> a kiln run folder holding checkpoints/step_0.

    The folder's tokenizer files are copied to <out>/tokenizer and data.tokenizer points there (absolute
    path), so training, generation and export use that tokenizer, chat template included. The saved
    config is the default one with the imported model section, run.init_from = the step_0 checkpoint
    and run.out_dir = <out>-train: `kiln train <out>/config.yaml` continues pretraining from the
    imported weights into a new run folder. Returns the checkpoint folder.
    """
    import yaml

    from kiln.config import Config, to_dict, validate
    from kiln.data.tokenizer import load_tokenizer, tokenizer_digest
    from kiln.model import build_model
    from kiln.train.checkpoint import list_checkpoints, save_checkpoint

    src, out = Path(hf_dir), Path(out_dir)
    if src.is_file():
        raise ExportError(f"{src}: a file; --hf takes the model's folder (config.json, *.safetensors, tokenizer "
                          f"files), such as --hf {src.parent}")
    if not src.is_dir():
        raise ExportError(f"{src}: no such HF model folder")
    if not (src / "config.json").is_file():  # transformers' own message asks for a model_type key in it
        raise ExportError(f"{src}: no config.json; --hf takes an HF model folder (config.json, *.safetensors, "
                          "tokenizer files), as save_pretrained writes it")
    if list_checkpoints(out):
        raise ExportError(f"{out}: already holds checkpoints; choose another --out")
    mcfg, state = from_hf(src)
    files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in files):
        raise ExportError(f"{src}: no tokenizer files (tokenizer.json or tokenizer.model); kiln keeps the "
                          "model's own tokenizer, so the folder must have one")
    tok_dir = (out / "tokenizer").resolve()
    tok_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, tok_dir / f.name)
    tok = load_tokenizer(str(tok_dir))
    if tok.vocab_size > mcfg.vocab_size:
        raise DataError(f"{src}: its tokenizer has {tok.vocab_size} ids but the model only {mcfg.vocab_size}")
    bos = _adds_bos(src)
    if bos:
        print(f"warning: {src}'s tokenizer puts {bos} before every text, so the model was probably trained "
              "with it; kiln never adds BOS (pretraining, post-training, generation, eval), so its inputs differ "
              "from the model's training (a chat template that writes BOS itself is unaffected)", file=sys.stderr)
    cfg = Config()
    cfg.model = mcfg
    cfg.data.tokenizer = str(tok_dir)
    cfg.run.name = out.resolve().name
    cfg.train.seq_len = min(cfg.train.seq_len, mcfg.max_seq_len)
    ckpt = (out / "checkpoints" / "step_0").resolve()
    cfg.run.init_from = str(ckpt)
    cfg.run.out_dir = str(out.resolve()) + "-train"
    validate(cfg, where=f"import of {src}")
    model = build_model(mcfg, device="cpu", seed=0)
    model.load_state_dict(state, strict=True)
    path = save_checkpoint(out / "checkpoints", 0, model=model, cfg=cfg, train_state={"imported_from": str(src)},
                           meta={"tokens_seen": 0, "imported_from": str(src.resolve()),
                                 "tokenizer_digest": tokenizer_digest(tok)})
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
