"""Attention backends behind one function, `attend(q, k, v, mask, backend)`.

- eager: explicit softmax(QK^T)V; the reference every other backend is tested against.
- sdpa:  torch's scaled_dot_product_attention (flash / mem-efficient / math kernels).
- flex:  FlexAttention with a block-causal document mask (PyTorch >= 2.5).
- flash: flash-attn 2 (`pip install flash-attn`); varlen kernel for packed documents.

All of them honour the same `AttnMask`: causal, and with `doc_ids` a query never sees a key of
another document.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.errors import ConfigError


@dataclass
class AttnMask:
    """What a query may see and where it is. Built once per forward and shared by every layer.

    doc_ids: (B, T) document index of each token in a packed row, or None for one document per row.
    q_offset: position of the first query among the keys (> 0 when decoding with a KV cache).
    pad: (B,) left-padding per row when decoding prompts of several lengths in one batch: a row's
        first pad[b] keys are never attended to and its RoPE positions start at its first real token.
    rope: the model's RotaryEmbedding; `rotary(T, device)` gives cos/sin for the T query positions
        (restarting per document with doc_ids). Attention asks with its own T, the full sequence
        length, which under sequence parallelism differs from the residual stream's local length.
    """

    doc_ids: Tensor | None = None
    q_offset: int = 0
    rope: Any = None
    pad: Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def rotary(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (B or 1, T, hd/2) fp32; computed once per forward and length."""
        key = ("rope", T)
        if key not in self._cache:
            if self.doc_ids is not None:
                positions = doc_positions(self.doc_ids)  # (B, T)
            elif self.pad is not None:  # position 0 at each row's first real token
                positions = (torch.arange(self.q_offset, self.q_offset + T, device=device)[None]
                             - self.pad[:, None]).clamp_min(0)  # (B, T)
            else:
                positions = torch.arange(self.q_offset, self.q_offset + T, device=device)[None]  # (1, T)
            self._cache[key] = self.rope(positions)
        return self._cache[key]

    def dense(self, T: int, S: int, device: torch.device) -> Tensor | None:
        """Boolean (B or 1, 1, T, S) mask, True where attention is allowed; None if plain causal from 0."""
        key = ("dense", T, S)
        if key not in self._cache:
            if self.doc_ids is None and self.pad is None and self.q_offset == 0 and T == S:
                self._cache[key] = None
            else:
                q_pos = torch.arange(T, device=device)[:, None] + self.q_offset
                k_pos = torch.arange(S, device=device)[None, :]
                mask = q_pos >= k_pos  # (T, S)
                if self.pad is not None:  # no real query sees a pad key; a pad query sees itself (no NaN rows)
                    mask = mask & ((k_pos >= self.pad[:, None, None]) | (k_pos == q_pos))  # (B, T, S)
                    mask = mask[:, None]
                else:
                    mask = mask[None, None]
                if self.doc_ids is not None:
                    assert self.q_offset == 0 and T == S, "document masks are for training, not cached decode"
                    same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]  # (B, T, S)
                    mask = mask & same[:, None]
                self._cache[key] = mask
        return self._cache[key]


