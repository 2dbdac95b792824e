"""Parameter groups and optimizer construction."""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only the weight matrices of linear layers; never norms, biases or embeddings.

    A tied head shares the embedding's Parameter, so it is not decayed either (as in OLMo's recipe).
    An untied head is a linear layer and is decayed.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "tok_emb" in name or name.endswith("norm.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, device_type: str) -> torch.optim.Optimizer:
    """AdamW, fused on CUDA (one kernel for all parameters), foreach elsewhere."""
    groups = param_groups(model, cfg.weight_decay)
    extra = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra)
