"""HF folder -> `kiln import` -> kiln checkpoint -> `kiln export` -> HF folder: logits, tokenizer and chat
template survive the round trip for Llama, Qwen3 and SmolLM3; the imported checkpoint fine-tunes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import run_kiln
from kiln.config import load_config
from kiln.export import ExportError, export_checkpoint, import_hf_folder
from kiln.train import checkpoint as ckpt_io
from test_sft import CHATML, CONVO, tiny_tokenizer

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": True}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"no_rope_layer_interval": 2, "use_sliding_window": False,
                                                       "pad_token_id": None, "bos_token_id": 0, "eos_token_id": 1}),
}


def hf_folder(tmp_path, family: str):
    """A random HF model with non-trivial norms, saved with an HF-written tokenizer that has a chat template."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers has no {model_cls}")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**{**BASE, **extra})).eval()
    with torch.no_grad():
        for _name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
    out = tmp_path / f"hf-{family}"
    model.save_pretrained(out)
    from kiln.data.tokenizer import load_tokenizer

    kiln_tok = load_tokenizer(tiny_tokenizer(tmp_path / "tok"))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=kiln_tok.backend, eos_token="</s>", bos_token="<s>")
    hf_tok.chat_template = CHATML
    hf_tok.save_pretrained(out)
    return model, out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_export_round_trip_keeps_logits_tokens_and_template(tmp_path, family):
    original, src = hf_folder(tmp_path, family)
    run = tmp_path / "run"
    if family == "llama":  # once through the command line, as a user would
        res = run_kiln("import", "--hf", str(src), "--out", str(run), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        ckpt = ckpt_io.resolve_checkpoint(run)
    else:
        ckpt = import_hf_folder(src, run)
    model, cfg, _ = ckpt_io.load_for_inference(run)
    assert cfg.model.qk_norm == (family == "qwen3") and cfg.model.nope_every == (2 if family == "smollm3" else 0)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - logits(original, ids)).abs().max().item() <= 1e-5  # kiln computes what HF does

    back = export_checkpoint(ckpt, tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(again).__name__ == FAMILIES[family][1]
    assert torch.equal(logits(again, ids), logits(original, ids))  # the same weights, bit for bit

    tok_a = transformers.AutoTokenizer.from_pretrained(src)
    tok_b = transformers.AutoTokenizer.from_pretrained(back)
    for text in ["What is 2+3? hello  world", "caf\u00e9 [INST] x</s>"]:
        assert tok_a(text, add_special_tokens=False)["input_ids"] == tok_b(text, add_special_tokens=False)["input_ids"]
    chat_a = tok_a.apply_chat_template(CONVO, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert list(tok_b.apply_chat_template(CONVO, tokenize=True, add_generation_prompt=True)["input_ids"]) == list(chat_a)

    # the run folder's config continues pretraining from the imported weights, into a new folder
    cont = load_config(str(run / "config.yaml"))
    assert cont.run.init_from == str(ckpt.resolve()) and cont.run.out_dir == str(run.resolve()) + "-train"
    assert cont.data.tokenizer == str((run / "tokenizer").resolve())
    from kiln.data.tokenizer import load_tokenizer, tokenizer_digest

    assert ckpt_io.read_meta(ckpt)["tokenizer_digest"] == tokenizer_digest(load_tokenizer(cont.data.tokenizer))


def test_imported_model_fine_tunes_with_its_own_chat_template(tmp_path):
    from kiln.data.tokenizer import load_tokenizer
    from kiln.posttrain.chat import ChatFormat
    from kiln.posttrain.sft import SFTObjective, encode_conversations
    from kiln.train.trainer import train

    _, src = hf_folder(tmp_path, "llama")
    ckpt = import_hf_folder(src, tmp_path / "run")
    cfg = ckpt_io.read_config(ckpt)
    tok = load_tokenizer(cfg.data.tokenizer)
    fmt = ChatFormat.for_config(tok, chat_template="auto", tokenizer_spec=cfg.data.tokenizer)
    assert fmt.name == "tokenizer" and "<|im_start|>" in fmt.render(CONVO)
    convs = encode_conversations([("t", {"messages": CONVO})] * 8, fmt, max_len=64)
    cfg.run.init_from, cfg.run.out_dir = str(ckpt), str(tmp_path / "sft")
    cfg.train.seq_len, cfg.train.max_steps, cfg.train.micro_batch_size, cfg.train.global_batch_size = 64, 2, 2, 2
    cfg.train.sample_tokens = 0
    summary = train(cfg, objective=SFTObjective(convs), quiet=True)
    assert summary["step"] == 2
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["imported_from"] == str(src.resolve())
    with pytest.raises(ExportError, match="already holds checkpoints"):
        import_hf_folder(src, tmp_path / "run")


@pytest.mark.parametrize("scaling", [{"rope_type": "llama3", "factor": 8.0}, {"type": "linear", "factor": 2.0}])
def test_scaled_rope_is_refused(scaling):
    """transformers 4.x keeps Llama 3.x's RoPE scaling in rope_scaling (rope_parameters is 5.x only):
    such a config must not import as plain RoPE with the wrong frequencies."""
    from types import SimpleNamespace

    from kiln.export import _model_config_from_hf

    def config(**kw):
        return SimpleNamespace(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=128,
                               rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, vocab_size=320,
                               **kw)

    assert _model_config_from_hf(config(rope_scaling=None)).rope_theta == 500000.0  # 4.x, plain RoPE
    assert _model_config_from_hf(config(rope_scaling={"rope_type": "default"})).n_layers == 2
    with pytest.raises(ExportError, match="rope_scaling"):
        _model_config_from_hf(config(rope_scaling=scaling))


def test_import_warns_when_the_tokenizer_adds_bos(tmp_path, capsys):
    """kiln never adds BOS; a model whose tokenizer prepends it was trained with it: say so on import."""
    from tokenizers.processors import TemplateProcessing

    _, src = hf_folder(tmp_path, "llama")
    import_hf_folder(src, tmp_path / "plain")
    assert "BOS" not in capsys.readouterr().err
    tok = transformers.AutoTokenizer.from_pretrained(src)
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    tok.save_pretrained(src)
    assert transformers.AutoTokenizer.from_pretrained(src)("a")["input_ids"][0] == bos
    import_hf_folder(src, tmp_path / "bos")
    err = capsys.readouterr().err
    assert "puts <s> before every text" in err and "kiln never adds BOS" in err


def test_damaged_weights_are_one_line_and_write_nothing(tmp_path):
    """An interrupted download or copy (a truncated or empty model.safetensors, a damaged or missing shard)
    is refused in one line naming the file, not a safetensors traceback, and --out stays unwritten."""
    model, src = hf_folder(tmp_path, "llama")
    weights, out = src / "model.safetensors", tmp_path / "run"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    res = run_kiln("import", "--hf", str(src), "--out", str(out), capture_output=True, text=True)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0] == (f"kiln: error: {weights}: damaged or incomplete (Error while deserializing header: "
                        "incomplete metadata, file not fully covered); re-download or re-export it")
    weights.write_bytes(b"")
    with pytest.raises(ExportError, match="model.safetensors: damaged or incomplete .*header too small"):
        import_hf_folder(src, out)

    sharded = tmp_path / "hf-sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    index = sharded / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 1
    shard = sharded / shards[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ExportError, match=f"{shard.name}: damaged or incomplete"):
        import_hf_folder(sharded, out)
    shard.unlink()
    with pytest.raises(ExportError, match=f"{shard.name}: missing \\(listed in model.safetensors.index.json\\)"):
        import_hf_folder(sharded, out)
    index.write_text('{"weight_map": ')
    with pytest.raises(ExportError, match="model.safetensors.index.json: damaged or incomplete"):
        import_hf_folder(sharded, out)
    # its config.json instead of the folder ("no such HF model folder", of a path that is there), a folder
    # without config.json (transformers asked for "a model_type key in its config.json")
    with pytest.raises(ExportError, match=f"^{src / 'config.json'}: a file; --hf takes the model's folder .* such "
                                          f"as --hf {src}$"):
        import_hf_folder(src / "config.json", out)
    (sharded / "config.json").unlink()
    with pytest.raises(ExportError, match=f"^{sharded}: no config.json; --hf takes an HF model folder"):
        import_hf_folder(sharded, out)
    assert not out.exists()


def test_weights_that_do_not_fit_config_json_are_named_by_their_hf_names(tmp_path):
    """A tensor whose shape config.json's sizes do not give was a load_state_dict traceback (exit 1); a missing
    one was named by kiln's key with advice on kiln keys an importing user never sets."""
    from safetensors.torch import load_file, save_file

    _, src = hf_folder(tmp_path, "llama")
    weights, out = src / "model.safetensors", tmp_path / "run"
    good = load_file(str(weights))
    name = "model.layers.0.self_attn.q_proj.weight"
    shape = tuple(good[name].shape)
    save_file({**good, name: good[name][: shape[0] // 2].clone()}, str(weights), metadata={"format": "pt"})
    res = run_kiln("import", "--hf", str(src), "--out", str(out), capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"kiln: error: {src}: weight {name} has shape ({shape[0] // 2}, {shape[1]}), config.json's sizes give "
        f"{shape}; the weights and config.json are of different models"], res.stderr[-2000:]
    gone = "model.layers.1.mlp.down_proj.weight"
    save_file({k: v for k, v in good.items() if k != gone}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=f"^{src}: no weight {gone} among the safetensors files"):
        import_hf_folder(src, out)
    assert not out.exists()


def test_a_tokenizer_too_big_for_the_model_leaves_no_out_folder(tmp_path):
    """The tokenizer's size is known only once its files are copied into <out>/tokenizer: a refused import
    removes what it wrote, so --out is not left half made (and a folder the user had keeps its files)."""
    _, src = hf_folder(tmp_path, "llama")  # a 320-id tokenizer
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256}))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v[:256] if v.shape[0] == 320 else v for k, v in state.items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    line = f"kiln: error: {src}: its tokenizer has 320 ids but the model only 256"
    out = tmp_path / "new" / "run"
    res = run_kiln("import", "--hf", str(src), "--out", str(out), capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [line], res.stderr[-2000:]
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = run_kiln("import", "--hf", str(src), "--out", str(mine), capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [line], res.stderr[-2000:]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_stage_from_an_imported_model_says_its_peak_lr_is_a_stand_in(tmp_path, capsys):
    """An imported model's config carries kiln's default optim.lr, not the peak it was pretrained at; the stage
    LR derived from it was presented as the model's own ("pretraining peak 0.0003 (optim.lr of ...)")."""
    from kiln.posttrain.commands import _stage_parser, stage_config

    _, src = hf_folder(tmp_path, "llama")
    ckpt = import_hf_folder(src, tmp_path / "run")
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CONVO}) + "\n")
    argv = ["--checkpoint", str(tmp_path / "run"), "--data", str(data), "--run.out_dir", str(tmp_path / "sft")]
    args, over = _stage_parser("sft", "").parse_known_args(argv)
    stage_config("sft", args, over)
    err = capsys.readouterr().err
    assert (f"note: {ckpt.resolve()} was imported from {src.resolve()}, whose pretraining peak LR kiln cannot know: "
            "0.0003 (kiln's default optim.lr) stands in for it; pass --posttrain.pretrain_lr PEAK") in err, err
    for given in (["--posttrain.pretrain_lr", "1e-3"], ["--optim.lr", "1e-5"]):  # said: no note
        args, over = _stage_parser("sft", "").parse_known_args([*argv, *given])
        stage_config("sft", args, over)
        assert "stands in" not in capsys.readouterr().err
