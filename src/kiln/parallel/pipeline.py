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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.config import ModelConfig, ParallelConfig, PipelineSchedule
from kiln.data.packing import Batch
from kiln.model import Transformer
from kiln.model.loss import IGNORE


@dataclass(frozen=True)
class ScheduleSpec:
    """One pipeline schedule: its class in torch.distributed.pipelining and where its stages sit.

    placement: "single" puts stage r on rank r (one stage per rank); "looped" puts stages r, r+pp on
    rank r; "v" puts stages r and 2pp-1-r on rank r (the V shape: each rank holds a first-half and
    the mirrored second-half stage).
    """

    torch_class: str
    placement: Literal["single", "looped", "v"]

    @property
    def stages_per_rank(self) -> int:
        return 1 if self.placement == "single" else 2


# every schedule kiln offers, by its parallel.pp_schedule name (config.PipelineSchedule names the same keys)
SCHEDULES: dict[str, ScheduleSpec] = {
    "GPipe": ScheduleSpec("ScheduleGPipe", "single"),
    "1F1B": ScheduleSpec("Schedule1F1B", "single"),
    "Interleaved1F1B": ScheduleSpec("ScheduleInterleaved1F1B", "looped"),
    "LoopedBFS": ScheduleSpec("ScheduleLoopedBFS", "looped"),
    "InterleavedZeroBubble": ScheduleSpec("ScheduleInterleavedZeroBubble", "looped"),
    "ZBVZeroBubble": ScheduleSpec("ScheduleZBVZeroBubble", "v"),
    "DualPipeV": ScheduleSpec("ScheduleDualPipeV", "v"),
}
assert set(SCHEDULES) == set(get_args(PipelineSchedule)), "config.PipelineSchedule and SCHEDULES name the same"


def stages_per_rank(schedule: str) -> int:
    return SCHEDULES[schedule].stages_per_rank


def stage_ids(schedule: str, pp: int, pp_rank: int) -> list[int]:
    """Global stage indices held by `pp_rank`."""
    placement = SCHEDULES[schedule].placement
    if placement == "single":
        return [pp_rank]
    if placement == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank(schedule))]


def default_microbatches(schedule: str, pp: int) -> int:
    """Microbatches per pipeline step when parallel.pp_microbatches is 0: one per stage."""
    return pp * stages_per_rank(schedule)


def microbatches(p: ParallelConfig) -> int:
    """Microbatches per pipeline step: parallel.pp_microbatches, or one per stage."""
    return p.pp_microbatches or default_microbatches(p.pp_schedule, p.pp)


def layer_split(n_layers: int, n_stages: int) -> list[list[int]]:
    """Consecutive, near-equal groups of layer indices, one per stage."""
    return [g.tolist() for g in np.array_split(np.arange(n_layers), n_stages)]


