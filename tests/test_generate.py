"""Generation: KV cache against full recompute, sampling filters and seeds, EOS, batching, text streaming."""

from __future__ import annotations

import pytest
import torch

from kiln.config import ModelConfig
from kiln.generate import GenerationError, generate, generate_text, sample_next
from kiln.model import KVCache, Transformer, build_model

CONFIGS = {
    "gqa": dict(),
    "mha-untied": dict(n_kv_heads=4, tie_embeddings=False),
    "qk-norm": dict(qk_norm=True, head_dim=24),
    "nope": dict(nope_every=2, n_layers=4),
    "embed-scale": dict(embed_scale=True, init="trunc_normal"),
    "eager": dict(attention="eager"),
}


def tiny_model(seed: int = 0, **kw) -> Transformer:
    # init_std 0.1 makes the logits peaked, so greedy choices are far from ties
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                init_std=0.1)
    return build_model(ModelConfig(**{**base, **kw}), seed=seed).eval()


PROMPTS = [[5, 17, 99, 3, 42], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [8, 9, 10, 11, 12]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_with_and_without_cache_match(name):
    model = tiny_model(**CONFIGS[name])
    cached = generate(model, PROMPTS, max_new_tokens=24, temperature=0)
    full = generate(model, PROMPTS, max_new_tokens=24, temperature=0, use_cache=False)
    assert cached == full
    assert all(len(row) == 24 for row in cached)
    assert len({tuple(r) for r in cached}) > 1  # not a degenerate model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_logits_equal_full_recompute(name):
    model = tiny_model(**CONFIGS[name])
    cfg = model.cfg
    seq = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)  # (B, T, V)
        cache = KVCache(cfg, 2, 20, device=seq.device, dtype=torch.float32)
        prefill = model(seq[:, :8], cache=cache)
        assert (prefill - full[:, :8]).abs().max().item() <= 1e-5
        for t in range(8, 20):
            step = model(seq[:, t : t + 1], cache=cache)  # (B, 1, V)
            assert cache.pos == t + 1
            assert (step[:, 0] - full[:, t]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["gqa", "qk-norm", "nope", "eager", "flex"])
def test_mixed_length_prompts_decode_in_one_batch_as_each_would_alone(name):
    """Prompts of several lengths share one batch, left-padded: the pad keys are masked and RoPE starts at
    each prompt's first token, so every row's logits at every step are its own, alone, unpadded
    (cached: KVCache.pad; uncached: the padding is a document of its own)."""
    model = tiny_model(**(CONFIGS.get(name) or dict(attention="flex")))
    batch = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    alone = [generate(model, p, max_new_tokens=12, temperature=0)[0] for p in PROMPTS]
    assert batch == alone == generate(model, PROMPTS, max_new_tokens=12, temperature=0, use_cache=False)
    # the logits themselves, step by step, for the longest and the shortest prompt
    long, short = PROMPTS[2], PROMPTS[1]
    pad = len(long) - len(short)
    cache = KVCache(model.cfg, 2, 24, device="cpu", dtype=torch.float32)
    cache.pad = torch.tensor([0, pad])
    seqs = [list(long), list(short)]
    with torch.no_grad():
        step = model(torch.tensor([long, [short[0]] * pad + short]), cache=cache)[:, -1]
        for _ in range(6):
            for row, want in zip(step, (model(torch.tensor([s]))[0, -1] for s in seqs)):
                assert (row - want).abs().max() <= 1e-5
            nxt = step.argmax(-1)
            for s, t in zip(seqs, nxt.tolist()):
                s.append(t)
            step = model(nxt[:, None], cache=cache)[:, -1]


def test_seed_reproducible_and_different_seeds_differ():
    model = tiny_model()
    a = generate(model, PROMPTS, max_new_tokens=32, temperature=1.0, seed=11)
    b = generate(model, PROMPTS, max_new_tokens=32, temperature=1.0, seed=11)
    c = generate(model, PROMPTS, max_new_tokens=32, temperature=1.0, seed=12)
    assert a == b
    assert a != c
    # the cache does not change what is sampled
    assert generate(model, PROMPTS, max_new_tokens=32, temperature=1.0, seed=11, use_cache=False) == a


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model(qk_norm=True)
    greedy = generate(model, PROMPTS, max_new_tokens=16, temperature=0)
    assert generate(model, PROMPTS, max_new_tokens=16, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate(model, PROMPTS, max_new_tokens=16, temperature=1.5, top_p=1e-6, seed=4) == greedy


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).expand(2000, 4)  # (N, V)
    gen = torch.Generator().manual_seed(0)

    def drawn(**kw) -> set[int]:
        return set(sample_next(logits, temperature=1.0, generator=gen, **{"top_k": 0, "top_p": 1.0, **kw}).tolist())

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {1, 3}
    assert drawn(top_k=3) == {1, 2, 3}
    assert drawn(top_p=0.8) == {1, 3}  # 0.5 + 0.3 reaches 0.8
    assert drawn(top_p=0.81) == {1, 2, 3}
    assert drawn(top_p=0.5) == {1}
    assert sample_next(logits[:1], temperature=0, top_k=0, top_p=1.0, generator=None).tolist() == [1]


