"""Sampling with a KV cache: greedy, temperature, top-k, nucleus (top-p), repetition penalty, stop
conditions; text, batched-text and streaming helpers.

Prompts of different lengths decode as one batch, left-padded: the KV cache carries each row's
padding (`KVCache.pad`), which no query attends to, and RoPE positions start at each prompt's first
token, so every row's logits are those it would get alone (tested to 1e-5) and greedy decoding
gives exactly its tokens. Masked decoding runs through sdpa whatever `model.attention` is (flex's
and flash-attn's causal masks know no padding). Decoding runs eagerly
(torch.compiler.set_stance("force_eager")): a model compiled for training would recompile for every
new sequence length. A DDP-wrapped model is unwrapped; FSDP and tensor-parallel models are not
supported (the KV cache holds every head, and ranks would decode different numbers of steps). Sampling draws from one
torch.Generator per call, seeded by `seed`, so the same prompts and seed give the same tokens.

Repetition penalty (Keskar et al. 2019, CTRL), as transformers applies it: before temperature and
the filters, the logit of every token already in the row (prompt included) is divided by the
penalty when positive and multiplied by it when negative.

Stop conditions: a row also ends when `stop(row_new_tokens)` is True; the text helpers build that
from stop strings and cut the text before the first stop string.

Length limit: `generate` refuses prompt + max_new_tokens > model.cfg.max_seq_len (GenerationError);
`generate_text` instead keeps the last max_seq_len - max_new_tokens prompt tokens and says so on stderr.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kiln.errors import KilnError
from kiln.model import KVCache, Transformer
from kiln.parallel.parallelize import unwrap


class GenerationError(KilnError):
    """Impossible generation settings: a prompt too long for the model, a bad temperature or top-p."""


def check_args(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                repetition_penalty: float = 1.0) -> None:
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:  # inf would sample every token alike, whatever the model says
        raise GenerationError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be within (0, 1], got {top_p}")
    if not 0 < repetition_penalty < math.inf:
        raise GenerationError(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}")


def check_flags(args: Any) -> None:
    """check_args on a command's parsed flags (kiln generate, kiln chat), before a model loads; an error names
    the flag as typed (--top-p), not the parameter."""
    try:
        check_args(max_new_tokens=getattr(args, "max_new_tokens", None) or 1, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    except GenerationError as e:  # "top_p must be ..." -> "--top-p must be ..."
        key, rest = str(e).split(" ", 1)
        raise GenerationError(f"--{key.replace('_', '-')} {rest}") from None


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """logits (B, V) float, seen (B, V) bool -> penalised logits (CTRL: divide positive, multiply negative)."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def sample_next(logits: Tensor, *, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None, seen: Tensor | None = None,
                repetition_penalty: float = 1.0) -> Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax, ties to the lowest id).
    `seen` (B, V) marks tokens already in each row, for the repetition penalty."""
    logits = logits.double()  # a temperature or penalty of 1e-300 is 0 as a float32 (x / 0: inf, 0 / 0: nan)
    if seen is not None:  # a tiny penalty can overflow a logit to inf: the largest float keeps it the largest
        logits = apply_repetition_penalty(logits, seen, repetition_penalty).clamp(max=torch.finfo(torch.float64).max)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # from the row's maximum (0) down, so a tiny temperature makes the others -inf, not the maximum inf (nan)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
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
             seed: int | None = None, use_cache: bool = True, repetition_penalty: float = 1.0,
             stop: Callable[[list[int]], bool] | None = None,
             on_token: Callable[[int], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (a flat list is one prompt). A row stops after emitting `eos_id`,
    which is included in its output, or once `stop(its new tokens)` is True. `on_token` sees each new
    token (single prompt only)."""
    check_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty)
    if isinstance(prompt_ids, Tensor):
        prompt_ids = prompt_ids.tolist()
    flat = not prompt_ids or isinstance(prompt_ids[0], int)
    prompts = [list(prompt_ids)] if flat else [list(p) for p in prompt_ids]
    if on_token is not None and len(prompts) != 1:
        raise GenerationError(f"on_token streams one prompt; got {len(prompts)} prompts")
    model = unwrap(model)  # the Transformer (and its cfg) inside DDP or a whole-model torch.compile wrapper
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
    # one batch: shorter prompts are left-padded and their pad positions never attended to (a masked
    # prefix in the KV cache, or a document of its own without it); RoPE positions start at each
    # prompt's first token, so a row decodes as it would alone
    length = max(len(p) for p in prompts)
    pad = [length - len(p) for p in prompts]
    tokens = torch.tensor([[p[0]] * n + p for p, n in zip(prompts, pad)], device=param.device)  # (B, T0)
    # kiln compiles Blocks or the trunk in place (train.compile), which the unwrap above cannot undo;
    # every cached decode step has a new shape, so compiled code would recompile at each one
    with torch.compiler.set_stance("force_eager"):
        return _decode_group(model, tokens, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_id=eos_id, gen=gen, use_cache=use_cache, on_token=on_token,
                             repetition_penalty=repetition_penalty, stop=stop, pad=pad if any(pad) else None)