def build_stage(cfg: ModelConfig, stage: int, n_stages: int) -> nn.Module:
    """Stage `stage` of `n_stages` on the meta device, with the whole model's parameter names."""
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
    """This rank's stages, the training and evaluation schedules, and what each rank feeds and receives.

    A step's micro-batches are grouped into schedule steps of `n_microbatches`; the first stage gets
    tokens (and document ids), the last gets targets and returns one summed loss per microbatch.
    """

    stages: list[nn.Module]  # the stage modules (possibly FSDP-wrapped), in stage order
    ids: list[int]
    n_stages: int
    schedule: Any
    eval_schedule: Any
    n_microbatches: int
    doc_mask: bool  # the first stage also gets document ids (every stage's attention needs them)
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

    def _run(self, fn: Any, group: list[Any] | None, losses: list[Tensor]) -> None:
        """Call schedule.step / eval_schedule.eval with what this rank's stages consume."""
        args: tuple[Tensor, ...] = ()
        kwargs: dict[str, Any] = {}
        if group is not None and self.has_first:
            tokens = torch.cat([b.tokens for b in group])
            args = (tokens, torch.cat([b.doc_ids for b in group])) if self.doc_mask else (tokens,)
        if group is not None and self.has_last:
            kwargs = {"target": torch.cat([b.targets for b in group]), "losses": losses}
        fn(*args, **kwargs)

    def forward_backward(self, micro_batches: list[Any], *, n_groups: int, count: float, grad_scale: float,
                         device: torch.device) -> Tensor:
        """One optimizer step's pipeline steps (`n_groups` of them; ranks that read no data pass no
        batches), each microbatch's summed loss scaled by grad_scale / count for backward. Returns this
        rank's summed, unscaled loss (zero off the last stage)."""
        self.loss_scale[0] = grad_scale / count
        n = self.n_microbatches
        groups = [micro_batches[i:i + n] for i in range(0, len(micro_batches), n)] if micro_batches else []
        total = torch.zeros((), device=device)
        for g in groups or [None] * n_groups:
            losses: list[Tensor] = []
            self._run(self.schedule.step, g, losses)
            if losses:
                total += torch.stack([x.detach().float() for x in losses]).sum() * (count / grad_scale)
        return total

    @torch.no_grad()
    def evaluate(self, batches: list[Any], *, seq_len: int, micro_batch_size: int, device: torch.device
                 ) -> tuple[float, int]:
        """(summed nats, target count) over `batches` regrouped into pipeline steps. A schedule runs fixed
        shapes: rows that do not fill a last step are padded with rows that have no targets (0 nats, 0
        targets), so every row counts, as on one process (they were skipped: an eval set smaller than one
        step scored 0 nats over 0 targets, a loss of 0). Every rank calls it with the same batches."""
        rows = [(b.tokens[i], b.targets[i], b.doc_ids[i]) for b in batches for i in range(b.tokens.shape[0])
                if b.tokens.shape[1] == seq_len]
        per_step = self.n_microbatches * micro_batch_size
        self.loss_scale[0] = 1.0
        nats, count = 0.0, 0
        for start in range(0, len(rows), per_step):
            chunk = rows[start:start + per_step]
            tokens, targets, docs = chunk[0]
            chunk += [(tokens, torch.full_like(targets, IGNORE), docs)] * (per_step - len(chunk))
            batch = Batch(tokens=torch.stack([r[0] for r in chunk]), targets=torch.stack([r[1] for r in chunk]),
                          doc_ids=torch.stack([r[2] for r in chunk])).to(device)
            losses: list[Tensor] = []
            self._run(self.eval_schedule.eval, [batch], losses)
            nats += float(sum(x.float().item() for x in losses))
            count += batch.num_targets
        return nats, count


def build_pipeline(cfg: ModelConfig, *, schedule: str, pp: int, pp_rank: int, n_microbatches: int,
                   device: torch.device, pp_group: Any, mesh: Any, doc_mask: bool,
                   prepare: Callable[[nn.Module], nn.Module]) -> Pipeline:
    """This rank's stages on the meta device, each made real by `prepare` (parallelize + materialise),
    wrapped for torch.distributed.pipelining with a training and a forward-only schedule."""
    # torch's pipelining package (and torch._dynamo with it) loads only in runs with pp > 1
    from torch.distributed.pipelining import PipelineStage

    from kiln.parallel.schedules import ForwardOnlySchedule, make_schedule

    n_stages = pp * stages_per_rank(schedule)
    ids = stage_ids(schedule, pp, pp_rank)
    modules = [prepare(build_stage(cfg, sid, n_stages)) for sid in ids]
    scale = [1.0]

    def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:  # on the last stage, per microbatch
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return ce * scale[0]

    def stages() -> list[Any]:  # the eval schedule gets its own stage objects (their buffers are per schedule)
        return [PipelineStage(m, sid, n_stages, device, group=pp_group) for m, sid in zip(modules, ids)]

    placement = {r: stage_ids(schedule, pp, r) for r in range(pp)}
    train_schedule = make_schedule(SCHEDULES[schedule].torch_class, stages(), n_microbatches, loss_fn)
    eval_schedule = ForwardOnlySchedule(stages(), n_microbatches=n_microbatches, loss_fn=loss_fn, placement=placement)
    tied = tie_group(mesh, schedule, pp) if cfg.tie_embeddings else None
    return Pipeline(stages=modules, ids=ids, n_stages=n_stages, schedule=train_schedule, eval_schedule=eval_schedule,
                    n_microbatches=n_microbatches, doc_mask=doc_mask, tie_group=tied, loss_scale=scale)


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