def test_eos_stops_each_row_independently():
    model = tiny_model()
    free = generate(model, PROMPTS[:2], max_new_tokens=20, temperature=0)
    eos = free[0][3]  # row 0 emits it as its 4th token
    out = generate(model, PROMPTS[:2], max_new_tokens=20, temperature=0, eos_id=eos)

    def cut(row: list[int]) -> list[int]:
        return row[: row.index(eos) + 1] if eos in row else row

    assert out == [cut(r) for r in free]
    assert out[0][-1] == eos and len(out[0]) <= 4
    # with every row stopped early, decoding ends early
    single = generate(model, PROMPTS[0], max_new_tokens=20, temperature=0, eos_id=eos)
    assert single == [out[0]]


def test_batched_prompts_of_different_lengths_match_running_each_alone():
    model = tiny_model(nope_every=2, n_layers=4)
    batched = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    alone = [generate(model, p, max_new_tokens=12, temperature=0)[0] for p in PROMPTS]
    assert batched == alone


def test_on_token_sees_every_new_token():
    model = tiny_model()
    seen: list[int] = []
    out = generate(model, PROMPTS[0], max_new_tokens=10, temperature=0.7, seed=1, on_token=seen.append)
    assert seen == out[0]
    with pytest.raises(GenerationError, match="one prompt"):
        generate(model, PROMPTS, max_new_tokens=2, on_token=seen.append)


