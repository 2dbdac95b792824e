"""Honest training FLOPs and MFU: what the model really computes, over what the device can really do.

FLOPs per trained token (forward + backward = 3 x forward; a multiply-add is 2 FLOPs):

    dense     = 6 * N_matmul
    attention = 12 * L * T * (H * hd) / 2 = 6 * L * T * H * hd

N_matmul counts every weight matrix that takes part in a matmul: per layer q (d x H*hd), k and v
(d x Hkv*hd each: GQA's smaller K/V), o (H*hd x d) and the SwiGLU's three matrices, plus the output
head (V x d) once. The embedding lookup is a gather, not a matmul, so a tied embedding/head matrix
is counted once (as the head) and an untied input embedding not at all; norms, RoPE and the
softmax are left out (they are not tensor-core work). The attention term is QK^T and PV: 2 matmuls
x 2 FLOPs x T keys x H*hd per query token and layer, times 3 for training, halved because a causal
mask lets a query see T/2 keys on average (the exact mean is (T + 1) / 2: half a key more, dropped
here) (Kaplan et al. 2020 App. B; PaLM App. B; the bugs this avoids: torchtitan #341, OLMo-core PR
#478). Document masking skips more of the matrix but most kernels still compute it, so it is not
subtracted. Activation recomputation is never counted: this is MFU, not hardware FLOPs utilisation.

The matmul precision (which peak to divide by) is bf16 when autocast runs in bf16 and also when the
parameters themselves are bf16 (optim.param_dtype=bf16): then every matmul runs in bf16 even under
train.dtype=fp32. `kiln.device.train_precision` is the one place that decides it.

The peak is looked up from `torch.cuda.get_device_name()` in a table of dense (no 2:4 sparsity)
vendor numbers per precision. An unknown device gives mfu=None with a note, never a guess
(nanoGPT #464: a hard-coded A100 peak reads 104% on an H100).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kiln.config import ModelConfig
from kiln.device import Precision, cpu_name


@dataclass(frozen=True)
class Flops:
    """Training FLOPs per token, split so each term can be checked by hand."""

    matmul_params: int  # N in 6N
    dense: float  # 6 * N
    attention: float  # 6 * L * T * H * hd (causal half of 12 L T d_attn)

    @property
    def total(self) -> float:
        return self.dense + self.attention


def block_matrix_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of every weight matrix of one Block: q, k, v, o, then the SwiGLU's gate, up, down."""
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.hd, cfg.n_kv_heads * cfg.hd, cfg.ffn_dim
    return [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: all blocks plus the output head once."""
    block = sum(r * c for r, c in block_matrix_shapes(cfg))
    return cfg.n_layers * block + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, *, seq_len: int) -> Flops:
    """Forward + backward FLOPs per trained token at sequence length `seq_len`."""
    n = matmul_params(cfg)
    attention = 6.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.hd
    return Flops(matmul_params=n, dense=6.0 * n, attention=attention)


# ---------------------------------------------------------------------------------------------
# Dense peak TFLOP/s per precision (vendor datasheets / architecture whitepapers; the figures
# "with sparsity" halved). GeForce cards use the "FP32 accumulate" tensor rates, which training
# uses. None: the precision has no tensor-core path there (e.g. bf16 on V100 / T4).


@dataclass(frozen=True)
class DevicePeak:
    name: str  # canonical name in the table
    tflops: dict[str, float | None]
    source: str


def _p(bf16: float | None, fp16: float | None, tf32: float | None, fp32: float,
       fp8: float | None = None) -> dict[str, float | None]:
    return {"bf16": bf16, "fp16": fp16, "tf32": tf32, "fp32": fp32, "fp8": fp8}


# (regex on the CUDA device name, entry). First match wins, so specific names come first.
PEAK_TABLE: list[tuple[str, DevicePeak]] = [
    (r"GH200", DevicePeak("GH200", _p(989.4, 989.4, 494.7, 66.9, 1978.9), "NVIDIA GH200 datasheet (H100 SXM compute)")),
    (r"H200.*NVL", DevicePeak("H200 NVL", _p(835.5, 835.5, 417.5, 60.0, 1670.5), "NVIDIA H200 datasheet, NVL column")),
    (r"H200", DevicePeak("H200 SXM", _p(989.4, 989.4, 494.7, 66.9, 1978.9), "NVIDIA H200 datasheet, SXM column")),
    (r"H100.*NVL", DevicePeak("H100 NVL", _p(835.5, 835.5, 417.5, 60.0, 1670.5), "NVIDIA H100 datasheet, NVL column")),
    (r"H100.*PCIe", DevicePeak("H100 PCIe", _p(756.5, 756.5, 378.0, 51.2, 1513.0), "NVIDIA H100 datasheet, PCIe column")),
    (r"H100", DevicePeak("H100 SXM", _p(989.4, 989.4, 494.7, 66.9, 1978.9), "NVIDIA H100 datasheet, SXM column")),
    (r"B200", DevicePeak("B200", _p(2250.0, 2250.0, 1125.0, 75.0, 4500.0), "NVIDIA HGX B200 datasheet / 8 GPUs")),
    (r"A100", DevicePeak("A100", _p(312.0, 312.0, 156.0, 19.5), "NVIDIA A100 datasheet (40/80 GB, SXM and PCIe)")),
    (r"L40S", DevicePeak("L40S", _p(362.05, 362.05, 183.0, 91.6, 733.0), "NVIDIA L40S datasheet")),
    (r"\bL40\b", DevicePeak("L40", _p(181.05, 181.05, 90.5, 90.5, 362.0), "NVIDIA L40 datasheet")),
    (r"\bL4\b", DevicePeak("L4", _p(121.0, 121.0, 60.0, 30.3, 242.5), "NVIDIA L4 datasheet")),
    (r"A10G", DevicePeak("A10G", _p(125.0, 125.0, 62.5, 31.2), "no public A10G datasheet; NVIDIA A10 figures")),
    (r"\bA10\b", DevicePeak("A10", _p(125.0, 125.0, 62.5, 31.2), "NVIDIA A10 datasheet")),
    (r"\bA40\b", DevicePeak("A40", _p(149.7, 149.7, 74.8, 37.4), "NVIDIA A40 datasheet")),
    (r"\bA30\b", DevicePeak("A30", _p(165.0, 165.0, 82.0, 10.3), "NVIDIA A30 datasheet")),
    (r"RTX 6000 Ada", DevicePeak("RTX 6000 Ada", _p(364.2, 364.2, 182.1, 91.1, 728.5),
                                 "NVIDIA RTX 6000 Ada datasheet")),
    (r"RTX A6000", DevicePeak("RTX A6000", _p(154.8, 154.8, 77.4, 38.7), "NVIDIA RTX A6000 datasheet")),
    (r"RTX 4090", DevicePeak("RTX 4090", _p(165.2, 165.2, 82.6, 82.6, 330.3), "NVIDIA Ada whitepaper, FP32 accumulate")),
    (r"RTX 4080", DevicePeak("RTX 4080", _p(97.5, 97.5, 48.7, 48.7, 194.9), "NVIDIA Ada whitepaper, FP32 accumulate")),
    (r"RTX 3090 Ti", DevicePeak("RTX 3090 Ti", _p(80.0, 80.0, 40.0, 40.0), "NVIDIA GA102 whitepaper, FP32 accumulate")),
    (r"RTX 3090", DevicePeak("RTX 3090", _p(71.0, 71.0, 35.6, 35.6), "NVIDIA GA102 whitepaper, FP32 accumulate")),
    (r"V100.*PCI", DevicePeak("V100 PCIe", _p(None, 112.0, None, 14.0), "NVIDIA V100 datasheet, PCIe column")),
    (r"V100", DevicePeak("V100 SXM2", _p(None, 125.0, None, 15.7), "NVIDIA V100 datasheet, SXM2 column")),
    (r"\bT4\b", DevicePeak("T4", _p(None, 65.0, None, 8.1), "NVIDIA T4 datasheet")),
    (r"MI300X|MI325X", DevicePeak("MI300X", _p(1307.4, 1307.4, 653.7, 163.4, 2614.9), "AMD Instinct MI300X datasheet")),
]


def lookup_peak(device_name: str) -> DevicePeak | None:
    """The table entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None."""
    for pattern, entry in PEAK_TABLE:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return entry
    return None


@dataclass(frozen=True)
class PeakInfo:
    device_name: str
    precision: Precision
    peak_flops: float | None  # FLOP/s, None when unknown
    note: str


def device_peak(device: torch.device, *, precision: Precision) -> PeakInfo:
    """Dense peak FLOP/s of `device` at `precision`; None (with a note) on CPU or an unknown GPU."""
    if device.type != "cuda":
        return PeakInfo(cpu_name(), precision, None, "no MFU on CPU: there is no meaningful vendor peak to divide by")
    name = torch.cuda.get_device_name(device)
    entry = lookup_peak(name)
    if entry is None:
        return PeakInfo(name, precision, None, f"'{name}' is not in kiln.perf.PEAK_TABLE; add its dense peak to get MFU")
    tflops = entry.tflops.get(precision)
    if tflops is None:
        return PeakInfo(name, precision, None, f"{entry.name} has no {precision} tensor-core peak in the table")
    return PeakInfo(name, precision, tflops * 1e12, f"{entry.name} dense {precision} {tflops:g} TFLOP/s ({entry.source})")


def mfu(*, tokens_per_sec: float, flops_per_token: float, peak_flops: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the devices' dense peak."""
    if peak_flops is None or peak_flops <= 0:
        return None
    return tokens_per_sec * flops_per_token / (peak_flops * n_devices)
