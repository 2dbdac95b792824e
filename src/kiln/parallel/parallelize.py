"""Apply parallelism to a single-device kiln model from the outside (torchtitan's pattern).

Order: tensor parallel -> activation checkpointing -> compile -> FSDP2 / DDP. The model arrives on
the meta device (except for DDP, which needs real weights) and is materialised and initialised
afterwards by the caller (`materialize`).

Tensor parallel (Megatron-style, with sequence parallelism on the norms): q/k/v and gate/up are
column-parallel, o and down row-parallel, the embedding vocab-parallel (row-wise) and the head
column-parallel with logits gathered. RMSNorm and the residual stream between blocks are sharded on
the sequence dim; QK-norm weights are replicated and see heads sharded (their gradient becomes a
partial sum that DTensor reduces). A tied embedding stays one Parameter: the head is a Linear
sharing it (both are sharded on the vocab dim).

Data parallel: pure replication (dp_replicate > 1, nothing else) uses DDP; any sharding or a
combination with tp/pp uses FSDP2's `fully_shard` on the ("dp_replicate", "dp_shard") mesh
(HSDP when both are > 1). Each Block is its own FSDP unit; the root holds the embedding, final norm
and head together, so a tied pair is gathered and reduced as one tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kiln.config import TrainConfig
from kiln.device import autocast_dtype
from kiln.model.init import init_weights
from kiln.parallel import compile_ac
from kiln.parallel.mesh import Layout


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.layers.items())


def apply_tp(model: nn.Module, mesh: Any) -> None:
    """Tensor + sequence parallelism over the 1-D mesh `mesh` (the "tp" dim)."""
    # imported here, as FSDP's below: a one-process run (every `kiln` command's usual case) does not load them
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tied = model.cfg.tie_embeddings
    if model.tok_emb is not None:
        parallelize_module(model.tok_emb, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)))
    if model.norm is not None:
        parallelize_module(model.norm, mesh, SequenceParallel())
        if tied and model.head is None:  # the head becomes a Linear that shares the embedding Parameter
            model.head = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False, device="meta")
        parallelize_module(model.head, mesh, ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()))
        if tied and model.tok_emb is not None:
            model.head.weight = model.tok_emb.weight
        model.fused_loss = False  # the loss needs the gathered logits
    for block in _blocks(model).values():
        plan = {
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                       desired_input_layouts=(Replicate(), None, None)),
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.w_gate": ColwiseParallel(), "mlp.w_up": ColwiseParallel(),
            "mlp.w_down": RowwiseParallel(output_layouts=Shard(1)),
        }
        if block.attn.q_norm is not None:  # per-head norm on local heads: (B, T, H/tp, hd), heads on dim 2
            plan["attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(block, mesh, plan)


def apply_fsdp(model: nn.Module, mesh: Any, *, param_dtype: torch.dtype | None,
               reshard_after_forward: bool = True) -> None:
    """FSDP2 over `mesh` (1-D shard, or 2-D replicate x shard = HSDP), one unit per Block + the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for block in _blocks(model).values():
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def parallelize(model: nn.Module, layout: Layout, train: TrainConfig) -> nn.Module:
    """TP -> float8 -> activation checkpointing -> compile -> FSDP (DDP is applied after materialisation)."""
    if layout.tp > 1:
        apply_tp(model, layout.mesh["tp"])
    t = train
    if t.fp8:
        compile_ac.apply_fp8(model)
    if t.activation_checkpointing != "none":
        compile_ac.apply_activation_checkpointing(model, t.activation_checkpointing)
    if t.compile:
        compile_ac.apply_compile(model, t.compile_mode)
    if layout.dp_size > 1 and not uses_ddp(layout):
        mesh = layout.mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else layout.mesh["dp_shard"]
        param_dtype = torch.bfloat16 if autocast_dtype(t.dtype, layout.device) == torch.bfloat16 else None
        apply_fsdp(model, mesh, param_dtype=param_dtype, reshard_after_forward=layout.pp == 1)
    return model


def uses_ddp(layout: Layout) -> bool:
    """Plain data parallelism (replicas only, no sharding, no tp/pp): DistributedDataParallel."""
    return layout.dp_replicate > 1 and layout.dp_shard == 1 and layout.tp == 1 and layout.pp == 1


def materialize(model: nn.Module, layout: Layout, *, seed: int) -> nn.Module:
    """Allocate the (possibly sharded) parameters on the device, initialise them, and wrap in DDP."""
    model.to_empty(device=layout.device)
    init_weights(model, seed=seed)
    if uses_ddp(layout):
        model = DistributedDataParallel(model, process_group=layout.group("dp"),
                                        device_ids=[layout.device.index] if layout.device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The kiln Transformer inside DDP (`.module`) and a whole-model torch.compile wrapper (`._orig_mod`), in
    either order (FSDP2, TP and compile-per-block keep the module itself)."""
    while True:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
