"""kiln <-> Hugging Face: logits parity per architecture, import, round trips, and a full export."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kiln.config import Config, ModelConfig, TrainConfig
from kiln.errors import DataError
from kiln.export import (
    ExportError,
    export_checkpoint,
    from_hf,
    hf_architecture,
    to_hf_model,
    to_hf_state_dict,
)
from kiln.model import Transformer, build_model

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=128,
                norm_eps=1e-6, init_std=0.1)
    return ModelConfig(**{**base, **kw})


def same_arch(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal apart from the init scheme and attention backend, which HF configs do not carry."""
    return dataclasses.replace(b, init=a.init, init_std=a.init_std, attention=a.attention) == a


def kiln_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A built model with non-trivial norm weights, so a misplaced norm cannot hide."""
    model = build_model(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def max_diff(model: Transformer, hf, vocab: int) -> float:
    x = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return (model(x) - hf(x).logits).abs().max().item()


CASES = {
    "llama-gqa-tied": (tiny(), "LlamaForCausalLM"),
    "llama-gqa-untied": (tiny(tie_embeddings=False), "LlamaForCausalLM"),
    "llama-mha-tied": (tiny(n_kv_heads=4), "LlamaForCausalLM"),
    "llama-mha-untied-theta": (tiny(n_kv_heads=4, tie_embeddings=False, rope_theta=500000.0), "LlamaForCausalLM"),
    "llama-head-dim-32": (tiny(head_dim=32, rope_theta=1234.5), "LlamaForCausalLM"),
    "qwen3-gqa-tied": (tiny(qk_norm=True), "Qwen3ForCausalLM"),
    "qwen3-gqa-untied": (tiny(qk_norm=True, tie_embeddings=False, norm_eps=1e-5), "Qwen3ForCausalLM"),
    "qwen3-head-dim-24": (tiny(qk_norm=True, head_dim=24, rope_theta=1e6), "Qwen3ForCausalLM"),
    "smollm3-nope2-tied": (tiny(nope_every=2, n_layers=4), "SmolLM3ForCausalLM"),
    "smollm3-nope3-untied": (tiny(nope_every=3, n_layers=6, tie_embeddings=False), "SmolLM3ForCausalLM"),
    # d_model 60 is not a multiple of 8 heads: LlamaConfig refuses it, SmolLM3 without NoPE layers is Llama
    "smollm3-as-llama": (tiny(d_model=60, n_heads=8, head_dim=8), "SmolLM3ForCausalLM"),
    # sqrt(48) is not a power of two, so the folding is not exact in binary: parity shows it is close
    "embed-scale-tied": (tiny(d_model=48, embed_scale=True), "LlamaForCausalLM"),
    "embed-scale-untied": (tiny(d_model=48, embed_scale=True, tie_embeddings=False), "LlamaForCausalLM"),
    "embed-scale-qwen3": (tiny(d_model=48, embed_scale=True, qk_norm=True), "Qwen3ForCausalLM"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_parity(name):
    cfg, arch = CASES[name]
    if arch == "SmolLM3ForCausalLM" and not hasattr(transformers, arch):
        pytest.skip(f"transformers {transformers.__version__} has no {arch}")
    model = kiln_model(cfg)
    hf = to_hf_model(model, cfg)
    assert type(hf).__name__ == arch == hf_architecture(cfg)
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    diff = max_diff(model, hf, cfg.vocab_size)
    print(f"{name}: max |kiln - HF| = {diff:.3g}")
    assert diff <= TOL


def test_smollm3_no_rope_layers_semantics():
    """SmolLM3's no_rope_layers[i] == 1 means layer i uses RoPE: the exact inverse of its name."""
    if not hasattr(transformers, "SmolLM3ForCausalLM"):
        pytest.skip("transformers has no SmolLM3")
    cfg = tiny(nope_every=2, n_layers=4)
    assert cfg.nope_layers() == [1, 3]
    _, hf_cfg, _ = to_hf_state_dict(kiln_model(cfg), cfg)
    assert hf_cfg["no_rope_layers"] == [1, 0, 1, 0]
    assert transformers.SmolLM3Config(num_hidden_layers=4, no_rope_layer_interval=2).no_rope_layers == [1, 0, 1, 0]
    # NoPE matters: the same weights with RoPE everywhere give other logits, so parity is not vacuous
    model = kiln_model(cfg)
    all_rope = kiln_model(tiny(n_layers=4))
    all_rope.load_state_dict(model.state_dict())
    assert max_diff(all_rope, to_hf_model(model, cfg), cfg.vocab_size) > 1e-3


