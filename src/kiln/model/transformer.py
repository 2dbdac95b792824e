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
from kiln.errors import ConfigError
from kiln.model.attention import AttnMask, attend, prepare_mask
from kiln.model.init import init_weights
from kiln.model.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rope
from kiln.model.loss import linear_cross_entropy


class KVCache:
    """Preallocated keys and values for incremental decoding. pos = tokens already cached."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len
        self.pad: Tensor | None = None  # (B,) left-padding per row (prompts of several lengths in one batch)

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

    def forward(self, x: Tensor, mask: AttnMask, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        # -1, not n_heads: under tensor parallelism each rank holds a slice of the heads
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = mask.rotary(T, x.device)  # (B or 1, T, hd/2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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

    def forward(self, x: Tensor, mask: AttnMask, cache: KVCache | None) -> Tensor:
        if self.deepnorm:
            x = self.attn_norm(self.alpha * x + self.attn(x, mask, cache))
            return self.mlp_norm(self.alpha * x + self.mlp(x))
        x = x + self.attn(self.attn_norm(x), mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Llama-style decoder. `layers` is a ModuleDict keyed "0".."N-1" so stages can drop layers.

    A pipeline stage is this same class with parts removed (kiln.parallel.pipeline): without
    `tok_emb` it takes hidden states instead of tokens; without `norm` it is not the last stage and
    returns its hidden states (plus the doc ids, which every stage's attention needs).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Embedding's own normal_ init on the meta device (where kiln builds models, for init_weights() to set
        # every value) loads torch._dynamo: half a second of every command's start. Built elsewhere, it gets it.
        emb = torch.empty(cfg.vocab_size, cfg.d_model)
        if emb.device.type != "meta":
            nn.init.normal_(emb)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=emb)
        self.rope = RotaryEmbedding(cfg.hd, cfg.rope_theta)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Tied: the head reuses tok_emb.weight (one Parameter, so sharding and saving see it once).
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.embed_mult = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0
        # forward(targets=...) computes the loss from the final hidden states without materialising
        # the full logits when True; parallelize() turns it off where the head is sharded (TP).
        self.fused_loss = True
        # an untied head started at zero keeps the rows of never-targeted ids equal: the fused loss computes
        # them once (kiln.model.loss, "Shared rows"; exact, and it looks for the equal rows every call)
        self.share_head_rows = cfg.init_zero_out and not cfg.tie_embeddings

    def init_weights(self, seed: int | None = None) -> None:
        """Every tensor's initial value; see kiln.model.init for the table."""
        init_weights(self, seed=seed)

    def output_weight(self) -> Tensor:
        return self.tok_emb.weight if self.head is None else self.head.weight

    def _trunk(self, x: Tensor, doc_ids: Tensor | None, cache: KVCache | None) -> Tensor:
        """Embedding (first stage only) and this module's blocks. x: tokens (B, T) or hidden (B, T, d)."""
        # The full sequence length: under sequence parallelism a later pipeline stage receives only its
        # slice of the residual stream, but the doc ids always cover the whole sequence.
        T = doc_ids.shape[1] if doc_ids is not None else x.shape[1]
        if cache is not None:
            mask = AttnMask(q_offset=cache.pos, rope=self.rope, pad=cache.pad)
        else:
            mask = AttnMask(doc_ids=doc_ids, rope=self.rope)
            # masks and RoPE tables built once here and only read by the layers (no recompiles per layer)
            act_dtype = x.dtype if x.is_floating_point() else self.tok_emb.weight.dtype
            prepare_mask(mask, self.cfg.attention, B=x.shape[0], T=T, S=T, device=x.device, dtype=act_dtype)
        if self.tok_emb is not None:
            x = self.tok_emb(x)  # (B, T, d)
            if self.embed_mult != 1.0:
                x = x * self.embed_mult
        for block in self.layers.values():
            x = block(x, mask, cache)
        if cache is not None:
            cache.pos += T
        return x

    def hidden(self, tokens: Tensor, *, doc_ids: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """tokens (B, T) -> final normalised hidden states (B, T, d)."""
        return self.norm(self._trunk(tokens, doc_ids, cache))

    def logits(self, h: Tensor) -> Tensor:
        """Final hidden states (B, T, d) -> logits (B, T, V)."""
        return self.head(h) if self.head is not None else F.linear(h, self.tok_emb.weight)

    def forward(self, x: Tensor, doc_ids: Tensor | None = None, *, cache: KVCache | None = None,
                targets: Tensor | None = None, loss_impl: str = "auto",
                unseen_smoothing: float = 0.0) -> Tensor | tuple[Tensor, Tensor]:
        """tokens (B, T) -> logits (B, T, V); with `targets` (B, T) the summed next-token cross-entropy
        over targets != -100 (fp32 scalar, see kiln.model.loss.linear_cross_entropy for `loss_impl` and
        `unseen_smoothing`).
        A non-last pipeline stage returns its hidden states."""
        h = self._trunk(x, doc_ids, cache)
        if self.norm is None:  # a pipeline stage before the last
            return h if doc_ids is None else (h, doc_ids)
        h = self.norm(h)
        if targets is None:
            return self.logits(h)
        if self.fused_loss:
            return linear_cross_entropy(h.flatten(0, 1), self.output_weight(), targets.flatten(), impl=loss_impl,
                                        share_rows=self.share_head_rows, unseen_smoothing=unseen_smoothing)
        if unseen_smoothing:
            raise ConfigError("train.unseen_smoothing needs the fused loss, which tensor parallelism replaces "
                              "(parallel.tp 1)")
        return F.cross_entropy(self.logits(h).float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction="sum")


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