def test_bad_arguments_are_clear_errors():
    model = tiny_model()
    with pytest.raises(GenerationError, match=r"exceeds model.max_seq_len \(64\)"):
        generate(model, [1] * 60, max_new_tokens=5)
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, [1], max_new_tokens=5, temperature=-1)
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, [1], max_new_tokens=5, top_p=0)
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [], max_new_tokens=5)
    with pytest.raises(GenerationError, match="outside"):
        generate(model, [500], max_new_tokens=5)
    assert generate(model, [[1], [2, 3]], max_new_tokens=0) == [[], []]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS 256: multi-byte characters span several tokens."""

    eos_id, bos_id, vocab_size = 256, None, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def test_generate_text_streams_what_it_returns(capsys):
    model = tiny_model(vocab_size=257, max_seq_len=128)
    tok = ByteTokenizer()
    for seed in range(4):
        text = generate_text(model, tok, "caf\u00e9 ", max_new_tokens=40, temperature=1.0, seed=seed, stream=True)
        assert capsys.readouterr().out == text
    quiet = generate_text(model, tok, "caf\u00e9 ", max_new_tokens=40, temperature=1.0, seed=3)
    assert capsys.readouterr().out == "" and quiet == text
    ids = generate(model, tok.encode("caf\u00e9 "), max_new_tokens=40, temperature=1.0, seed=3, eos_id=256)[0]
    assert text == tok.decode(ids)


def test_generate_text_truncates_a_long_prompt_from_the_left(capsys):
    model = tiny_model(vocab_size=257, max_seq_len=32)
    tok = ByteTokenizer()
    long = "x" * 50 + "tail"
    text = generate_text(model, tok, long, max_new_tokens=8, temperature=0)
    assert "truncated from the left to its last 24 of 54 tokens" in capsys.readouterr().err
    assert text == generate_text(model, tok, long[-24:], max_new_tokens=8, temperature=0)
    with pytest.raises(GenerationError, match=r"^max_new_tokens 32 leaves no room .* \(32\) \(kiln generate / chat: "
                                              r"--max-new-tokens\); ask for at most 31$"):
        generate_text(model, tok, "hi", max_new_tokens=32, temperature=0)


# ---- repetition penalty, stop strings, batched text (post-training features) ----------------


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(penalty):
    from kiln.export import to_hf_model

    model = tiny_model(vocab_size=64, init_std=0.05)
    hf = to_hf_model(model, model.cfg)
    for prompt in PROMPTS[:3]:
        prompt = [t % 64 for t in prompt]
        ours = generate(model, prompt, max_new_tokens=16, temperature=0, repetition_penalty=penalty)[0]
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=penalty,
                          eos_token_id=None, pad_token_id=0)
        assert ours == out[0, len(prompt):].tolist()
    plain = generate(model, [3, 1, 4, 1, 5], max_new_tokens=16, temperature=0)
    strong = generate(model, [3, 1, 4, 1, 5], max_new_tokens=16, temperature=0, repetition_penalty=5.0)
    assert strong != plain  # the penalty is not a no-op


def test_repetition_penalty_closed_form():
    from kiln.generate import apply_repetition_penalty

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    with pytest.raises(GenerationError, match="repetition_penalty"):
        generate(tiny_model(), [1], max_new_tokens=2, repetition_penalty=0)


def test_stop_strings_end_generation_and_are_not_returned(capsys):
    model = tiny_model(vocab_size=257, max_seq_len=128)
    tok = ByteTokenizer()
    full = generate_text(model, tok, "ab", max_new_tokens=40, temperature=0)
    stop = full[5:7]  # a string the greedy continuation contains
    assert len(stop) == 2 and full.find(stop) >= 0
    cut = full[:full.find(stop)]
    text = generate_text(model, tok, "ab", max_new_tokens=40, temperature=0, stop=[stop, "\x00never"], stream=True)
    assert text == cut and capsys.readouterr().out == cut  # the held-back tail is never printed
    ids = generate(model, tok.encode("ab"), max_new_tokens=40, temperature=0,
                   stop=lambda new: stop in tok.decode(new))[0]
    assert len(ids) < 40 and tok.decode(ids).endswith(stop)  # decoding stopped right there


def test_generate_texts_batches_prompts_like_one_at_a_time():
    from kiln.generate import generate_texts

    model = tiny_model(vocab_size=257, max_seq_len=128)
    tok = ByteTokenizer()
    prompts = ["ab", "hello", "xy", "hello"]
    batched = generate_texts(model, tok, [tok.encode(p) for p in prompts], max_new_tokens=12, temperature=0,
                             stop=["q"])
    alone = [generate_text(model, tok, p, max_new_tokens=12, temperature=0, stop=["q"]) for p in prompts]
    assert batched == alone


def test_generate_unwraps_ddp():
    """A DDP-wrapped policy (the trainer's model under data parallelism) generates like the bare model."""
    import tempfile

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_model()
    want = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            assert generate(DistributedDataParallel(model), PROMPTS, max_new_tokens=6, temperature=0) == want
        finally:
            dist.destroy_process_group()


def test_decoding_runs_eagerly_in_a_compiled_model():
    """kiln compiles Blocks in place (train.compile); every decode step has a new shape, so decoding
    must not run (and recompile) the compiled code. Training forwards still do afterwards."""
    from kiln.parallel.compile_ac import apply_compile

    compiles = []

    def backend(gm, example_inputs):
        compiles.append(len(example_inputs))
        return gm.forward

    model = tiny_model()
    want = generate(model, PROMPTS[:2], max_new_tokens=5, temperature=0)
    apply_compile(model, "block", backend=backend)
    torch._dynamo.reset()
    try:
        assert generate(model, PROMPTS[:2], max_new_tokens=5, temperature=0) == want
        assert compiles == []
        with torch.no_grad():
            model(torch.tensor([PROMPTS[0]]))
        assert compiles  # the stance is restored after decoding
    finally:
        torch._dynamo.reset()


def test_cached_decoding_does_not_rebuild_the_sequence(monkeypatch):
    """With the KV cache each step feeds one token; the growing full sequence is only built without it."""
    real_cat, token_cats = torch.cat, []

    def cat(tensors, *args, **kwargs):
        if all(not t.is_floating_point() for t in tensors):
            token_cats.append(len(tensors))
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", cat)
    model = tiny_model()
    generate(model, [PROMPTS[0]], max_new_tokens=8, temperature=0, use_cache=False)
    assert len(token_cats) == 8  # the counter sees the uncached path's concatenations
    token_cats.clear()
    generate(model, [PROMPTS[0]], max_new_tokens=8, temperature=0)
    assert token_cats == []
