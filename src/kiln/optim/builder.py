"""Parameter groups and optimizer construction (optim.name: adamw | adafactor | muon | adamw8bit)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import OptimConfig
from kiln.model import Transformer
from kiln.optim.adafactor import Adafactor
from kiln.optim.lowbit import build_adamw8bit
from kiln.optim.muon import Muon


def _is_embedding_or_head(name: str) -> bool:
    parts = name.split(".")
    return "tok_emb" in parts or "head" in parts


def _no_decay(name: str, p: nn.Parameter, tied: bool = False) -> bool:
    # With tied embeddings a `head.weight` can only be the embedding's copy on a pipeline's last stage.
    return (p.ndim < 2 or "tok_emb" in name.split(".") or name.endswith("norm.weight")
            or tied and name.split(".")[-2:] == ["head", "weight"])


def param_groups(model: nn.Module, weight_decay: float, *, tied: bool = False) -> list[dict]:
    """Decay only the weight matrices of linear layers; never norms, biases or embeddings.

    A tied head (`tied`: model.tie_embeddings) shares the embedding's Parameter, so it is not decayed either
    (as in OLMo's recipe). An untied head is a linear layer and is decayed.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _no_decay(name, p, tied) else decay).append(p)
    return _nonempty([
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ])


def _nonempty(groups: list[dict]) -> list[dict]:
    """Drop empty groups (a pipeline stage may have no norms, a tied model no decayed AdamW matrix under
    Muon): torch's layout-independent optimizer state cannot name an empty group."""
    return [g for g in groups if g["params"]]


def muon_param_groups(model: nn.Module, cfg: OptimConfig, *, tied: bool = False) -> list[dict]:
    """Muon takes the 2-D hidden weights; embeddings, the output head, norms and 1-D parameters go to AdamW
    (Jordan 2024: the embedding and head are not hidden linear maps, so orthogonalising them hurts).
    `tied`: model.tie_embeddings."""
    muon, decay, no_decay, embed = [], [], [], []
    own_embed = cfg.embed_lr_ratio != 1.0 and not tied  # an untied input embedding at its own LR
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 2 and not _is_embedding_or_head(name):
            muon.append(p)
        elif own_embed and "tok_emb" in name.split("."):
            embed.append(p)
        else:
            (no_decay if _no_decay(name, p, tied) else decay).append(p)
    return _nonempty([
        {"params": muon, "weight_decay": cfg.weight_decay, "name": "muon", "use_muon": True,
         "lr_ratio": cfg.muon_lr_ratio},
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay", "use_muon": False},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "use_muon": False},
        {"params": embed, "weight_decay": 0.0, "name": "embed", "use_muon": False, "lr_ratio": cfg.embed_lr_ratio},
    ])


def param_dtype(cfg: OptimConfig) -> torch.dtype:
    """The dtype the trainer should keep parameters in (bf16 only with adafactor / muon, see config)."""
    return torch.bfloat16 if cfg.param_dtype == "bf16" else torch.float32


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, device_type: str,
                    autocast_dtype: torch.dtype | None = None, tie_embeddings: bool | None = None
                    ) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name`, as one torch.optim.Optimizer whose state_dict() round-trips all
    of its state. The trainer sets group["lr"] on every group each step; group-specific multipliers
    (Muon's `lr_ratio`) are applied inside the optimizer.

    adamw: torch's fused kernel (one pass over all parameters; on CPU 4.4-5x faster than foreach from
    `tiny` to llama-124m, bench/optim_step.py), foreach on devices without it.
    adafactor: factored second moments, no first moment by default, bf16 stochastic rounding.
    muon: Newton-Schulz orthogonalised momentum for 2-D hidden weights, AdamW for the rest. Its iteration
        runs in bf16 on CUDA, and on CPU when the run autocasts to bf16 (`autocast_dtype`: the trainer
        autocasts only where the CPU multiplies bf16 in hardware), else in fp32.
    adamw8bit: torchao's block-wise 8-bit AdamW (raises a ConfigError where it cannot run).
    `tie_embeddings`: model.tie_embeddings (the trainer passes it); None takes a kiln Transformer's own, and
    False for any other module.
    """
    if tie_embeddings is None:
        tie_embeddings = isinstance(model, Transformer) and model.cfg.tie_embeddings
    tied = bool(tie_embeddings)
    if cfg.name == "adafactor":
        return Adafactor(param_groups(model, cfg.weight_decay, tied=tied), lr=cfg.lr, beta1=cfg.adafactor_beta1,
                         decay_rate=cfg.adafactor_decay_rate, eps=cfg.adafactor_eps,
                         clip_threshold=cfg.adafactor_clip, scale_parameter=cfg.adafactor_scale_parameter,
                         stochastic_rounding=cfg.stochastic_rounding, seed=cfg.sr_seed)
    if cfg.name == "muon":
        return Muon(muon_param_groups(model, cfg, tied=tied), lr=cfg.lr, momentum=cfg.muon_momentum,
                    nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps, betas=cfg.betas, eps=cfg.eps,
                    stochastic_rounding=cfg.stochastic_rounding, seed=cfg.sr_seed,
                    ns_dtype=torch.bfloat16 if autocast_dtype == torch.bfloat16 else None)
    if cfg.name == "adamw8bit":
        return build_adamw8bit(param_groups(model, cfg.weight_decay, tied=tied), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                               device_type=device_type)
    assert cfg.name == "adamw", cfg.name
    extra = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, tied=tied), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             **extra)
