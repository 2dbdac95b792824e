"""Device and precision decisions, made in one place: which device, which autocast dtype, which
matmul precision (the peak that MFU divides by).

    train.dtype  auto: bf16 autocast on CUDA and on CPUs with bf16 matmul instructions (AMX or AVX512-BF16),
                 fp32 on other CPUs;
                 bf16: autocast everywhere;  fp32: none
    optim.param_dtype=bf16 makes every matmul bf16 even without autocast (bf16 weights, bf16 activations)
"""

from __future__ import annotations

import contextlib
import platform

import torch

from kiln.config import DType
from kiln.errors import KilnError

Precision = str  # "bf16" | "fp16" | "tf32" | "fp32" | "fp8"
_LOW = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def pick_device(choice: str, *, option: str = "run.device") -> torch.device:
    """`run.device` (auto | cpu | cuda) -> the device; cuda without a visible GPU is a user error naming
    `option` (a command's own flag, e.g. --device, where the user typed one)."""
    if choice == "cuda" and not torch.cuda.is_available():
        if option.startswith("--"):
            raise KilnError(f"{option} cuda: no CUDA device is visible; use {option} auto or cpu")
        raise KilnError(f"{option}=cuda but no CUDA device is visible; use {option}=auto or cpu")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AMX tiles (Intel Sapphire Rapids and later)
    or AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake). oneDNN then runs bf16 matmuls
    faster than fp32 ones: a `demo` step 1.3x faster on a Zen 4 EPYC (bench/RESULTS.md, "bf16 on an
    AVX512-BF16 CPU"), 1.3x on a Sapphire Rapids Xeon. With AVX2 alone bf16 is emulated and much slower,
    so `auto` keeps fp32 there."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            pass
    return False


def autocast_dtype(dtype: DType, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.dtype` on `device`: with `auto`, bf16 where the matmul units run it
    fast (CUDA, CPUs with bf16 matmul instructions), else none (fp32)."""
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matmul())
    if dtype == "bf16" or (dtype == "auto" and fast):
        return torch.bfloat16
    return None


def autocast_for(dtype: DType, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for `autocast_dtype` (a no-op context without one)."""
    low = autocast_dtype(dtype, device)
    return torch.autocast(device.type, dtype=low) if low is not None else contextlib.nullcontext()


def matmul_precision(*, device: torch.device, autocast_dtype: torch.dtype | None,
                     param_dtype: torch.dtype = torch.float32) -> Precision:
    """The precision the tensor cores run the matmuls in, for picking the peak.

    Autocast's dtype when there is one; else the parameters' dtype when it is 16-bit (bf16 weights
    make bf16 activations, so every matmul runs in bf16); else tf32 / fp32.
    """
    if autocast_dtype is not None:
        return _LOW.get(autocast_dtype, "fp32")
    if param_dtype in _LOW:
        return _LOW[param_dtype]
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def train_precision(dtype: DType, param_dtype: torch.dtype, device: torch.device) -> Precision:
    """The matmul precision training runs at on `device` (train.dtype, optim.param_dtype): the one
    helper the trainer's MFU and `kiln bench` pick their peak with."""
    return matmul_precision(device=device, autocast_dtype=autocast_dtype(dtype, device), param_dtype=param_dtype)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