def _decode_group(model: Transformer, tokens: Tensor, *, max_new_tokens: int, temperature: float, top_k: int,
                  top_p: float, eos_id: int | None, gen: torch.Generator, use_cache: bool,
                  on_token: Callable[[int], None] | None, repetition_penalty: float = 1.0,
                  stop: Callable[[list[int]], bool] | None = None, pad: list[int] | None = None) -> list[list[int]]:
    """Decode one batch of prompts. tokens (B, T0), row b left-padded by pad[b] -> new ids per row."""
    B, T0 = tokens.shape
    param = next(model.parameters())
    cache = KVCache(model.cfg, B, T0 + max_new_tokens, device=param.device, dtype=param.dtype) if use_cache else None
    docs = None  # uncached and padded: the padding is document 0, the prompt and its continuation document 1
    if pad is not None:
        pad_t = torch.tensor(pad, device=param.device)
        if cache is not None:
            cache.pad = pad_t
        else:
            docs = (torch.arange(T0, device=param.device)[None] >= pad_t[:, None]).to(torch.int32)  # (B, T0)
    done = [False] * B  # rows that emitted eos_id keep decoding in the batch, but their tokens are dropped
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=tokens.device)  # (B, V)
        for b in range(B):  # the prompt's own tokens, not its padding
            seen[b, tokens[b, (pad[b] if pad else 0):]] = True
    new: list[list[int]] = [[] for _ in range(B)]
    seq, step_in = tokens, tokens  # full sequence so far; what the next forward consumes
    for _ in range(max_new_tokens):
        logits = model(step_in, cache=cache) if cache is not None else model(seq, docs)  # (B, T, V)
        nxt = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                          seen=seen, repetition_penalty=repetition_penalty)  # (B,)
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                new[b].append(t)
                done[b] = t == eos_id or (stop is not None and stop(new[b]))
                if on_token is not None:
                    on_token(t)
        if all(done):
            break
        step_in = nxt[:, None]  # (B, 1)
        if cache is None:  # only the uncached path re-reads the whole sequence
            seq = torch.cat([seq, step_in], dim=1)
            if docs is not None:
                docs = torch.cat([docs, torch.ones_like(docs[:, :1])], dim=1)
    return new


def continuation_text(tokenizer, prompt: list[int], tokens: list[int], *, base: str | None = None) -> str:
    """The text `tokens` add after `prompt` (`base`: tokenizer.decode(prompt), when already known).

    Decodes prompt + tokens and cuts the prompt's text off: decoding the new tokens alone can drop a
    leading space (SentencePiece) or split a multi-byte character.
    """
    base = tokenizer.decode(prompt) if base is None else base
    full = tokenizer.decode(list(prompt) + list(tokens))
    return full[len(base):] if full.startswith(base) else tokenizer.decode(tokens)


def prompt_room(max_new_tokens: int, max_seq_len: int, *, setting: str, of: str = "",
                suggest: int | None = None) -> int:
    """The tokens a prompt may have once `max_new_tokens` are kept for the reply within the context; none is one
    line naming `setting` (the flag or key the user set; `of`: whose context, `suggest`: a value that fits)."""
    room = max_seq_len - max_new_tokens
    if room < 1:
        raise GenerationError(f"{setting} {max_new_tokens} leaves no room for a prompt within model.max_seq_len "
                              f"({max_seq_len}){of}; " + (f"ask for fewer (e.g. {suggest})" if suggest else
                                                          f"ask for at most {max_seq_len - 1}"))
    return room


