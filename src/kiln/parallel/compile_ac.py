"""Activation checkpointing, torch.compile and FP8, applied to a kiln Transformer from outside.

`parallelize()` calls these in torchtitan's order: tensor parallel -> activation checkpointing ->
compile -> FSDP. All of them keep every parameter's name, so checkpoints, optimizer groups and HF
export see the same state dict with or without them.

Activation checkpointing (`train.activation_checkpointing`):
  full       each Block keeps only its input; backward re-runs the whole block (Chen et al. 2016).
  selective  op-level: inside each Block the outputs of matmuls and attention kernels are saved and
             everything else (RMSNorm, RoPE, SiLU, casts and their fp32 copies) is recomputed. These
             are the cheap-to-redo but memory-heavy tensors (Korthikanti et al. 2022 select by the
             same cost/memory trade, for attention's softmax). Uses torch.utils.checkpoint's policy
             API (`create_selective_checkpoint_contexts`).
Recomputation changes no numbers: kiln's blocks use no randomness and the recomputed ops are the same
ops on the same inputs (tests compare gradients bit for bit).

Compile (`train.compile`, `train.compile_mode`):
  block  each Block is compiled separately (`nn.Module.compile`, fullgraph); all layers share one
         compiled graph and the trunk's Python (masks, loop) stays eager. Fast to compile.
  model  the whole trunk (`Transformer._trunk`: embedding, masks and every block) as one graph.
Shapes are static (dynamic=False): a training run feeds one (B, T), so there is nothing to trace
twice; masks are built before the blocks run (kiln.model.attention.prepare_mask), so the blocks
see the same inputs every layer and step and do not recompile.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from kiln.config import ACMode, CompileMode
from kiln.errors import ConfigError


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.layers.values())


@functools.cache
def _saved_ops() -> frozenset:
    """Ops whose outputs selective checkpointing keeps: matmuls and attention kernels, plus the rest of
    torchtitan's `_op_sac_save_list`: flex attention (a higher-order op), TP's reduce-scatter (recomputing
    it would repeat the collective), aten.max (fp8's amax, which the scale is computed from) and
    inductor-compiled regions. Each is looked up with hasattr: older torch builds lack some."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_mm", "max"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None and hasattr(c10d, "reduce_scatter_tensor"):
        ops.add(c10d.reduce_scatter_tensor.default)
    for hop in ("flex_attention", "inductor_compiled_code"):
        if hasattr(torch._higher_order_ops, hop):
            ops.add(getattr(torch._higher_order_ops, hop))
    for ns, op in [("flash_attn", "_flash_attn_forward"), ("flash_attn", "_flash_attn_varlen_forward")]:
        try:  # flash-attn >= 2.6 registers its kernels as torch custom ops
            ops.add(getattr(getattr(torch.ops, ns), op).default)
        except (AttributeError, RuntimeError):
            pass
    return frozenset(ops)


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: ACMode = "selective") -> nn.Module:
    """Wrap every Block's forward in non-reentrant activation checkpointing (`mode`: none|full|selective)."""
    if mode == "none":
        return model
    if mode not in ("full", "selective"):
        raise ConfigError(f"train.activation_checkpointing: expected none, full or selective, got {mode!r}")
    context_fn = (functools.partial(create_selective_checkpoint_contexts, _selective_policy)
                  if mode == "selective" else None)
    for block in _blocks(model):
        if getattr(block, "_kiln_ac", None):
            raise ConfigError(f"activation checkpointing is already applied ({block._kiln_ac})")
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # eval / generation: nothing to save, nothing to recompute
                return _inner(*args, **kwargs)
            extra = {"context_fn": context_fn} if context_fn is not None else {}
            # preserve_rng_state=False: kiln's blocks draw no random numbers (no dropout)
            return checkpoint(_inner, *args, use_reentrant=False, preserve_rng_state=False, **extra, **kwargs)

        block.forward = forward  # an instance attribute: the module tree and its parameter names are unchanged
        block._kiln_ac = mode
    return model


def apply_compile(model: nn.Module, mode: CompileMode = "block", *, backend: str = "inductor",
                  fullgraph: bool = True) -> nn.Module:
    """torch.compile the Blocks one by one (`block`) or the whole trunk (`model`), in place."""
    if mode == "block":
        for block in _blocks(model):
            block.compile(backend=backend, fullgraph=fullgraph, dynamic=False)
    elif mode == "model":
        # _trunk, not forward: the loss path reads hidden states, and the chunked loss stays eager
        model._trunk = torch.compile(model._trunk, backend=backend, dynamic=False)
    else:
        raise ConfigError(f"train.compile_mode: expected block or model, got {mode!r}")
    return model


def apply_fp8(model: nn.Module) -> nn.Module:
    """Float8 training (torchao, dynamic per-tensor scaling) for the Blocks' linear layers.

    The embedding and the output head stay in bf16 (their shapes and the loss are precision-
    sensitive), as in torchtitan. Needs CUDA compute capability >= 8.9 (Ada / Hopper or newer).
    """
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError("train.fp8=true needs an NVIDIA GPU with compute capability >= 8.9 (H100, L40S, RTX 4090); "
                          "set train.fp8=false")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ConfigError("train.fp8=true needs torchao (pip install torchao); or set train.fp8=false") from None

    def only_blocks(module: nn.Module, fqn: str) -> bool:
        # float8 matmuls need both dims divisible by 16
        return (fqn.startswith("layers.") and isinstance(module, nn.Linear)
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, module_filter_fn=only_blocks)
    return model
