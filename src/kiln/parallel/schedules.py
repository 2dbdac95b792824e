"""torch.distributed.pipelining's schedules for kiln's pipeline (kiln.parallel.pipeline): the training
schedule by name, and a forward-only schedule for evaluation that works for every stage placement.

A module of its own so that torch's pipelining package, which imports torch._dynamo (about half a second),
loads only in runs that use pipeline parallelism.
"""

from __future__ import annotations

from typing import Any

from torch.distributed import pipelining
from torch.distributed.pipelining.schedules import (  # the runtime torch's own multi-stage schedules run on
    PipelineScheduleMulti,
    _Action,
    _add_send_recv,
    _add_unshard_reshard,
    _ComputationType,
    _PipelineScheduleRuntime,
)


def make_schedule(torch_class: str, stages: list[Any], n_microbatches: int, loss_fn: Any) -> Any:
    """torch.distributed.pipelining's `torch_class` (a kiln.parallel.pipeline.SCHEDULES entry's) over this rank's
    PipelineStages: a single-stage schedule gets the one stage, a multi-stage one the list (gradients are not
    rescaled: the loss is already divided by the step's global target count)."""
    cls = getattr(pipelining, torch_class)
    held = stages if issubclass(cls, PipelineScheduleMulti) else stages[0]
    return cls(held, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


class ForwardOnlySchedule(_PipelineScheduleRuntime):
    """Evaluation for any stage placement: each rank runs forward for every microbatch of its stages,
    lowest stage first, and torch's runtime inserts the sends and receives.

    The training schedules' own `eval()` replays their training order without the backward; the V
    schedules (ZBVZeroBubble, DualPipeV) then still hand a backward input between the two stages of
    one rank and fail ("can't steal_bwd_input if this stage doesn't have backward", torch 2.13).
    The order is deadlock-free: a rank finishes its lower stage for all microbatches before its
    higher one, and every stage's input comes from a lower stage.
    """

    def __init__(self, stages: list[Any], *, n_microbatches: int, loss_fn: Any, placement: dict[int, list[int]]
                 ) -> None:
        self.placement = placement
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
        self.pipeline_order = {rank: [_Action(sid, _ComputationType.FORWARD, mb) for sid in sorted(ids)
                                      for mb in range(n_microbatches)] for rank, ids in placement.items()}
        self._prepare_schedule_with_comms(self.pipeline_order)

    def _prepare_schedule_with_comms(self, actions: dict[int, list[_Action | None]], format: str = "compute_only"
                                     ) -> None:
        """torch's version first validates that every stage has one backward per microbatch, which a
        forward-only order has not; so the stage -> rank map comes straight from the placement, then
        torch's own lowering adds the sends and receives."""
        self.stage_index_to_group_rank = {sid: rank for rank, ids in self.placement.items() for sid in ids}
        for stage in self._stages:
            stage.stage_index_to_group_rank = self.stage_index_to_group_rank
        self.pipeline_order_with_comms = _add_send_recv(
            {rank: _add_unshard_reshard(order) for rank, order in actions.items()},
            stage_to_rank=lambda s: self.stage_index_to_group_rank[s], num_stages=self._num_stages)