def test_unexportable_configs_raise_one_line_errors():
    with pytest.raises(ExportError, match=r"model\.residual=deepnorm.*LlamaForCausalLM") as e:
        hf_architecture(tiny(residual="deepnorm", init="deepnet"))
    assert "\n" not in str(e.value)
    with pytest.raises(ExportError, match=r"model\.nope_every=2 with model\.qk_norm") as e:
        to_hf_state_dict(kiln_model(tiny(nope_every=2, qk_norm=True)), tiny(nope_every=2, qk_norm=True))
    assert "\n" not in str(e.value)


def test_weights_that_do_not_fit_the_config():
    cfg = tiny()
    with pytest.raises(ExportError, match="missing"):
        to_hf_state_dict(kiln_model(cfg), tiny(tie_embeddings=False))


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM"])
@pytest.mark.parametrize("tied", [True, False])
def test_import_random_hf_model(arch, tied):
    if not hasattr(transformers, arch):
        pytest.skip(f"transformers has no {arch}")
    extra = {"no_rope_layer_interval": 2} if arch.startswith("SmolLM3") else {}
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(
        vocab_size=200, hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24 if arch.startswith("Qwen3") else 16, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, pad_token_id=None, bos_token_id=None, eos_token_id=None, **extra)
    torch.manual_seed(3)
    hf = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.2 if p.ndim == 1 else 0.1)
    cfg, state = from_hf(hf)
    assert (cfg.tie_embeddings, cfg.qk_norm, cfg.rope_theta) == (tied, arch.startswith("Qwen3"), 3000.0)
    assert cfg.nope_every == (2 if arch.startswith("SmolLM3") else 0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model.load_state_dict(state)  # strict: every key present, none extra
    assert max_diff(model.eval(), hf, cfg.vocab_size) <= TOL


ROUND_TRIP = ["llama-gqa-tied", "llama-mha-untied-theta", "qwen3-head-dim-24", "qwen3-gqa-untied",
              "smollm3-nope2-tied", "smollm3-as-llama"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_is_bitwise(name, tmp_path):
    cfg, _ = CASES[name]
    model = kiln_model(cfg, seed=5)
    hf = to_hf_model(model, cfg)
    cfg2, state = from_hf(hf)  # in memory
    own = model.state_dict()
    assert same_arch(cfg, cfg2)
    assert own.keys() == state.keys()
    assert all(torch.equal(own[k], state[k]) for k in own)
    hf.save_pretrained(tmp_path)  # and through a folder written by transformers itself
    cfg3, state3 = from_hf(tmp_path)
    assert same_arch(cfg, cfg3)
    assert all(torch.equal(own[k], state3[k]) for k in own)


def test_embed_scale_import_gives_the_folded_equivalent():
    cfg = CASES["embed-scale-tied"][0]
    model = kiln_model(cfg)
    cfg2, state = from_hf(to_hf_model(model, cfg))
    assert not cfg2.embed_scale
    back = Transformer(cfg2)
    back.init_weights(seed=0)
    back.load_state_dict(state)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert (back.eval()(x) - model(x)).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------
# Full export of a checkpoint folder with the real tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from kiln.data.tokenizer import load_tokenizer

    return load_tokenizer("mistral-v3")


def write_checkpoint(root, model_cfg: ModelConfig, *, seed: int = 0):
    from kiln.train.checkpoint import save_checkpoint

    cfg = Config(model=model_cfg, train=TrainConfig(seq_len=64))
    return save_checkpoint(root / "run" / "checkpoints", 3, model=kiln_model(model_cfg, seed=seed), cfg=cfg,
                           train_state={}, meta={})


@pytest.mark.parametrize("model_kw", [{}, {"qk_norm": True, "tie_embeddings": False}, {"nope_every": 2}],
                         ids=["llama", "qwen3-untied", "smollm3"])
def test_export_checkpoint_end_to_end(model_kw, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.generate import generate
    from kiln.train.checkpoint import load_for_inference

    assert tokenizer.vocab_size == 32768
    cfg = tiny(vocab_size=tokenizer.vocab_size, d_model=32, n_kv_heads=2, ffn_dim=64, init_std=0.3, **model_kw)
    write_checkpoint(tmp_path, cfg)
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")  # a run folder means its latest checkpoint
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "kiln_export.json"} <= {p.name for p in out.iterdir()}
    conf = json.loads((out / "config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["rms_norm_eps"]) == (1, 2, 1e-6)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "It is a truth universally acknowledged, that a single man"
    ids = tokenizer.encode(text)
    assert hf_tok(text).input_ids == ids
    model, _, _ = load_for_inference(tmp_path / "run")
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= TOL

    hf_new = hf.generate(x, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(x))[0, len(ids):]
    hf_new = hf_new.tolist()
    if tokenizer.eos_id in hf_new:  # HF pads after EOS; kiln stops there
        hf_new = hf_new[: hf_new.index(tokenizer.eos_id) + 1]
    kiln_new = generate(model, ids, max_new_tokens=20, temperature=0, eos_id=tokenizer.eos_id)[0]
    assert kiln_new == hf_new
    assert len(kiln_new) == 20 or kiln_new[-1] == tokenizer.eos_id

    # importing the exported folder gives back the checkpoint's weights bit for bit
    cfg2, state = from_hf(out)
    assert same_arch(cfg, cfg2)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_export_overwrite_rules_and_dtype(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    write_checkpoint(tmp_path, tiny(vocab_size=tokenizer.vocab_size, d_model=32, ffn_dim=64))
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    export_checkpoint(tmp_path / "run", out, dtype="bfloat16")  # a previous export is replaced
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not (tmp_path / ".hf.tmp").exists()

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty and is not a previous kiln export"):
        export_checkpoint(tmp_path / "run", tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_export_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    write_checkpoint(tmp_path, tiny(vocab_size=1000))
    with pytest.raises(DataError, match="32768 ids but model.vocab_size is 1000"):
        export_checkpoint(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_deepnorm_checkpoint(tmp_path):
    write_checkpoint(tmp_path, tiny(residual="deepnorm", init="deepnet"))
    with pytest.raises(ExportError, match="model.residual=deepnorm"):
        export_checkpoint(tmp_path / "run", tmp_path / "hf")


def test_export_notes_a_context_longer_than_a_from_scratch_run_trained_on(capsys):
    """The note fires for a run trained from scratch on rows shorter than model.max_seq_len, and not for one
    that started from other weights (post-training, an HF import), which may have seen longer rows before."""
    from kiln.config import load_config
    from kiln.export import context_note

    cfg = load_config("tiny", [])  # max_seq_len 1024, seq_len 256
    context_note(cfg, "max_position_embeddings")
    assert capsys.readouterr().err == ("note: max_position_embeddings is model.max_seq_len (1024); this run trained "
                                       "on 256-token sequences (model.max_seq_len: 256 declares that)\n")
    for over in (["--run.init_from", "/somewhere/step_0"], ["--train.seq_len", "1024"]):
        context_note(load_config("tiny", over), "max_position_embeddings")
        assert capsys.readouterr().err == ""
