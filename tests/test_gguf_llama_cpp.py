"""GGUF export proven by llama.cpp itself (through llama-cpp-python): it loads kiln's files, tokenizes
text as kiln does, gives kiln's log-probs, and continues prompts greedily with kiln's tokens.

Marked `external`: llama-cpp-python compiles llama.cpp (10+ minutes on 2 cores), so CI does not install
it; `make test-gguf` does and runs these. Skipped with a reason when `llama_cpp` does not import.

Models: random ones with the default tokenizer (mistral-v3) for each architecture llama.cpp gets
(llama, qwen3 for QK-norm, smollm3 for NoPE), and one briefly trained on the bundled corpus with a
small SentencePiece-style BPE trained here, for greedy text that is not degenerate. The measured
differences are printed (GGUF-PARITY lines); the bounds asserted are a few times the measured ones.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_kiln
from kiln.config import Config, ModelConfig, TrainConfig
from kiln.convert.gguf import export_gguf
from kiln.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from kiln.generate import generate
from kiln.model import Transformer, build_model
from kiln.train.checkpoint import load_for_inference, save_checkpoint

pytestmark = [pytest.mark.external, pytest.mark.slow]  # minutes in all: a trained model, 20+ files
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-gguf builds it)",
                                exc_type=ImportError)

CORPUS = ROOT / "src" / "kiln" / "data" / "corpus"
PROMPTS = ["It is a truth universally acknowledged", "KING HENRY.", "She said that", "The house was",
           "My lord, I", "When the"]
# max |log p_llama.cpp - log p_kiln| over every position and every vocabulary entry, kiln at fp32. Measured
# (llama.cpp 0.3.36 build, fp32 KV cache, the random models below): f32 7.3e-6, f16 7.4e-3, bf16 6.8e-2,
# q8_0 2.3e-1 (q8_0 quantizes the activations too). llama.cpp's default f16 KV cache alone gives 2.5e-3 at f32.
LOGP_TOL = {"f32": 1e-4, "f16": 3e-2, "bf16": 0.25, "q8_0": 0.6}


def docs(split: str, n: int) -> list[str]:
    out = []
    for line in gzip.open(CORPUS / f"{split}.jsonl.gz", "rt"):
        out.append(json.loads(line)["text"])
        if len(out) == n:
            break
    return out


def paragraphs(n: int = 400) -> list[str]:
    """Held-out text: the bundled validation split, four paragraphs at a time."""
    out = []
    for doc in docs("val", 100):
        paras = doc.split("\n\n")
        out += ["\n\n".join(paras[i:i + 4]) for i in range(0, len(paras), 4)]
    return [t for t in out if t.strip()][:n]


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\nGGUF-PARITY {line}")


def sentencepiece_bpe(out_dir: Path, *, vocab: int = 1024) -> Tokenizer:
    """A SentencePiece-style BPE (Metaspace, byte fallback), the kind `kiln tokenizer train` writes."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(docs("train", 40), trainer=trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                                                          show_progress=False))
    Tokenizer(tk, name=str(out_dir), eos_token="</s>", bos_token="<s>", unk_token="<unk>").save_hf(out_dir)
    return load_tokenizer(str(out_dir))


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = build_model(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # non-trivial norm weights, so a misplaced norm cannot hide
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def save(root: Path, model: Transformer, cfg: ModelConfig, tokenizer: str) -> Path:
    config = Config(model=cfg, train=TrainConfig(seq_len=64))
    config.data.tokenizer = tokenizer
    return save_checkpoint(root / "checkpoints", 1, model=model, cfg=config, train_state={}, meta={})


def train_briefly(tok: Tokenizer, *, steps: int = 300) -> Transformer:
    """A few hundred AdamW steps on the bundled training split: greedy text that is not degenerate."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=256)
    ids = torch.tensor(tok.encode("\n\n".join(docs("train", 40))[:200_000]))
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    gen, T, B = torch.Generator().manual_seed(0), 64, 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 on a shared 2-core machine, for a model this small
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - T - 1, (B,), generator=gen).tolist()
            x = torch.stack([ids[s:s + T] for s in starts])
            y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
            loss = model(x, targets=y) / y.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def trained(work) -> Path:
    """Run folder of the briefly trained llama-layout model (SentencePiece-style BPE, vocab 1024)."""
    tok = sentencepiece_bpe(work / "sp-bpe")
    model = train_briefly(tok)
    save(work / "trained", model, model.cfg, str(work / "sp-bpe"))
    return work / "trained"


RANDOM = {"llama": dict(), "qwen3": dict(qk_norm=True, tie_embeddings=False), "smollm3": dict(nope_every=4),
          "llama-head-dim": dict(d_model=72, head_dim=32, embed_scale=True)}


@pytest.fixture(scope="session")
def random_runs(work) -> dict[str, Path]:
    runs = {}
    for name, kw in RANDOM.items():
        cfg = ModelConfig(**{**dict(vocab_size=32768, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                    max_seq_len=512, norm_eps=1e-6, init_std=0.1, rope_theta=5000.0), **kw})
        save(work / name, random_model(cfg), cfg, "mistral-v3")
        runs[name] = work / name
    return runs


class LlamaCpp:
    """A llama.cpp model with fp32 KV cache (its default f16 cache would add its own rounding).

    quantized: without llama.cpp's extra CPU buffer types (AMX / repacked weights), whose q8_0 matmul
    segfaults on this machine's AMX CPU for llama.cpp's own quantized files too (llama.cpp#20824)."""

    def __init__(self, path: Path, *, n_ctx: int = 512, quantized: bool = False):
        import llama_cpp.llama_cpp as low

        default = low.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = not quantized
            return p

        low.llama_model_default_params = params  # Llama() takes no such argument; it starts from these
        try:
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0, n_threads=2,
                                       seed=0, verbose=False)
        finally:
            low.llama_model_default_params = default

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True, special=False)  # add_bos: as the file says

    def logprobs(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        logits = torch.tensor(np.array(self.llm.scores[: len(ids)]), dtype=torch.float64)
        return torch.log_softmax(logits, -1).numpy()

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """llama.cpp's own greedy sampler (temp 0, no penalties)."""
        out = []
        for t in self.llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(t)
            if t == self.llm.token_eos() or len(out) == n:
                break
        return out

    def close(self):
        self.llm.close()


def kiln_logprobs(model: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1).numpy()


@pytest.mark.parametrize("name", list(RANDOM))
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_logprobs_match_kiln(name, dtype, random_runs, work, capsys):
    run = random_runs[name]
    out = export_gguf(run, work / f"{name}-{dtype}.gguf", dtype=dtype)
    model, cfg, _ = load_for_inference(run)
    tok = load_tokenizer(cfg.data.tokenizer)
    ids = tok.encode(" ".join(paragraphs(3)))[:400]
    llm = LlamaCpp(out, quantized=dtype == "q8_0")
    try:
        assert llm.tokenize(tok.decode(ids[:50])) == ids[:50]
        ours, theirs = kiln_logprobs(model, ids), llm.logprobs(ids)
        targets = ids[1:]
        full = np.abs(ours - theirs).max()
        picked = np.abs(ours[np.arange(len(targets)), targets] - theirs[np.arange(len(targets)), targets]).max()
        top1 = (ours.argmax(-1) == theirs.argmax(-1)).mean()
        report(capsys, f"{name} {dtype}: max|dlogp| all vocab {full:.2e}, next tokens {picked:.2e}, "
                       f"argmax agreement {top1:.3f} over {len(ids)} positions")
        assert full < LOGP_TOL[dtype]
        if dtype == "f32":
            assert top1 == 1.0
            new = generate(model, ids[:20], max_new_tokens=40, temperature=0, eos_id=tok.eos_id)[0]
            assert llm.greedy(ids[:20], 40) == new
    finally:
        llm.close()


def test_trained_model_greedy_equals_kiln_generate(trained, work, capsys):
    """f32: llama.cpp's greedy continuation of each prompt is kiln's, token for token, and its text is what
    `kiln generate --temperature 0` prints."""
    out = work / "trained-f32.gguf"
    res = run_kiln("export", "--checkpoint", str(trained), "--format", "gguf", "--out", str(out),
                   capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    model, cfg, _ = load_for_inference(trained)
    tok = load_tokenizer(cfg.data.tokenizer)
    llm = LlamaCpp(out)
    try:
        seen: set[int] = set()
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            assert llm.tokenize(prompt) == ids, prompt
            ours = generate(model, ids, max_new_tokens=48, temperature=0, eos_id=tok.eos_id)[0]
            assert len(set(ours)) >= 5, f"degenerate continuation of {prompt!r}: {tok.decode(ours)!r}"
            seen |= set(ours)
            assert llm.greedy(ids, 48) == ours, prompt
            report(capsys, f"trained f32 greedy {prompt!r} -> {tok.decode(ids + ours)[len(prompt):][:70]!r}")
        assert len(seen) > 24  # the prompts lead to different text
        prompt = PROMPTS[0]
        cli = run_kiln("generate", "--checkpoint", str(trained), "--prompt", prompt, "--temperature",
                       "0", "--max-new-tokens", "32", capture_output=True, text=True, timeout=600)
        assert cli.returncode == 0, cli.stderr
        text = llm.llm.create_completion(prompt, max_tokens=32, temperature=0.0, repeat_penalty=1.0)["choices"][0]
        assert cli.stdout[:-1] == prompt + text["text"]
        report(capsys, f"trained f32 greedy: {len(PROMPTS)} prompts x 48 tokens equal; {prompt!r} ->"
                       f" {text['text'][:60]!r}")
    finally:
        llm.close()


def test_trained_model_q8_0_agrees_on_most_tokens(trained, work, capsys):
    """q8_0: llama.cpp's argmax along kiln's fp32 greedy continuation (teacher-forced), and its free-running
    greedy continuation against kiln's; quantized, so agreement is reported, not required to be exact."""
    out = export_gguf(trained, work / "trained-q8_0.gguf", dtype="q8_0")
    model, cfg, _ = load_for_inference(trained)
    tok = load_tokenizer(cfg.data.tokenizer)
    llm = LlamaCpp(out, quantized=True)
    forced = same_free = total = 0
    try:
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            ours = generate(model, ids, max_new_tokens=48, temperature=0, eos_id=tok.eos_id)[0]
            seq = ids + ours
            theirs = llm.logprobs(seq).argmax(-1)[len(ids) - 1: len(seq) - 1]
            forced += int((theirs == np.array(ours)).sum())
            free = llm.greedy(ids, len(ours))
            same_free += next((i for i, (a, b) in enumerate(zip(free, ours)) if a != b), len(ours))
            total += len(ours)
    finally:
        llm.close()
    report(capsys, f"trained q8_0: teacher-forced argmax agreement {forced}/{total}; free-running greedy "
                   f"common prefix {same_free}/{total} tokens")
    assert forced / total > 0.8


@pytest.mark.parametrize("kind", ["mistral-v3", "sentencepiece-bpe", "bytelevel-bpe"])
def test_llama_cpp_tokenizes_held_out_text_as_kiln(kind, work, capsys):
    if kind == "mistral-v3":
        tok = load_tokenizer("mistral-v3")
    elif kind == "sentencepiece-bpe":
        tok = sentencepiece_bpe(work / "sp-bpe-tok", vocab=2000)
    else:
        text = work / "train.txt"
        text.write_text("\n\n".join(docs("train", 40)))
        tok = train_bpe([text], vocab_size=2000, out_dir=work / "bytelevel")
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32,
                      max_seq_len=64)
    run = work / f"tok-{kind}"
    save(run, random_model(cfg), cfg, "mistral-v3" if kind == "mistral-v3" else tok.name)
    out = export_gguf(run, work / f"tok-{kind}.gguf")
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        texts = paragraphs()
        same = sum(llm.tokenize(t.encode(), add_bos=True, special=False) == tok.encode(t) for t in texts)
        back = sum(llm.detokenize(tok.encode(t)).decode() in (t, " " + t) for t in texts)
    finally:
        llm.close()
    report(capsys, f"tokenizer {kind}: {same}/{len(texts)} held-out paragraphs tokenized identically "
                   f"({sum(map(len, texts))} characters), {back} detokenized back")
    assert same == len(texts) and back == len(texts)


def test_q8_0_is_byte_identical_to_llama_cpp_quantizing_the_f32_file(random_runs, work):
    """llama.cpp's own quantizer (llama_model_quantize, as llama-quantize runs it) on kiln's f32 file gives
    the very bytes kiln's q8_0 export wrote, tensor for tensor."""
    import ctypes

    import gguf

    f32 = export_gguf(random_runs["qwen3"], work / "quant-f32.gguf", dtype="f32")
    ours = export_gguf(random_runs["qwen3"], work / "quant-ours.gguf", dtype="q8_0")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType.MOSTLY_Q8_0
    theirs = work / "quant-llama-cpp.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.asarray(a[name].data).tobytes() == np.asarray(b[name].data).tobytes(), name


def test_chat_prompt_tokens_equal_kiln(random_runs, work):
    """llama-cpp-python's chat formatter renders the file's chat template; llama.cpp tokenizes that into the
    tokens kiln trains and prompts with (kiln's template, Mistral control tokens)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from kiln.posttrain.chat import ChatFormat
    from test_gguf import CHAT

    out = export_gguf(random_runs["llama"], work / "chat.gguf")
    tok = load_tokenizer("mistral-v3")
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        template = llm.metadata["tokenizer.chat_template"]
        for n in (2, 4):
            prompt = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")(messages=CHAT[:n]).prompt
            ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            assert ids == ChatFormat(tok).prompt_ids(CHAT[:n]), prompt
    finally:
        llm.close()
