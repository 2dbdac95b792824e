"""Building blocks: RMSNorm, rotary embeddings (half-split layout, as HF Llama), SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary integer positions (RoFormer, Su et al. 2021).

    Positions are given per token, so packed documents can restart at 0.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)

    def reset_parameters(self) -> None:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=self.inv_freq.device).float()
        self.inv_freq.copy_(1.0 / (self.theta ** (exponents / self.head_dim)))

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        # positions: (B, T) int -> cos, sin: (B, T, hd/2) fp32
        freqs = positions[..., None].float() * self.inv_freq
        return freqs.cos(), freqs.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, T, H, hd) by per-token angles; the two halves of hd are the (re, im) pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, hd/2) each
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, ffn_dim, bias=False)
        self.w_up = nn.Linear(d_model, ffn_dim, bias=False)
        self.w_down = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
