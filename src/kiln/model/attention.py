"""Attention backends behind one function, `attend(q, k, v, mask, backend)`.

- eager: explicit softmax(QK^T)V; the reference every other backend is tested against.
- sdpa:  torch's scaled_dot_product_attention (flash / mem-efficient / math kernels).
- flex:  FlexAttention with a block-causal document mask (PyTorch >= 2.5).
- flash: flash-attn 2 (`pip install flash-attn`); varlen kernel for packed documents.

All of them honour the same `AttnMask`: causal, and with `doc_ids` a query never sees a key of
another document.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.errors import ConfigError


@dataclass
class AttnMask:
    """What a query may see. Built once per forward and shared by every layer.

    doc_ids: (B, T) document index of each token in a packed row, or None for one document per row.
    q_offset: position of the first query among the keys (> 0 when decoding with a KV cache).
    """

    doc_ids: Tensor | None = None
    q_offset: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def dense(self, T: int, S: int, device: torch.device) -> Tensor | None:
        """Boolean (B or 1, 1, T, S) mask, True where attention is allowed; None if plain causal from 0."""
        key = ("dense", T, S)
        if key not in self._cache:
            if self.doc_ids is None and self.q_offset == 0 and T == S:
                self._cache[key] = None
            else:
                q_pos = torch.arange(T, device=device)[:, None] + self.q_offset
                mask = q_pos >= torch.arange(S, device=device)[None, :]  # (T, S)
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
    allowed = mask.dense(T, S, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=allowed, is_causal=allowed is None, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


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


def _flex(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    create_block_mask, _ = _flex_fns()
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ConfigError("model.attention=flex has no backward on CPU in this PyTorch; train on CPU with "
                          "model.attention=sdpa (same document mask), or use flex on a GPU")
    B, T = q.shape[:2]
    S = k.shape[1]
    key = ("flex", T, S)
    if key not in mask._cache:
        doc_ids, off = mask.doc_ids, mask.q_offset
        if doc_ids is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx + off >= kv_idx
            block = create_block_mask(mask_mod, None, None, T, S, device=q.device.type)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
            block = create_block_mask(mask_mod, B, None, T, S, device=q.device.type)
        mask._cache[key] = block
    fn = _compiled_flex(q.device.type)
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask._cache[key],
             enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@functools.cache
def _flash_fns():
    try:
        import flash_attn
    except ImportError:
        raise ConfigError(
            "model.attention=flash needs flash-attn 2 (pip install flash-attn --no-build-isolation, CUDA only); "
            "use model.attention=sdpa or flex") from None
    return flash_attn.flash_attn_func, flash_attn.flash_attn_varlen_func


def _flash(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    flash_func, varlen_func = _flash_fns()
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError("model.attention=flash runs on CUDA in bf16/fp16 only; use train.dtype=bf16 on a GPU")
    B, T, H, hd = q.shape
    if mask.doc_ids is None:
        # flash-attn aligns the causal mask to the bottom-right, which is what cached decoding needs.
        return flash_func(q, k, v, causal=True)
    # Packed documents: every (row, document) pair is one variable-length sequence.
    ids = mask.doc_ids + torch.arange(B, device=q.device)[:, None] * (T + 1)  # unique across rows
    flat = ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    start_idx = starts.nonzero().flatten().to(torch.int32)
    cu = torch.cat([start_idx, torch.tensor([flat.numel()], device=q.device, dtype=torch.int32)])
    max_len = int((cu[1:] - cu[:-1]).max())
    out = varlen_func(q.reshape(B * T, H, hd), k.reshape(B * T, -1, hd), v.reshape(B * T, -1, hd),
                      cu, cu, max_len, max_len, causal=True)
    return out.reshape(B, T, H, hd)
