"""8-bit AdamW (Dettmers et al. 2022) through torchao: block-wise quantised moments, 2 bytes of state per parameter
instead of 8 (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

torchao's AdamW8bit compiles its per-parameter step with torch.compile, so it runs on CUDA and, given a
C++ compiler for inductor, on CPU. Tensors under 4096 elements (norms, biases) keep fp32 moments.
torchao needs `group["lr"]` to be a tensor; kiln's trainer writes a float each step, so the adapter below
converts it before every step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kiln.errors import ConfigError

_SUPPORTED_DEVICES = ("cuda", "cpu")
_INSTALL = "pip install 'kiln[lowmem]' (torchao)"


def _import_torchao_adamw8bit() -> type:
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)  # torchao warns about GPU-only kernel libraries it cannot load on CPU
    try:
        from torchao.optim import AdamW8bit
    finally:
        log.setLevel(level)
    return AdamW8bit


def _check_cpu_compiler() -> None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # layout of a private module changed: let torch.compile report it
        return
    try:
        get_cpp_compiler()
    except Exception:
        raise ConfigError("optim.name=adamw8bit on CPU compiles its step with torch.compile, which needs a C++ "
                          "compiler (install g++), or use optim.name=adamw") from None


def build_adamw8bit(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float], eps: float,
                    device_type: str) -> torch.optim.Optimizer:
    """torchao's AdamW8bit over `groups` (each with its weight_decay), or a one-line ConfigError saying
    why this device or environment cannot run it and what to use instead."""
    if device_type not in _SUPPORTED_DEVICES:
        raise ConfigError(f"optim.name=adamw8bit: torchao's 8-bit AdamW has no kernels for device "
                          f"'{device_type}'; use optim.name=adamw (or adafactor for low optimizer memory)")
    try:
        base = _import_torchao_adamw8bit()
    except ImportError:
        raise ConfigError(f"optim.name=adamw8bit needs torchao: {_INSTALL}, or use optim.name=adamw") from None
    if device_type == "cpu":
        _check_cpu_compiler()

    class KilnAdamW8bit(base):  # type: ignore[misc, valid-type]
        """torchao AdamW8bit that accepts a float group['lr'] (the trainer's per-step schedule)."""

        def step(self, closure: Any = None) -> Any:
            for group in self.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
            return super().step(closure)

    return KilnAdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
