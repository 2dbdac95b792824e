"""Every tensor's initial value, in one table per scheme (nanochat keeps inits in one place too).

Schemes (model.init):
  normal        N(0, std) everywhere; residual outputs (wo, w_down) std / sqrt(2 * n_layers) (GPT-2).
  trunc_normal  truncated N(0, 0.5 / sqrt(d)) at +-3 std for every matrix (seed 002); pair it with
                model.embed_scale=true, which multiplies the embedding output by sqrt(d).
  deepnet       Xavier-normal; v, wo and the MLP scaled by beta = (8N)^(-1/4) (DeepNet, Wang et al.
                2022, decoder-only constants); pair it with model.residual=deepnorm.
Norm weights start at 1 in every scheme. RoPE frequencies are recomputed, not learned.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.model.layers import RMSNorm, RotaryEmbedding


def _rule(name: str, scheme: str, d: int, n_layers: int, std: float) -> tuple[str, float]:
    """(kind, scale) for a weight matrix named like 'layers.3.attn.wq.weight'."""
    is_residual_out = name.endswith(("attn.wo.weight", "mlp.w_down.weight"))
    if scheme == "normal":
        if is_residual_out:
            return "normal", std / math.sqrt(2 * n_layers)
        return "normal", std
    if scheme == "trunc_normal":
        return "trunc_normal", 0.5 / math.sqrt(d)
    if scheme == "deepnet":
        if name in ("tok_emb.weight", "head.weight"):
            return "normal", d**-0.5
        beta = (8 * n_layers) ** -0.25
        if name.endswith(("attn.wq.weight", "attn.wk.weight")):
            return "xavier", 1.0
        return "xavier", beta
    raise AssertionError(scheme)


@torch.no_grad()
def init_weights(model: nn.Module, *, seed: int | None = None) -> None:
    """Initialise `model` (a kiln Transformer) in place, deterministically when `seed` is given."""
    cfg = model.cfg
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.initial_seed() % 2**63)
    for module in model.modules():
        if isinstance(module, RMSNorm | RotaryEmbedding):
            module.reset_parameters()
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue  # norm weights, done above
        kind, scale = _rule(name, cfg.init, cfg.d_model, cfg.n_layers, cfg.init_std)
        if kind == "normal":
            nn.init.normal_(p, mean=0.0, std=scale, generator=gen)
        elif kind == "trunc_normal":
            nn.init.trunc_normal_(p, mean=0.0, std=scale, a=-3 * scale, b=3 * scale, generator=gen)
        elif kind == "xavier":
            nn.init.xavier_normal_(p, gain=scale, generator=gen)
