"""Pipeline parallelism with torch.distributed.pipelining: stage split and every schedule.

The model is cut into `pp x stages_per_rank` stages of consecutive blocks. A stage is the kiln
Transformer itself with parts removed (the embedding except on stage 0, the final norm and head
except on the last stage), so parameter names match the whole model and checkpoints move freely
between layouts. Stage placement follows the schedule: looped schedules put stages r, r+pp, ... on
rank r; V schedules (ZBVZeroBubble, DualPipeV) put r and 2pp-1-r on rank r.

Tied embeddings: the first stage owns `tok_emb.weight`; the last stage gets a head initialised from
the same values (kiln.model.init maps its name). After every backward the two gradients are summed
over the ranks that hold them (`sync_tied_grads`), so both copies take identical optimizer steps and
stay equal, as one shared tensor would. Only the first stage's copy is saved.

Every stage's attention needs the document ids, so a non-last stage returns (hidden, doc_ids) and
the next stage receives both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kiln.config import ModelConfig

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
_SINGLE = {"GPipe": "ScheduleGPipe", "1F1B": "Schedule1F1B"}
_MULTI = {"Interleaved1F1B": "ScheduleInterleaved1F1B", "LoopedBFS": "ScheduleLoopedBFS",
          "InterleavedZeroBubble": "ScheduleInterleavedZeroBubble", "ZBVZeroBubble": "ScheduleZBVZeroBubble",
          "DualPipeV": "ScheduleDualPipeV"}
_V_SHAPED = ("ZBVZeroBubble", "DualPipeV")


def stages_per_rank(schedule: str) -> int:
    return 1 if schedule in _SINGLE else 2


def stage_ids(schedule: str, pp: int, pp_rank: int) -> list[int]:
    """Global stage indices held by `pp_rank`."""
    if schedule in _SINGLE:
        return [pp_rank]
    if schedule in _V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank(schedule))]


def default_microbatches(schedule: str, pp: int) -> int:
    """Microbatches per pipeline step when parallel.pp_microbatches is 0: one per stage (seed 001)."""
    return pp * stages_per_rank(schedule)


def layer_split(n_layers: int, n_stages: int) -> list[list[int]]:
    """Consecutive, near-equal groups of layer indices, one per stage."""
    return [g.tolist() for g in np.array_split(np.arange(n_layers), n_stages)]


def build_stage(cfg: ModelConfig, stage: int, n_stages: int) -> nn.Module:
    """Stage `stage` of `n_stages` on the meta device, with the whole model's parameter names."""
    from kiln.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
        keep = {str(i) for i in layer_split(cfg.n_layers, n_stages)[stage]}
        for key in [k for k in model.layers if k not in keep]:
            del model.layers[key]
        if stage != 0:
            model.tok_emb = None
        if stage != n_stages - 1:
            model.norm, model.head = None, None
        elif cfg.tie_embeddings and stage != 0:
            model.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # the tied pair's second copy
    return model


@dataclass
class Pipeline:
    """This rank's stages, the schedule, and what it feeds and receives."""

    stages: list[nn.Module]  # the stage modules (possibly FSDP-wrapped), in stage order
    ids: list[int]
    n_stages: int
    schedule: Any
    n_microbatches: int
    tie_group: Any = None  # process group of the ranks holding the tied pair (None: same rank or untied)
    loss_scale: list[float] = field(default_factory=lambda: [1.0])  # 1 / the step's global target count

    @property
    def has_first(self) -> bool:
        return 0 in self.ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.ids

    def modules_by_id(self) -> dict[int, nn.Module]:
        return dict(zip(self.ids, self.stages))


def make_schedule(name: str, stages: list[Any], n_microbatches: int, loss_fn: Any) -> Any:
    from torch.distributed import pipelining

    if name in _SINGLE:
        cls = getattr(pipelining, _SINGLE[name])
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if name not in _MULTI:
        raise AssertionError(name)
    cls = getattr(pipelining, _MULTI[name])
    return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


def tie_group(mesh: Any, schedule: str, pp: int) -> Any:
    """New process groups pairing, at every (dp, tp) coordinate, the rank with stage 0 and the rank
    with the last stage. Every rank must call this (group creation is collective). Returns this
    rank's group, or None when it holds neither or both copies."""
    n_stages = pp * stages_per_rank(schedule)
    first = next(r for r in range(pp) if 0 in stage_ids(schedule, pp, r))
    last = next(r for r in range(pp) if n_stages - 1 in stage_ids(schedule, pp, r))
    if first == last:
        return None
    grid = mesh["pp", "dp_replicate", "dp_shard", "tp"].mesh  # (pp, dpr, dps, tp) global ranks
    me = dist.get_rank()
    mine = None
    for idx in np.ndindex(*grid.shape[1:]):
        ranks = sorted({int(grid[(first, *idx)]), int(grid[(last, *idx)])})
        group = dist.new_group(ranks)
        if me in ranks:
            mine = group
    return mine


def _local_grad(p: nn.Parameter) -> torch.Tensor | None:
    """This rank's part of p.grad, laid out like p itself (a tensor-parallel embedding's gradient can
    come back replicated while its weight is vocab-sharded; both copies must agree before summing)."""
    g = p.grad
    if g is None or not hasattr(g, "to_local"):
        return g
    if g.placements != p.placements:
        p.grad = g = g.redistribute(p.device_mesh, p.placements)
    return g.to_local()


def sync_tied_grads(pipe: Pipeline) -> None:
    """Sum the gradients of the tied embedding's two copies (first and last stage)."""
    mods = pipe.modules_by_id()
    grads = []
    if pipe.has_first and (g := _local_grad(mods[0].tok_emb.weight)) is not None:
        grads.append(g)
    if pipe.has_last and pipe.n_stages > 1 and mods[pipe.n_stages - 1].head is not None:
        if (g := _local_grad(mods[pipe.n_stages - 1].head.weight)) is not None:
            grads.append(g)
    if pipe.tie_group is not None:
        assert len(grads) == 1, "a tie group rank holds exactly one copy"
        dist.all_reduce(grads[0], group=pipe.tie_group)
    elif len(grads) == 2:  # both copies on this rank (V schedules: stage 0 and the last)
        total = grads[0] + grads[1]
        grads[0].copy_(total)
        grads[1].copy_(total)


@torch.no_grad()
def sync_tied_weights(pipe: Pipeline) -> None:
    """Copy the first stage's embedding into the last stage's tied copy (after an optimizer step)."""
    mods = pipe.modules_by_id()
    if pipe.n_stages == 1:
        return
    first = _local_data(mods[0].tok_emb.weight) if pipe.has_first else None
    last = _local_data(mods[pipe.n_stages - 1].head.weight) if pipe.has_last else None
    if pipe.tie_group is not None:
        # the pair is (stage 0's rank, last stage's rank); pp is the mesh's outermost dim, so stage 0's
        # holder (pp rank 0) has the lower global rank
        src = min(dist.get_process_group_ranks(pipe.tie_group))
        dist.broadcast(first if first is not None else last, src=src, group=pipe.tie_group)
    elif first is not None and last is not None:
        last.copy_(first)


def _local_data(p: nn.Parameter) -> torch.Tensor:
    return p.data.to_local() if hasattr(p.data, "to_local") else p.data
