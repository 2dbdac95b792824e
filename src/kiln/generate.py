"""Sampling with a KV cache: greedy, temperature, top-k, nucleus (top-p); text and streaming helpers.

Prompts of different lengths are grouped by length and each group decodes as one batch with its
own KV cache (kiln's attention has no padding mask; equal lengths need none), so every row gets
exactly the tokens it would get alone under greedy decoding. Sampling draws from one
torch.Generator per call, seeded by `seed`, so the same prompts and seed give the same tokens.

Length limit: `generate` refuses prompt + max_new_tokens > model.cfg.max_seq_len (GenerationError);
`generate_text` instead keeps the last max_seq_len - max_new_tokens prompt tokens and says so on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

from kiln.errors import KilnError
from kiln.model import KVCache, Transformer


class GenerationError(KilnError):
    """Impossible generation settings: a prompt too long for the model, a bad temperature or top-p."""


def _check_args(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise GenerationError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be within (0, 1], got {top_p}")


def sample_next(logits: Tensor, *, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax, ties to the lowest id)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): the smallest set of tokens whose mass reaches top_p.
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p  # the most likely token is never dropped (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[list[int]] | list[int], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             seed: int | None = None, use_cache: bool = True,
             on_token: Callable[[int], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (a flat list is one prompt). A row stops after emitting `eos_id`,
    which is included in its output. `on_token` sees each new token (single prompt only)."""
    _check_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if isinstance(prompt_ids, Tensor):
        prompt_ids = prompt_ids.tolist()
    flat = not prompt_ids or isinstance(prompt_ids[0], int)
    prompts = [list(prompt_ids)] if flat else [list(p) for p in prompt_ids]
    if on_token is not None and len(prompts) != 1:
        raise GenerationError(f"on_token streams one prompt; got {len(prompts)} prompts")
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile: cached decode changes shapes every step
    cfg = model.cfg
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty; give at least one token")
        if len(p) + max_new_tokens > cfg.max_seq_len:
            raise GenerationError(f"prompt {i} ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                                  f"model.max_seq_len ({cfg.max_seq_len})")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise GenerationError(f"prompt {i} has a token id outside [0, {cfg.vocab_size})")
    param = next(model.parameters())
    gen = torch.Generator(device=param.device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    out: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for length in sorted(groups):  # deterministic order, so one seed always draws the same numbers
        rows = groups[length]
        tokens = torch.tensor([prompts[i] for i in rows], device=param.device)  # (B, T0)
        new = _decode_group(model, tokens, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, eos_id=eos_id, gen=gen, use_cache=use_cache, on_token=on_token)
        for i, ids in zip(rows, new):
            out[i] = ids
    return out


def _decode_group(model: Transformer, tokens: Tensor, *, max_new_tokens: int, temperature: float, top_k: int,
                  top_p: float, eos_id: int | None, gen: torch.Generator, use_cache: bool,
                  on_token: Callable[[int], None] | None) -> list[list[int]]:
    """Decode rows that share one prompt length. tokens (B, T0) -> new ids per row."""
    B, T0 = tokens.shape
    param = next(model.parameters())
    cache = KVCache(model.cfg, B, T0 + max_new_tokens, device=param.device, dtype=param.dtype) if use_cache else None
    done = [False] * B  # rows that emitted eos_id keep decoding in the batch, but their tokens are dropped
    new: list[list[int]] = [[] for _ in range(B)]
    seq, step_in = tokens, tokens  # full sequence so far; what the next forward consumes
    for _ in range(max_new_tokens):
        logits = model(step_in, cache=cache) if cache is not None else model(seq)  # (B, T, V)
        nxt = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)  # (B,)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                new[b].append(t)
                done[b] = t == eos_id
                if on_token is not None:
                    on_token(t)
        if all(done):
            break
        step_in = nxt[:, None]  # (B, 1)
        seq = torch.cat([seq, step_in], dim=1)
    return new


def _fit_prompt(ids: list[int], *, max_new_tokens: int, max_seq_len: int) -> list[int]:
    room = max_seq_len - max_new_tokens
    if room < 1:
        raise GenerationError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt within "
                              f"model.max_seq_len ({max_seq_len})")
    if len(ids) > room:
        print(f"note: prompt truncated from the left to its last {room} of {len(ids)} tokens "
              f"(model.max_seq_len {max_seq_len} - max_new_tokens {max_new_tokens})", file=sys.stderr)
        return ids[-room:]
    return ids


def generate_text(model: Transformer, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stream: bool = False) -> str:
    """Continuation of `prompt` as text (without the prompt; a final EOS is not rendered).

    The prompt gets no BOS (kiln trains documents without one); an empty prompt starts from EOS, the
    document separator. With `stream`, text is printed to stdout as it is generated.
    """
    cfg = getattr(model, "_orig_mod", model).cfg
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    ids = _fit_prompt(ids, max_new_tokens=max_new_tokens, max_seq_len=cfg.max_seq_len)
    # Decode prompt + new tokens and cut the prompt's text off: decoding the new tokens alone can
    # drop a leading space (SentencePiece) or split a multi-byte character.
    base = tokenizer.decode(ids)
    printed = 0
    new: list[int] = []

    def text_of(tokens: list[int]) -> str:
        full = tokenizer.decode(ids + tokens)
        return full[len(base):] if full.startswith(base) else tokenizer.decode(tokens)

    def show(tok: int) -> None:
        nonlocal printed
        new.append(tok)
        if tok == tokenizer.eos_id:
            return
        text = text_of(new)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            return
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
        printed = len(text)

    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=tokenizer.eos_id, seed=seed, on_token=show if stream else None)[0]
    if out and out[-1] == tokenizer.eos_id:
        out = out[:-1]
    text = text_of(out)
    if stream and len(text) > printed:
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
    return text
