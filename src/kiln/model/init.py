"""Every tensor's initial value, in one table per scheme (nanochat keeps inits in one place too).

Schemes (model.init):
  normal        N(0, std) everywhere; residual outputs (wo, w_down) std / sqrt(2 * n_layers) (GPT-2).
  trunc_normal  truncated N(0, 0.5 / sqrt(d)) at +-3 std for every matrix (the SmolLM pipeline guide's init); pair it with
                model.embed_scale=true, which multiplies the embedding output by sqrt(d).
  deepnet       Xavier-normal; v, wo and the MLP scaled by beta = (8N)^(-1/4) (DeepNet, Wang et al.
                2022, decoder-only constants); pair it with model.residual=deepnorm.
Norm weights start at 1 in every scheme. RoPE frequencies are recomputed, not learned.
model.init_zero_out=true starts the residual outputs (wo, w_down) and an untied head at 0 in any scheme
(modded-nanogpt's init): each block starts as the identity and the first logits are uniform.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from kiln.model.layers import RMSNorm, RotaryEmbedding


def _is_residual_out(name: str) -> bool:
    return name.endswith(("attn.wo.weight", "mlp.w_down.weight"))


def _rule(name: str, scheme: str, d: int, n_layers: int, std: float) -> tuple[str, float]:
    """(kind, scale) for a weight matrix named like 'layers.3.attn.wq.weight'."""
    is_residual_out = _is_residual_out(name)
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


def clean_name(name: str) -> str:
    """A parameter's name in the plain model, without wrapper prefixes (compile, activation
    checkpointing, DDP) that parallelization adds."""
    for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(wrapper, "")
    return name


def _param_seed(seed: int, name: str) -> int:
    """Each tensor gets its own stream, keyed by its name: any subset of the model (a pipeline stage,
    a shard) initialises exactly as the whole model does on one device."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


@torch.no_grad()
def init_weights(model: nn.Module, *, seed: int | None = None) -> None:
    """Initialise `model` (a kiln Transformer, possibly a pipeline stage or sharded) in place.

    Deterministic when `seed` is given. Sharded parameters (DTensor) are initialised by generating
    the full tensor on their device and keeping this rank's part, so every layout starts from the
    same weights as a single-device run.
    """
    cfg = model.cfg
    base = seed if seed is not None else torch.initial_seed() % 2**63
    for module in model.modules():
        if isinstance(module, RMSNorm | RotaryEmbedding):
            module.reset_parameters()
    for raw_name, p in model.named_parameters():
        if p.ndim < 2:
            continue  # norm weights, done above
        name = clean_name(raw_name)
        if name == "head.weight" and cfg.tie_embeddings:
            name = "tok_emb.weight"  # a pipeline's last stage holds a copy of the tied embedding
        kind, scale = _rule(name, cfg.init, cfg.d_model, cfg.n_layers, cfg.init_std)
        full = torch.empty(p.shape, dtype=p.dtype, device=p.device.type if p.device.type != "meta" else "cpu")
        gen = torch.Generator(device=full.device)
        gen.manual_seed(_param_seed(base, name))
        if kind == "normal":
            nn.init.normal_(full, mean=0.0, std=scale, generator=gen)
        elif kind == "trunc_normal":
            nn.init.trunc_normal_(full, mean=0.0, std=scale, a=-3 * scale, b=3 * scale, generator=gen)
        elif kind == "xavier":
            nn.init.xavier_normal_(full, gain=scale, generator=gen)
        if cfg.init_zero_out and (_is_residual_out(name) or name == "head.weight"):  # tied: named tok_emb here
            full.zero_()
        _copy_full(p, full)


def _copy_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """p <- full, where p may be a DTensor shard (each rank keeps its own part, no communication)."""
    if hasattr(p, "device_mesh") and hasattr(p, "placements"):  # a DTensor, without importing distributed
        from torch.distributed.tensor import distribute_tensor

        p.copy_(distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None))
    else:
        p.copy_(full.to(p.device))
