"""Stochastic rounding to bf16, for parameters kept in bf16 with no fp32 master copy.

Round-to-nearest drops every update smaller than half a bf16 ulp (2^-8 relative), so a bf16 weight
stops moving once lr x update falls below ~0.4% of its magnitude. Stochastic rounding rounds up with
probability equal to the distance from the lower neighbour, so the expected stored value equals the
fp32 result and small updates survive on average (Gupta et al. 2015; Zamirai et al. 2020, "Revisiting
BFloat16 Training").

The noise generator is state too, saved on one of two paths:
  - `Optimizer.state_dict()` (save_with_rng below adds a "rounding_rng" key): for a plain
    torch.save of the optimizer, as the tests and standalone scripts do.
  - kiln's trainer does NOT use that key. It checkpoints the optimizer through DCP's
    layout-independent state dict (torch.distributed.checkpoint.state_dict), which keeps only
    "state" and "param_groups", and saves the generators per rank through
    kiln.train.engine.Optimizers.extra_state() / load_extra_state() (RoundingRNG.state_dict below).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_LOW_BITS = 1 << 16  # bf16 is the top 16 bits of an fp32 bit pattern
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as a signed int32


def stochastic_round_(dst: Tensor, src: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Write fp32 `src` into bf16 `dst` (same shape), rounding each element stochastically.

    Adds uniform random bits below the bf16 mantissa to the fp32 bit pattern, then truncates them.
    fp32 bits are sign-magnitude, so this rounds the magnitude up with probability (low bits / 2^16)
    for either sign: unbiased. Values already representable in bf16 are unchanged.
    """
    assert src.dtype == torch.float32 and dst.dtype == torch.bfloat16 and src.shape == dst.shape
    noise = torch.randint(0, _LOW_BITS, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    bits = src.view(torch.int32).add(noise).bitwise_and_(_HIGH_MASK)
    dst.copy_(bits.view(torch.float32))  # exact: the low 16 bits are zero
    return dst


class RoundingRNG:
    """One torch.Generator per device, seeded from the config, whose state travels in state_dict().

    Generators are created lazily (the first step tells the device); a state loaded before that is
    applied when the generator is created, so a resumed run draws the same noise as an uninterrupted one.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, Tensor] = {}

    def get(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending:
                gen.set_state(self._pending.pop(key))
            self._generators[key] = gen
        return gen

    def state_dict(self) -> dict[str, Any]:
        states = dict(self._pending)
        states.update({k: g.get_state() for k, g in self._generators.items()})
        return {"seed": self.seed, "states": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self._generators.clear()
        self._pending = {k: v.clone() for k, v in state["states"].items()}


def write_back(p: Tensor, x: Tensor, *, stochastic: bool, rng: RoundingRNG) -> None:
    """Store the fp32 result `x` of an update into parameter `p`.

    fp32 parameters are updated in place by the caller (x is p), so there is nothing to do. bf16
    parameters get stochastic rounding or round-to-nearest. DTensors are rounded shard by shard: each
    rank draws noise for its local shard only.
    """
    if x is p:
        return
    if p.dtype == torch.bfloat16 and stochastic:
        local_p = p.to_local() if hasattr(p, "to_local") else p
        local_x = x.to_local() if hasattr(x, "to_local") else x
        stochastic_round_(local_p, local_x, generator=rng.get(local_p.device))
    else:
        p.copy_(x)


def as_fp32(p: Tensor) -> Tensor:
    """The parameter itself when it is fp32 (updated in place), else an fp32 working copy."""
    return p if p.dtype == torch.float32 else p.float()


def save_with_rng(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """Add the optimizer's RoundingRNG (attribute `rng`) to torch's state dict (the torch.save path;
    the trainer's DCP checkpoints drop this key and use Engine's extra_state, see the module docstring)."""
    sd["rounding_rng"] = opt.rng.state_dict()  # type: ignore[attr-defined]
    return sd


def load_with_rng(opt: torch.optim.Optimizer, state_dict: dict[str, Any], load: Any) -> None:
    """Load torch's part with `load` (the base class method), then the generator, then undo torch's cast.

    torch.optim casts every floating state tensor to its parameter's dtype on load. Our statistics are
    fp32 by design, and a bf16 round trip would make a resumed run drift, so the saved fp32 values are
    put back (moved to the parameter's device).
    """
    state_dict = dict(state_dict)
    rng = state_dict.pop("rounding_rng", None)
    load(state_dict)
    if rng is not None:
        opt.rng.load_state_dict(rng)  # type: ignore[attr-defined]
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in zip(saved_ids, params):
        for k, v in state_dict["state"].get(i, {}).items():
            if k != "step" and isinstance(v, Tensor) and v.dtype == torch.float32 and p.dtype != torch.float32:
                opt.state[p][k] = v.to(device=p.device, copy=True)
