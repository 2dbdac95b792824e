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
    with pytest.raises(GenerationError, match="no room"):
        generate_text(model, tok, "hi", max_new_tokens=32, temperature=0)