def doc_positions(doc_ids: Tensor) -> Tensor:
    """RoPE positions that restart at 0 at each document start. (B, T) -> (B, T)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start index of own doc
    return idx - first


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, backend: str) -> Tensor:
    """q: (B, T, H, hd); k, v: (B, S, Hkv, hd) -> (B, T, H, hd)."""
    if mask.pad is not None and backend in ("flex", "flash"):
        backend = "sdpa"  # decoding left-padded rows needs a per-row mask: sdpa's, the same numbers
    if backend == "sdpa":
        return _sdpa(q, k, v, mask)
    if backend == "eager":
        return _eager(q, k, v, mask)
    if backend == "flex":
        return _flex(q, k, v, mask)
    if backend == "flash":
        return _flash(q, k, v, mask)
    raise AssertionError(f"unknown attention backend {backend}")


def _eager(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    B, T, H, hd = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, len, hd)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) * hd**-0.5  # (B, H, T, S)
    allowed = mask.dense(T, S, q.device)
    if allowed is None:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = probs @ v.float()  # (B, H, T, hd)
    return out.to(q.dtype).transpose(1, 2)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    T, S = q.shape[1], k.shape[1]
    run = sdpa_dtype(q.device, q.dtype)
    bias = _sdpa_bias(mask, T, S, q.device, run)
    if bias is not None and bias.dtype != run:  # FSDP's mixed precision casts the mask's cached bias too
        bias = bias.to(run)
    gqa = q.shape[2] != k.shape[2]
    if gqa and bias is not None and expand_kv_for_mask(q.device):
        rep = q.shape[2] // k.shape[2]  # query head h reads kv head h // rep, as enable_gqa does
        k, v, gqa = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2), False
    with torch.autocast(q.device.type, enabled=False) if q.device.type == "cpu" else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).to(run), k.transpose(1, 2).to(run), v.transpose(1, 2).to(run),
            attn_mask=bias, is_causal=bias is None, enable_gqa=gqa,
        )
    return out.transpose(1, 2).to(q.dtype)


def expand_kv_for_mask(device: torch.device) -> bool:
    """Whether masked GQA attention gets k, v repeated to every query head (CUDA).

    With an attention mask, sdpa's flash kernel is out; PyTorch's memory-efficient kernel takes the
    mask but, in the releases this was written against (2.11), not GQA, and cuDNN's kernel is ranked
    first only with a recent cuDNN. What is left then is the math kernel, which saves (B, H, T, T)
    fp32 probabilities per layer (out of memory at T=2048). Repeated k, v (H instead of Hkv heads,
    saved for backward: counted by kiln.estimate) fit every masked kernel. Not measured on a GPU yet.
    """
    return device.type == "cuda"


def _run_dtype(q: Tensor) -> torch.dtype:
    """The dtype attention computes in: autocast's when it is on, else q's."""
    dev = q.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype


def sdpa_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype sdpa computes in: fp32 on CPU, whose flash-attention kernel is slower in bf16 than in
    fp32 (backward 2.3x on a Sapphire Rapids core, where the matmuls gain 3-5x from bf16; FACTS.md);
    elsewhere autocast's dtype when it is on, else the activations' (`dtype`)."""
    if device.type == "cpu":
        return torch.float32
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


