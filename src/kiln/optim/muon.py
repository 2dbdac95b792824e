"""Muon for 2-D weight matrices, AdamW for everything else, in one torch.optim.Optimizer.

Muon (Keller Jordan 2024, "Muon: An optimizer for hidden layers in neural networks"):
    B <- mu B + G                         momentum (SGD form)
    U <- G + mu B  (Nesterov)  or  B
    O <- NewtonSchulz5(U)                 ~ the orthogonal factor U V^T of U's SVD
    W <- W (1 - lr wd) - lr x 0.2 sqrt(max(rows, cols)) x O
The 0.2 x sqrt(max dim) scale is the "match AdamW's update RMS" variant (Liu et al. 2025, "Muon is
Scalable for LLM Training"): an orthogonal (rows, cols) matrix has RMS 1/sqrt(max dim), so the update
has RMS 0.2, close to AdamW's, and the Muon groups can share the AdamW learning rate and weight decay.
We pick it over Jordan's max(1, rows/cols)^0.5 so that one `optim.lr` and one schedule drive both parts.

Under FSDP2 / DTensor, Newton-Schulz needs the whole matrix: the momentum update runs on the local
shards, then `full_tensor()` all-gathers U, every rank orthogonalises the same full matrix, and
`distribute_tensor(..., src_data_rank=None)` keeps each rank's slice of the result in the parameter's
placement without further communication. (Every rank repeats the same NS work; fine at 30M-2B.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import distribute_tensor

from kiln.optim.rounding import RoundingRNG, as_fp32, load_with_rng, save_with_rng, write_back

# Quintic iteration coefficients (Jordan 2024): chosen to push singular values into ~[0.7, 1.2] fast,
# trading exact convergence to 1 for speed; 5 steps suffice from a Frobenius-normalised start.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, *, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> Tensor:
    """Approximately orthogonalise a (rows, cols) matrix, or a (batch, rows, cols) stack of them one by
    one: returns ~U V^T for each g = U S V^T, in fp32.

    `dtype` is what the iteration's matmuls run in; None: bf16 on CUDA (as Jordan does: the iteration is
    robust to it and tensor cores are fast), fp32 elsewhere (exact CPU tests on every CPU). The trainer
    passes bf16 on a CPU whose matmul units run bf16 when it trains under bf16 autocast (2.3-2.5x faster
    than fp32 on a Zen 4 CPU, bench/RESULTS.md). A stack runs as batched matmuls: at small widths the
    per-matrix loop costs more in calls than in FLOPs, and each polynomial is one fused multiply-add
    (baddbmm).
    """
    assert g.ndim in (2, 3), g.shape
    a, b, c = NS_COEFFS
    if dtype is None:
        dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    single = x.ndim == 2
    if single:
        x = x[None]
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide form: X X^T is then (min dim, min dim)
        x = x.mT
    # spectral norm <= Frobenius norm <= 1; the norm in fp32 (a bf16 sum of squares loses digits)
    x = x / (torch.linalg.matrix_norm(x.float(), keepdim=True) + eps).to(dtype)
    for _ in range(steps):
        xxt = x @ x.mT  # (n, r, r), r = min(rows, cols)
        poly = torch.baddbmm(xxt, xxt, xxt, beta=b, alpha=c)  # b X X^T + c (X X^T)^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + poly X
    if transposed:
        x = x.mT
    return (x[0] if single else x).to(torch.float32)


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _fusable(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can update these parameters in place: plain fp32 tensors with
    fp32 gradients on one CPU or CUDA device. bf16 parameters (fp32 moments, stochastic rounding) and
    DTensors take the per-tensor path."""
    if not params:
        return False
    dev = params[0].device
    return dev.type in ("cpu", "cuda") and all(
        p.dtype == torch.float32 and p.grad.dtype == torch.float32 and p.device == dev and not _is_dtensor(p)
        for p in params)


