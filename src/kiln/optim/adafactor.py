"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost").

Per parameter X with gradient G (all math in fp32, whatever the parameter's dtype):
    beta2_t = 1 - t^-decay_rate                          (Alg. 4's increasing decay, decay_rate 0.8)
    >= 2-D, factored over the last two dims (n, m):
        R_t = beta2 R + (1 - beta2) mean_m(G^2 + eps1)      (..., n)  row statistics
        C_t = beta2 C + (1 - beta2) mean_n(G^2 + eps1)      (..., m)  column statistics
        V_t = R_t C_t^T / mean_n(R_t)                       rank-1 estimate of the second moment
    1-D: V_t = beta2 V + (1 - beta2) (G^2 + eps1)
    U = G / sqrt(V_t);  U /= max(1, RMS(U) / d)              update clipping, d = 1
    optional first moment: M = beta1 M + (1 - beta1) U; U = M
    alpha = lr (from the schedule), or lr x max(eps2, RMS(X)) with scale_parameter
    X <- X (1 - alpha wd) - alpha U                          decoupled weight decay

Memory for an (n, m) matrix is n + m floats instead of AdamW's 2nm. bf16 parameters are updated in
fp32 and stored back with stochastic rounding (see rounding.py); the noise generator's state is saved
in state_dict(), so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from kiln.errors import ConfigError
from kiln.optim.rounding import RoundingRNG, as_fp32, load_with_rng, save_with_rng, write_back


def _rms(x: Tensor) -> Tensor:
    return x.square().mean().sqrt()


class Adafactor(torch.optim.Optimizer):
    """Adafactor with factored second moments, update clipping and bf16 stochastic rounding.

    Param-group keys: lr, weight_decay, beta1 (None for no first moment), decay_rate, eps (eps1, eps2),
    clip_threshold, scale_parameter, lr_ratio (this group steps at lr x lr_ratio).

    `scale_parameter` is HF's / fairseq's name for the paper's relative step size (alpha scaled
    by max(eps2, RMS(X))). Their `relative_step` also replaces lr by a 1/sqrt(t) schedule; kiln's
    schedule always supplies lr, so only the scaling is offered.
    """

    def __init__(self, params: Iterable[Any], *, lr: float, beta1: float | None = None, decay_rate: float = 0.8,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 weight_decay: float = 0.0, scale_parameter: bool = False, stochastic_rounding: bool = True,
                 seed: int = 0) -> None:
        defaults = {"lr": lr, "beta1": beta1, "decay_rate": decay_rate, "eps": tuple(eps),
                    "clip_threshold": clip_threshold, "weight_decay": weight_decay,
                    "scale_parameter": scale_parameter, "lr_ratio": 1.0}
        super().__init__(params, defaults)
        if any(hasattr(p, "placements") for g in self.param_groups for p in g["params"]):
            # row/column statistics of a sharded matrix need cross-rank reductions not written yet
            raise ConfigError("optim.name=adafactor does not support sharded (FSDP2/TP DTensor) parameters yet; "
                              "use optim.name=muon or adamw with parallel.dp_shard > 1")
        self.stochastic_rounding = stochastic_rounding
        self.rng = RoundingRNG(seed)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)  # on CPU: reading it never syncs a GPU
        shape = p.shape
        if p.ndim >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=p.device)  # (..., n)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32,
                                                  device=p.device)  # (..., m)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D401 - torch's signature
        """One Adafactor update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                state = self.state[p] or self._init_state(p, group)
                state["step"] += 1
                t = state["step"].item()
                beta2 = 1.0 - t ** (-group["decay_rate"])  # 0 at t=1: the first estimate is G^2 itself
                g = p.grad.to(torch.float32, copy=True)  # (..., n, m); never modify .grad in place
                sq = g.square().add_(eps1)
                if p.ndim >= 2:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.lerp_(sq.mean(dim=-1), 1.0 - beta2)
                    col.lerp_(sq.mean(dim=-2), 1.0 - beta2)
                    # 1/sqrt(V) = rsqrt(R / mean(R)) (..., n, 1) x rsqrt(C) (..., 1, m)
                    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                    c_factor = col.rsqrt().unsqueeze(-2)
                    update = g.mul_(r_factor).mul_(c_factor)
                else:
                    v = state["exp_avg_sq"]
                    v.lerp_(sq, 1.0 - beta2)
                    update = g.mul_(v.rsqrt())
                update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
                if group["beta1"] is not None:
                    m = state["exp_avg"]
                    m.lerp_(update, 1.0 - group["beta1"])
                    update = m
                x = as_fp32(p)
                alpha = group["lr"] * group["lr_ratio"]
                if group["scale_parameter"]:
                    alpha = alpha * max(eps2, _rms(x).item())
                if group["weight_decay"]:
                    x.mul_(1.0 - alpha * group["weight_decay"])
                x.add_(update, alpha=-alpha)
                write_back(p, x, stochastic=self.stochastic_rounding, rng=self.rng)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus the rounding generator's state (exact resume)."""
        return save_with_rng(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of state_dict(); fp32 statistics stay fp32 even for bf16 parameters."""
        load_with_rng(self, state_dict, super().load_state_dict)
