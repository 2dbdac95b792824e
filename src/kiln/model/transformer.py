"""The decoder: embeddings -> N x Block(attention, SwiGLU) -> RMSNorm -> head.

Pure single-device PyTorch. Parallelism, compile and activation checkpointing are applied from
outside (kiln.parallel). Build on the meta device, move with `to_empty`, then `init_weights()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.config import ModelConfig
from kiln.model.attention import AttnMask, attend, doc_positions
from kiln.model.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rope


class KVCache:
    """Preallocated keys and values for incremental decoding. pos = tokens already cached."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        T = k.shape[1]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > {self.max_len}")
        self.k[layer, :, self.pos : self.pos + T] = k
        self.v[layer, :, self.pos : self.pos + T] = v
        return self.k[layer, :, : self.pos + T], self.v[layer, :, : self.pos + T]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.backend = cfg.attention
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.hd, cfg.d_model, bias=False)
        # QK-norm over each head's vector (Qwen3; Dehghani et al. 2023 for stability at high LR).
        self.q_norm = RMSNorm(cfg.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.use_rope = layer_idx not in cfg.nope_layers()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttnMask, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, S, Hkv, hd), S = cached + T
        out = attend(q, k, v, mask, self.backend)  # (B, T, H, hd)
        return self.wo(out.reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)
        self.deepnorm = cfg.residual == "deepnorm"
        # DeepNet (Wang et al. 2022): x = LN(alpha * x + f(x)), alpha = (2N)^(1/4) for decoder-only.
        self.alpha = (2 * cfg.n_layers) ** 0.25 if self.deepnorm else 1.0

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttnMask, cache: KVCache | None) -> Tensor:
        if self.deepnorm:
            x = self.attn_norm(self.alpha * x + self.attn(x, rope, mask, cache))
            return self.mlp_norm(self.alpha * x + self.mlp(x))
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Llama-style decoder. `layers` is a ModuleDict keyed "0".."N-1" so stages can drop layers."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.hd, cfg.rope_theta)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Tied: the head reuses tok_emb.weight (one Parameter, so sharding and saving see it once).
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.embed_mult = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0

    def init_weights(self, seed: int | None = None) -> None:
        """Every tensor's initial value; see kiln.model.init for the table."""
        from kiln.model.init import init_weights

        init_weights(self, seed=seed)

    def output_weight(self) -> Tensor:
        return self.tok_emb.weight if self.head is None else self.head.weight

    def hidden(self, tokens: Tensor, *, doc_ids: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """tokens (B, T) -> final normalised hidden states (B, T, d)."""
        B, T = tokens.shape
        if cache is not None:
            positions = torch.arange(cache.pos, cache.pos + T, device=tokens.device).expand(B, T)
            mask = AttnMask(q_offset=cache.pos)
        elif doc_ids is not None:
            positions, mask = doc_positions(doc_ids), AttnMask(doc_ids=doc_ids)
        else:
            positions, mask = torch.arange(T, device=tokens.device).expand(B, T), AttnMask()
        rope = self.rope(positions)  # (B, T, hd/2) x 2
        h = self.tok_emb(tokens)  # (B, T, d)
        if self.embed_mult != 1.0:
            h = h * self.embed_mult
        for block in self.layers.values():
            h = block(h, rope, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.norm(h)

    def forward(self, tokens: Tensor, *, doc_ids: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, V)."""
        return F.linear(self.hidden(tokens, doc_ids=doc_ids, cache=cache), self.output_weight())

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embedding else n


def count_params(cfg: ModelConfig) -> int:
    """Closed-form parameter count (checked against the built model in tests)."""
    d, hd = cfg.d_model, cfg.hd
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + (2 * hd if cfg.qk_norm else 0)
    mlp = 3 * d * cfg.ffn_dim
    per_layer = attn + mlp + 2 * d
    emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * per_layer + emb + d


def build_model(cfg: ModelConfig, *, device: torch.device | str = "cpu", seed: int | None = None) -> Transformer:
    """Build on meta, materialise on `device`, initialise once."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model