def _sdpa_bias(mask: AttnMask, T: int, S: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """Additive (B or 1, 1, T, S) bias, 0 where allowed and -inf elsewhere, made once per forward.

    sdpa turns a boolean mask into exactly this bias on every call, and autocast casts a float one on
    every call; both copies are saved for backward, one per layer (B*T*S elements each). Made here
    once, in the dtype sdpa runs in, every layer shares one tensor.
    """
    key = ("sdpa_bias", T, S, dtype)
    if key not in mask._cache:
        allowed = mask.dense(T, S, device)
        mask._cache[key] = None if allowed is None else torch.zeros(
            allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return mask._cache[key]


@functools.cache
def _flex_fns():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:  # torch < 2.5
        raise ConfigError("model.attention=flex needs PyTorch >= 2.5; use model.attention=sdpa") from e
    return create_block_mask, flex_attention


@functools.cache
def _compiled_flex(device_type: str):
    _, flex_attention = _flex_fns()
    # Eager flex attention materialises the scores; the compiled one is the fused kernel.
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def check_training_backend(backend: str, device_type: str) -> None:
    """A backend that cannot train on `device_type` is a ConfigError, said before a model is built (the run, and
    --dry-run): flex has no CPU backward; flash-attn 2 is a CUDA package."""
    if backend == "flex" and device_type == "cpu":
        raise ConfigError("model.attention=flex has no backward on CPU in this PyTorch; train on CPU with "
                          "model.attention=sdpa (same document mask), or use flex on a GPU")
    if backend == "flash" and device_type != "cuda":
        raise ConfigError(f"model.attention=flash runs on CUDA only (flash-attn 2), not on {device_type}; use "
                          "model.attention=sdpa here (flex too on a GPU)")
    if backend == "flash":
        _flash_fns()


def _flex(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        check_training_backend("flex", "cpu")
    q, k, v = _same_dtype(q, k, v)
    block = _flex_block_mask(mask, q.shape[0], q.shape[1], k.shape[1], q.device)
    fn = _compiled_flex(q.device.type)
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block,
             enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=16)
def _causal_block_mask(T: int, S: int, offset: int, device: str):
    """Plain causal BlockMask: the same for every batch of one shape, so it is built once per run."""
    create_block_mask, _ = _flex_fns()

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx
    return create_block_mask(mask_mod, None, None, T, S, device=device)


def _flex_block_mask(mask: AttnMask, B: int, T: int, S: int, device: torch.device):
    """The BlockMask for this forward: cached per run (causal) or per batch (documents)."""
    key = ("flex", T, S)
    if key not in mask._cache:
        if mask.doc_ids is None:
            mask._cache[key] = _causal_block_mask(T, S, mask.q_offset, str(device))
        else:
            create_block_mask, _ = _flex_fns()
            doc_ids = mask.doc_ids

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
            # Per-batch masks cost 0.15-0.3 s in eager Python (pytorch #151043); compiled, the cost
            # is a kernel launch. Static shapes keep it to one compile.
            mask._cache[key] = create_block_mask(mask_mod, B, None, T, S, device=device.type,
                                                 _compile=device.type == "cuda")
    return mask._cache[key]


@functools.cache
def _flash_fns():
    try:
        import flash_attn
    except ImportError:
        raise ConfigError(
            "model.attention=flash needs flash-attn 2 (pip install flash-attn --no-build-isolation, CUDA only); "
            "use model.attention=sdpa or flex") from None
    return flash_attn.flash_attn_func, flash_attn.flash_attn_varlen_func


def _same_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in the dtype attention runs in. Under autocast QK-norm's RMSNorm returns fp32 (its fp32
    weight times the normalised bf16 activations) while v stays bf16; sdpa is autocast-aware and
    casts, flex and flash-attn kernels are not (they refuse mixed dtypes or run all in fp32)."""
    dt = _run_dtype(q)
    return q.to(dt), k.to(dt), v.to(dt)


def _flash(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    flash_func, varlen_func = _flash_fns()
    q, k, v = _same_dtype(q, k, v)
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError("model.attention=flash runs on CUDA in bf16/fp16 only; use train.dtype=bf16 on a GPU")
    B, T, H, hd = q.shape
    if mask.doc_ids is None:
        # flash-attn aligns the causal mask to the bottom-right, which is what cached decoding needs.
        return flash_func(q, k, v, causal=True)
    cu, max_len = _varlen_bounds(mask, B, T, q.device)
    out = varlen_func(q.reshape(B * T, H, hd), k.reshape(B * T, -1, hd), v.reshape(B * T, -1, hd),
                      cu, cu, max_len, max_len, causal=True)
    return out.reshape(B, T, H, hd)


def _varlen_bounds(mask: AttnMask, B: int, T: int, device: torch.device) -> tuple[Tensor, int]:
    """(cu_seqlens int32, max_len) of the packed documents, once per forward (max_len syncs the host)."""
    key = ("varlen", B, T)
    if key not in mask._cache:
        # every (row, document) pair is one variable-length sequence
        ids = mask.doc_ids + torch.arange(B, device=device)[:, None] * (T + 1)  # unique across rows
        flat = ids.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        start_idx = starts.nonzero().flatten().to(torch.int32)
        cu = torch.cat([start_idx, torch.tensor([flat.numel()], device=device, dtype=torch.int32)])
        mask._cache[key] = (cu, int((cu[1:] - cu[:-1]).max()))
    return mask._cache[key]


def prepare_mask(mask: AttnMask, backend: str, *, B: int, T: int, S: int, device: torch.device,
                 dtype: torch.dtype) -> None:
    """Build what `backend` will ask `mask` for, before the blocks run.

    Every layer then only reads the cache: a compiled block sees the same cache keys in every layer
    and every step (no recompiles), and host syncs (flash's max_len) happen outside compiled code.
    `dtype`: the activations' dtype without autocast (autocast's own dtype wins when it is on).
    """
    if mask.rope is not None:
        mask.rotary(T, device)
    if backend == "sdpa":
        _sdpa_bias(mask, T, S, device, sdpa_dtype(device, dtype))
    elif backend == "eager":
        mask.dense(T, S, device)
    elif backend == "flex" and not (device.type == "cpu" and torch.is_grad_enabled()):
        _flex_block_mask(mask, B, T, S, device)
    elif backend == "flash" and mask.doc_ids is not None:
        _varlen_bounds(mask, B, T, device)
