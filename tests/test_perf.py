"""FLOPs per token checked by hand, the device peak table, MFU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.config import load_config
from kiln.device import matmul_precision, train_precision
from kiln.model import Transformer
from kiln.optim.builder import param_dtype
from kiln.perf import device_peak, flops_per_token, lookup_peak, matmul_params, mfu
from kiln.runinfo import git_describe


def test_flops_by_hand_tiny():
    # tiny: L=4, d=128, H=4, Hkv=2, hd=32, ffn=384, V=32768, tied, T=256
    m = load_config("tiny").model
    per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 384  # q, k+v, o, SwiGLU
    n = 4 * per_layer + 32768 * 128  # + the head once (tied: the embedding is not counted again)
    assert n == 4_980_736
    f = flops_per_token(m, seq_len=256)
    assert f.matmul_params == n
    assert f.dense == 6 * n
    assert f.attention == 6 * 4 * 256 * (4 * 32)  # 12 L T d_attn / 2
    assert f.total == 30_670_848


def test_flops_by_hand_dense_180m():
    # dense-180m: L=32, d=768, H=12, Hkv=4, hd=64, ffn=2048, V=32768, tied, T=2048
    m = load_config("dense-180m").model
    per_layer = 768 * 768 + 2 * 768 * 256 + 768 * 768 + 3 * 768 * 2048
    n = 32 * per_layer + 32768 * 768
    f = flops_per_token(m, seq_len=2048)
    assert f.matmul_params == n == 226_492_416
    assert f.attention == 6 * 32 * 2048 * 768 == 301_989_888
    assert f.total == 6 * n + 301_989_888 == 1_660_944_384
    # 45% MFU on an H100 SXM (989.4 dense bf16 TFLOP/s) is this many tokens/s
    peak = lookup_peak("NVIDIA H100 80GB HBM3").tflops["bf16"] * 1e12
    assert mfu(tokens_per_sec=268_063, flops_per_token=f.total, peak_flops=peak) == pytest.approx(0.45, abs=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_matmul_params_match_the_built_model(tie):
    """N counts every Linear weight in the blocks plus the head once; the embedding lookup is no matmul."""
    cfg = load_config("tiny", ["--model.tie_embeddings", str(tie).lower(), "--model.qk_norm", "true"]).model
    with torch.device("meta"):
        model = Transformer(cfg)
    linear = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear))
    head = 0 if model.head is not None else cfg.vocab_size * cfg.d_model  # tied: the head is tok_emb's matrix
    assert matmul_params(cfg) == linear + head


def test_gqa_and_causal_are_counted():
    base = load_config("tiny", ["--model.n_kv_heads", "4"]).model
    gqa = load_config("tiny", ["--model.n_kv_heads", "1"]).model
    d, hd, L = base.d_model, base.hd, base.n_layers
    # GQA shrinks only the k and v projections: 2 x d x (4 - 1) x hd per layer fewer weights
    assert matmul_params(base) - matmul_params(gqa) == L * 2 * d * 3 * hd
    # attention scores and values do not shrink with GQA (every query head still attends)
    assert flops_per_token(base, seq_len=512).attention == flops_per_token(gqa, seq_len=512).attention
    # doubling T doubles the (causal-halved) attention term only
    a, b = flops_per_token(base, seq_len=256), flops_per_token(base, seq_len=512)
    assert b.attention == 2 * a.attention and b.dense == a.dense


@pytest.mark.parametrize("name, canonical, bf16", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5),
    ("NVIDIA H200", "H200 SXM", 989.4),
    ("NVIDIA GH200 480GB", "GH200", 989.4),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA L40S", "L40S", 362.05),
    ("NVIDIA L40", "L40", 181.05),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA A10G", "A10G", 125.0),
    ("NVIDIA A10", "A10", 125.0),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", "RTX 3090", 71.0),
    ("NVIDIA GeForce RTX 3090 Ti", "RTX 3090 Ti", 80.0),
    ("Tesla V100-SXM2-16GB", "V100 SXM2", None),
])
def test_peak_table_lookup(name, canonical, bf16):
    entry = lookup_peak(name)
    assert entry is not None and entry.name == canonical
    assert entry.tflops["bf16"] == bf16
    # dense, never the 2:4-sparsity figure: tf32 is half of bf16 on every tensor-core part that has both
    if bf16 is not None and entry.tflops["tf32"] is not None and "RTX" not in canonical:
        assert entry.tflops["tf32"] == pytest.approx(bf16 / 2, rel=0.02)


def test_unknown_device_and_cpu_give_no_mfu():
    assert lookup_peak("NVIDIA Imaginary X9") is None
    info = device_peak(torch.device("cpu"), precision="fp32")
    assert info.peak_flops is None and "CPU" in info.note
    assert mfu(tokens_per_sec=1e6, flops_per_token=1e9, peak_flops=info.peak_flops) is None
    # several devices share the work: MFU is per device
    assert mfu(tokens_per_sec=2e5, flops_per_token=1e9, peak_flops=1e15, n_devices=2) == pytest.approx(0.1)


@pytest.mark.parametrize("dtype, weights, name, want", [
    ("fp32", "fp32", "adamw", {"cuda": ("tf32", "fp32"), "cpu": ("fp32",)}),
    ("auto", "fp32", "adamw", {"cuda": ("bf16",), "cpu": ("fp32",)}),
    ("bf16", "fp32", "adamw", {"cuda": ("bf16",), "cpu": ("bf16",)}),
    ("fp32", "bf16", "adafactor", {"cuda": ("bf16",), "cpu": ("bf16",)}),  # bf16 weights: bf16 matmuls
    ("auto", "bf16", "muon", {"cuda": ("bf16",), "cpu": ("bf16",)}),
])
def test_train_precision_follows_autocast_and_parameter_dtype(dtype, weights, name, want, monkeypatch):
    """The MFU peak is read at the precision the matmuls run in; with bf16 parameters under train.dtype=fp32
    that is bf16 (the fp32 peak would read ~15x too high on an H100). A CPU without bf16 matmuls here."""
    import kiln.device

    monkeypatch.setattr(kiln.device, "cpu_has_bf16_matmul", lambda: False)
    cfg = load_config("tiny", ["--train.dtype", dtype, "--optim.param_dtype", weights, "--optim.name", name])
    for dev, ok in want.items():
        assert train_precision(cfg.train.dtype, param_dtype(cfg.optim), torch.device(dev)) in ok, dev
    assert matmul_precision(device=torch.device("cpu"), autocast_dtype=None, param_dtype=torch.bfloat16) == "bf16"
    monkeypatch.setattr(kiln.device, "cpu_has_bf16_matmul", lambda: True)  # auto: bf16 where it runs fast
    assert train_precision("auto", torch.float32, torch.device("cpu")) == "bf16"
    h100 = lookup_peak("NVIDIA H100 80GB HBM3")
    assert h100.tflops["bf16"] / h100.tflops["fp32"] == pytest.approx(14.8, abs=0.1)  # the size of the error


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, False, True), (False, True, True), (False, False, False)])
def test_auto_dtype_is_bf16_on_cpus_with_bf16_matmul_instructions(amx, avx512_bf16, want, monkeypatch):
    """AMX (Sapphire Rapids) or AVX512-BF16 (Zen 4, Cooper Lake): bf16 autocast; AVX2 alone: fp32."""
    import kiln.device

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert kiln.device.cpu_has_bf16_matmul() is want
    cpu = torch.device("cpu")
    assert kiln.device.autocast_dtype("auto", cpu) == (torch.bfloat16 if want else None)
    assert kiln.device.autocast_dtype("fp32", cpu) is None and kiln.device.autocast_dtype("bf16", cpu) == torch.bfloat16


def test_git_describe_marks_a_dirty_tree(tmp_path, monkeypatch):
    """Benchmarks record the commit; +dirty when the tree differs from it (a modified or a new file)."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    monkeypatch.delenv("KILN_GIT_SHA", raising=False)
    assert git_describe(tmp_path) is None  # not a checkout
    monkeypatch.setenv("KILN_GIT_SHA", "abc1234")  # a copy without .git (a lent GPU machine) is told its commit
    assert git_describe(tmp_path) == "abc1234"
    monkeypatch.delenv("KILN_GIT_SHA")

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                       cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True).stdout.strip()
    assert git_describe(tmp_path) == sha
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_describe(tmp_path) == sha + "+dirty"
    (tmp_path / "a.py").write_text("x = 1\n")  # back to the committed content
    assert git_describe(tmp_path) == sha
    (tmp_path / "b.py").write_text("new\n")  # an uncommitted new source file is a change too
    assert git_describe(tmp_path) == sha + "+dirty"


def test_run_info_reads_library_versions_without_importing_them():
    """The versions logged at a run's start come from package metadata: importing transformers for its
    __version__ cost ~0.5 s per run, and pretraining never needs it."""
    import subprocess
    import sys

    code = ("import json, sys, torch; from kiln.runinfo import run_info; info = run_info(torch.device('cpu')); "
            "print(json.dumps([info['transformers'], info['datasets'], info['tokenizers'], "
            "'transformers' in sys.modules, 'datasets' in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    import datasets
    import tokenizers
    import transformers

    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == [transformers.__version__, datasets.__version__, tokenizers.__version__, False, False]