class Muon(torch.optim.Optimizer):
    """One optimizer, two update rules chosen per param group by its `use_muon` key.

    Muon groups (2-D hidden weights): keys momentum, nesterov, ns_steps. AdamW groups (embeddings, head,
    norms, 1-D): keys betas, eps. Both: lr, weight_decay, lr_ratio (the group steps at lr x lr_ratio, so the
    trainer can set the same `lr` on every group). One state_dict() holds both parts.
    """

    def __init__(self, params: Iterable[Any], *, lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, stochastic_rounding: bool = True, seed: int = 0,
                 ns_dtype: torch.dtype | None = None) -> None:
        defaults = {"lr": lr, "lr_ratio": 1.0, "use_muon": False, "momentum": momentum, "nesterov": nesterov,
                    "ns_steps": ns_steps, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D matrices only; put other parameters in AdamW groups")
        self.stochastic_rounding = stochastic_rounding
        self.ns_dtype = ns_dtype  # Newton-Schulz's matmul dtype (None: newton_schulz's default)
        self.rng = RoundingRNG(seed)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update: Muon for `use_muon` groups, AdamW for the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"] * group["lr_ratio"]
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                self._muon_group(params, group, lr)
                continue
            if _fusable(params):
                self._fused_adamw(params, group, lr)
                continue
            for p in params:
                x = self._decayed(p, group, lr)
                self._adamw_update(p, x, group, lr)
                write_back(p, x, stochastic=self.stochastic_rounding, rng=self.rng)
        return loss

    @staticmethod
    def _decayed(p: Tensor, group: dict[str, Any], lr: float) -> Tensor:
        """p's fp32 value (p itself in fp32) after the decoupled (AdamW-style) weight decay."""
        x = as_fp32(p)
        if group["weight_decay"]:
            x.mul_(1.0 - lr * group["weight_decay"])
        return x

    def _muon_group(self, params: list[Tensor], group: dict[str, Any], lr: float) -> None:
        """Momentum, Newton-Schulz and the update for one Muon group. Matrices of one shape (a tall one
        counted as its transpose) are orthogonalised together as one batch; DTensor ones one by one."""
        buckets: dict[tuple[Any, ...], list[tuple[Tensor, Tensor, Tensor]]] = {}
        for p in params:
            x = self._decayed(p, group, lr)
            u = self._momentum(p, group)
            if _is_dtensor(u):
                full = u.full_tensor()  # all-gather: (rows, cols)
                full = newton_schulz(full, steps=group["ns_steps"], dtype=self.ns_dtype)
                # each rank computed the same full result: keep the local slice, no communication
                self._apply(p, x, distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None), lr)
            else:
                wide = u.mT if u.size(0) > u.size(1) else u
                buckets.setdefault((tuple(wide.shape), u.device), []).append((p, x, wide))
        for bucket in buckets.values():
            stack = torch.stack([w for _, _, w in bucket])  # (n, rows, cols)
            o = newton_schulz(stack, steps=group["ns_steps"], dtype=self.ns_dtype)
            for (p, x, _), oi in zip(bucket, o):
                self._apply(p, x, oi.mT if p.size(0) > p.size(1) else oi, lr)

    def _momentum(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """B <- mu B + G; returns the Nesterov G + mu B (or B): fp32, out of place (.grad untouched)."""
        g = p.grad
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g, dtype=torch.float32)  # same placement as G
        buf = state["momentum_buffer"]
        mu = group["momentum"]
        buf.mul_(mu).add_(g)
        return torch.add(g, buf, alpha=mu) if group["nesterov"] else buf

    def _apply(self, p: Tensor, x: Tensor, o: Tensor, lr: float) -> None:
        """W <- W - lr x 0.2 sqrt(max dim) x O, written back to p (rounded if p is bf16)."""
        rows, cols = p.shape
        x.add_(o, alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))
        write_back(p, x, stochastic=self.stochastic_rounding, rng=self.rng)

    def _adam_state(self, p: Tensor) -> dict[str, Any]:
        """p's AdamW state (torch.optim.AdamW's keys), created at zero on first use."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p.grad, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p.grad, dtype=torch.float32)
        return state

    def _fused_adamw(self, params: list[Tensor], group: dict[str, Any], lr: float) -> None:
        """One AdamW group of plain fp32 tensors in torch's fused kernel: the update of _decayed +
        _adamw_update in one pass over each tensor (on a 2-core CPU 11x faster for `demo`'s embedding and
        head: 3 against 34 ms a step, most of what the AdamW part cost)."""
        states = [self._adam_state(p) for p in params]
        for p, st in zip(params, states):
            if st["step"].device != p.device:  # the fused kernel wants its step counters beside the data
                st["step"] = st["step"].to(p.device)
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)  # the kernel reads the step count, as torch.optim.AdamW's caller does
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(params, [p.grad for p in params], [st["exp_avg"] for st in states],
                            [st["exp_avg_sq"] for st in states], [], steps, lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                            amsgrad=False, maximize=False)

    def _adamw_update(self, p: Tensor, x: Tensor, group: dict[str, Any], lr: float) -> None:
        """The update of torch.optim.AdamW (non-fused), with fp32 moments for any parameter dtype."""
        state = self._adam_state(p)
        g = p.grad
        state["step"] += 1
        t = state["step"].item()
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g32 = g.float()
        m.lerp_(g32, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t
        denom = (v.sqrt() / math.sqrt(bias2)).add_(group["eps"])
        x.addcdiv_(m, denom, value=-lr / bias1)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (both parts) plus the rounding generator's state."""
        return save_with_rng(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of state_dict(); fp32 moments stay fp32 even for bf16 parameters."""
        load_with_rng(self, state_dict, super().load_state_dict)
