"""Activation checkpointing changes no numbers; compiled blocks do not recompile across steps."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_inductor_cpu
from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.model import build_model
from kiln.parallel.compile_ac import apply_activation_checkpointing, apply_compile, apply_fp8

CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, qk_norm=True,
                  max_seq_len=64)


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 256, (2, 16), generator=g)
    tgt = torch.randint(0, 256, (2, 16), generator=g)
    cut = int(torch.randint(2, 14, (1,), generator=g))
    doc = (torch.arange(16) >= cut).long().expand(2, 16).clone()  # two documents per row
    return tok, doc, tgt


def _step(model, seed: int = 0):
    tok, doc, tgt = _batch(seed)
    loss = model(tok, doc, targets=tgt)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_is_bitwise_and_keeps_names(mode):
    ref_loss, ref = _step(build_model(CFG, seed=0))
    model = apply_activation_checkpointing(build_model(CFG, seed=0), mode)
    loss, grads = _step(model)
    assert list(grads) == list(ref)  # same parameter names: checkpoints and optimizer groups unchanged
    assert torch.equal(loss, ref_loss)
    for name, g in ref.items():
        assert torch.equal(grads[name], g), name
    with torch.no_grad():  # eval/generation bypasses checkpointing
        tok, doc, _ = _batch(0)
        assert model(tok, doc).shape == (2, 16, 256)


def test_checkpointing_recomputes():
    """Full checkpointing stores only block inputs; selective stores less than none but more than full."""
    saved = {}
    for mode in ("none", "selective", "full"):
        model = apply_activation_checkpointing(build_model(CFG, seed=0), mode)
        counted = []

        def pack(t, counted=counted):
            counted.append(t)
            return t
        tok, doc, tgt = _batch(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.hidden(tok, doc_ids=doc)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved[mode] = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in counted
                       if t.untyped_storage().data_ptr() not in params}
    # full: per block only its input (B, T, d) fp32, plus the final norm's tensors and shared ids/masks
    block_inputs = CFG.n_layers * 2 * 16 * CFG.d_model * 4
    assert sum(saved["full"].values()) < sum(saved["none"].values()) / 3
    assert sum(saved["full"].values()) >= block_inputs
    with pytest.raises(ConfigError, match="already applied"):
        apply_activation_checkpointing(model, "full")
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        apply_activation_checkpointing(build_model(CFG, seed=0), "some")


@pytest.mark.parametrize("mode, ac", [
    ("block", "selective"),
    pytest.param("block", "none", marks=pytest.mark.slow),  # the inductor test below covers it too
    pytest.param("model", "none", marks=pytest.mark.slow),  # traces the whole trunk: ~12 s
])
def test_compile_has_no_recompiles_across_steps(mode, ac):
    """aot_eager traces exactly what inductor would (same guards and graphs) without C++ codegen."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_loss, eager = _step(build_model(CFG, seed=0))
    model = apply_compile(apply_activation_checkpointing(build_model(CFG, seed=0), ac), mode, backend="aot_eager")
    loss, grads = _step(model)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for name, g in eager.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1  # every layer shares one graph (block mode) / one trunk graph (model mode)
    for seed in (1, 2, 3):  # new documents, new tokens, same shapes
        model.zero_grad()
        _step(model, seed)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["recompiles"]


@needs_inductor_cpu
@pytest.mark.slow
def test_inductor_blocks_match_eager():
    """The real backend on CPU (C++ codegen; about 20 s): same numbers, one compile, no recompiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    eager_model, model = build_model(cfg, seed=0), apply_compile(build_model(cfg, seed=0), "block")
    tok, doc, tgt = _batch(0)
    ref = eager_model(tok, doc, targets=tgt)
    ref.backward()
    loss = model(tok, doc, targets=tgt)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for (n, a), b in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)
    graphs = counters["stats"]["unique_graphs"]
    for seed in (1, 2):
        _step(model, seed)
    assert counters["stats"]["unique_graphs"] == graphs == 1


def test_fp8_needs_a_recent_gpu():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("an FP8-capable GPU is present")
    with pytest.raises(ConfigError, match="fp8"):
        apply_fp8(build_model(CFG, seed=0))


def test_selective_checkpointing_saves_torchtitans_list():
    """Besides matmuls and attention kernels, selective AC keeps what torchtitan's _op_sac_save_list keeps
    (where this torch has it): flex attention, TP's reduce-scatter, inductor-compiled regions, and
    aten.max, fp8's amax, which backward must not recompute (shown: it runs once, in the forward)."""
    import functools

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from kiln.parallel.compile_ac import _saved_ops, _selective_policy

    ops = _saved_ops()
    for hop in ("flex_attention", "inductor_compiled_code"):
        if hasattr(torch._higher_order_ops, hop):
            assert getattr(torch._higher_order_ops, hop) in ops, hop
    if hasattr(torch.ops._c10d_functional, "reduce_scatter_tensor"):
        assert torch.ops._c10d_functional.reduce_scatter_tensor.default in ops

    class CountMax(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.max.default
            return func(*args, **(kwargs or {}))

    def scaled(x):  # an fp8-style cast: scale by the amax, then a recomputable elementwise op
        return (x / x.abs().max()).sin().sum()

    x = torch.randn(8, 8, requires_grad=True)
    context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    with CountMax() as counter:
        checkpoint(scaled, x, use_reentrant=False, context_fn=context_fn).backward()
    assert counter.n == 1


def test_unwrap_finds_the_transformer_inside_ddp_and_a_whole_model_compile():
    """generate, RLVR's policy copy and the checkpoint aliases read `.cfg` and the plain names through unwrap."""
    from torch import nn

    from kiln.parallel.parallelize import unwrap

    model = build_model(CFG, seed=0)

    class DDPLike(nn.Module):  # DDP keeps the wrapped module in .module
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    compiled = torch.compile(model)  # compiles nothing until called
    for wrapped in (model, compiled, DDPLike(model), DDPLike(compiled), torch.compile(DDPLike(model))):
        assert unwrap(wrapped) is model