def _fit_prompt(ids: list[int], *, max_new_tokens: int, max_seq_len: int) -> list[int]:
    room = prompt_room(max_new_tokens, max_seq_len, setting="max_new_tokens", of=" (kiln generate / chat: "
                       "--max-new-tokens)")
    if len(ids) > room:
        print(f"note: prompt truncated from the left to its last {room} of {len(ids)} tokens "
              f"(model.max_seq_len {max_seq_len} - max_new_tokens {max_new_tokens})", file=sys.stderr)
        return ids[-room:]
    return ids


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text before the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(x) for x in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def generate_text(model: Transformer, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stream: bool = False,
                  repetition_penalty: float = 1.0, stop: list[str] | None = None) -> str:
    """Continuation of `prompt` as text (without the prompt; a final EOS is not rendered).

    The prompt gets no BOS (kiln trains documents without one); an empty prompt starts from EOS, the
    document separator. With `stream`, text is printed to stdout as it is generated. Generation ends
    at EOS or at the first of the `stop` strings, which is not part of the text.
    """
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    return generate_from_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, stream=stream,
                             repetition_penalty=repetition_penalty, stop=stop)


def generate_from_ids(model: Transformer, tokenizer, ids: list[int], *, max_new_tokens: int,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                      stream: bool = False, repetition_penalty: float = 1.0, stop: list[str] | None = None,
                      out=None) -> str:
    """`generate_text` for an already tokenized prompt (a chat prompt from its template). `out` is
    where streamed text goes (default stdout)."""
    cfg = unwrap(model).cfg
    ids = _fit_prompt(list(ids), max_new_tokens=max_new_tokens, max_seq_len=cfg.max_seq_len)
    stops = [x for x in (stop or []) if x]
    hold = max((len(x) for x in stops), default=1) - 1  # text that may still turn into a stop string
    base = tokenizer.decode(ids)
    printed = 0
    new: list[int] = []
    sink = out if out is not None else sys.stdout

    def text_of(tokens: list[int]) -> str:
        return continuation_text(tokenizer, ids, tokens, base=base)

    def hit_stop(tokens: list[int]) -> bool:
        return bool(stops) and _cut_at_stop(text_of(tokens), stops)[1]

    def show(tok: int) -> None:
        nonlocal printed
        new.append(tok)
        if tok == tokenizer.eos_id:
            return
        text, found = _cut_at_stop(text_of(new), stops)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            return
        upto = len(text) if found else max(len(text) - hold, printed)
        if upto > printed:
            sink.write(text[printed:upto])
            sink.flush()
            printed = upto

    out_ids = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, eos_id=tokenizer.eos_id, seed=seed, on_token=show if stream else None,
                       repetition_penalty=repetition_penalty, stop=hit_stop if stops else None)[0]
    if out_ids and out_ids[-1] == tokenizer.eos_id:
        out_ids = out_ids[:-1]
    text, _ = _cut_at_stop(text_of(out_ids), stops)
    if stream and len(text) > printed:
        sink.write(text[printed:])
        sink.flush()
    return text


def generate_texts(model: Transformer, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                   repetition_penalty: float = 1.0, stop: list[str] | None = None) -> list[str]:
    """Batched: the text continuation of each tokenized prompt (EOS not rendered, cut at `stop`)."""
    stops = [x for x in (stop or []) if x]
    bases = {}

    def text_of(prompt: list[int], tokens: list[int]) -> str:
        key = tuple(prompt)
        if key not in bases:
            bases[key] = tokenizer.decode(prompt)
        return continuation_text(tokenizer, prompt, tokens, base=bases[key])

    def hit_stop(tokens: list[int]) -> bool:  # decodes the new tokens alone: cheap, and only an early exit
        return any(x in tokenizer.decode(tokens) for x in stops)

    outs = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, eos_id=tokenizer.eos_id, seed=seed, repetition_penalty=repetition_penalty,
                    stop=hit_stop if stops else None)
    texts = []
    for prompt, o in zip(prompts, outs):
        if o and o[-1] == tokenizer.eos_id:
            o = o[:-1]
        texts.append(_cut_at_stop(text_of(prompt, o), stops)[0])
    return texts
