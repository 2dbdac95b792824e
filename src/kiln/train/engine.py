"""The model on this process's layout: build it, run one step's forward and backward, clip.

One place knows how the layouts differ; the train loop does not:

    single process   the plain model
    DDP              DistributedDataParallel, gradient sync only on the step's last micro-batch
    FSDP2 / HSDP     fully_shard per Block + root, gradient sync only on the last micro-batch
    TP (+SP)         DTensor plans from kiln.parallel.parallelize; TP peers see the same batches
    PP               stages + a torch.distributed.pipelining schedule; groups of
                     `n_microbatches` micro-batches form one pipeline step

Every layout consumes the same sequence of micro-batches per data-parallel rank and divides the
summed loss by the whole step's count (all micro-batches, all data-parallel ranks), so the
gradient equals the single-process gradient of the same global batch up to reduction order.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kiln.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from kiln.device import autocast_dtype
from kiln.errors import ConfigError
from kiln.model import Transformer
from kiln.model.attention import check_training_backend
from kiln.optim import build_optimizer, param_dtype
from kiln.parallel import pipeline as pl
from kiln.parallel.mesh import Layout
from kiln.parallel.parallelize import materialize, parallelize, unwrap, uses_ddp
from kiln.train.ema import WeightEMA
from kiln.train.objective import Objective


def _cast_params(model: nn.Module, optim: OptimConfig) -> nn.Module:
    """optim.param_dtype=bf16 (Adafactor / Muon with stochastic rounding): parameters in bf16 with no
    fp32 master copy. Buffers (RoPE frequencies) stay fp32."""
    dtype = param_dtype(optim)
    if dtype != torch.float32:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


class Optimizers:
    """One optimizer per model part (pipeline stage), stepped together; param_groups concatenated."""

    def __init__(self, optims: list[torch.optim.Optimizer]) -> None:
        self.optims = optims

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optims for g in o.param_groups]

    def step(self) -> None:
        for o in self.optims:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optims:
            o.zero_grad(set_to_none=set_to_none)

    def extra_state(self) -> list[Any]:
        """State outside torch's per-parameter layout (the stochastic-rounding generators), which the
        layout-independent checkpoint does not carry; saved per rank."""
        return [o.rng.state_dict() if hasattr(o, "rng") else None for o in self.optims]

    def load_extra_state(self, states: list[Any]) -> None:
        for o, st in zip(self.optims, states):
            if st is not None and hasattr(o, "rng"):
                o.rng.load_state_dict(st)


class Engine:
    """Builds the model(s) for `layout` and the optimizer, and runs one step's forward/backward and clip.

    `accum_steps` is the plan's micro-batches per optimizer step on each data-parallel rank."""

    def __init__(self, *, model: ModelConfig, optim: OptimConfig, train: TrainConfig, parallel: ParallelConfig,
                 doc_mask: bool, layout: Layout, objective: Objective, seed: int, accum_steps: int) -> None:
        self.model_cfg, self.optim_cfg, self.train_cfg = model, optim, train
        self.layout, self.objective, self.accum_steps = layout, objective, accum_steps
        self.pipe: pl.Pipeline | None = None
        check_training_backend(model.attention, layout.device.type)  # before compile hides the error

        def prepare(module: nn.Module) -> nn.Module:  # meta -> parallelized, real, initialised
            return materialize(parallelize(_cast_params(module, optim), layout, train), layout, seed=seed)

        if layout.pp > 1:
            if type(objective) is not Objective:
                raise ConfigError("parallel.pp > 1 supports pretraining only; post-training runs with data, tensor "
                                  "or fully-sharded parallelism")
            p = parallel
            self.pipe = pl.build_pipeline(
                model, schedule=p.pp_schedule, pp=p.pp, pp_rank=layout.pp_rank,
                n_microbatches=pl.microbatches(p), device=layout.device, pp_group=layout.group("pp"),
                mesh=layout.mesh, doc_mask=doc_mask, prepare=prepare)
            self.parts = self.pipe.stages
        else:
            with torch.device("meta"):
                module = Transformer(model)
            self.parts = [prepare(module)]
        low = autocast_dtype(train.dtype, layout.device)  # Muon's Newton-Schulz runs in it on CPU
        self.optimizer = Optimizers([build_optimizer(unwrap(m), optim, device_type=layout.device.type,
                                                     autocast_dtype=low, tie_embeddings=model.tie_embeddings)
                                     for m in self.parts])
        self.ema = WeightEMA(self.parts, decay=train.ema_decay, tie_embeddings=model.tie_embeddings) \
            if train.ema_decay > 0 else None
        # DDP and FSDP average gradients over data-parallel ranks; the loss is already divided by the
        # global count, so backward runs on loss x dp_size to make that average the sum we want.
        self.grad_scale = float(layout.dp_size)

    # ---- what the loop needs ------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The module to call for forward (non-pipeline layouts)."""
        assert self.pipe is None, "a pipeline has no single model"
        return self.parts[0]

    @property
    def reads_data(self) -> bool:
        """Whether this rank needs batches (pipeline middle stages need neither inputs nor targets)."""
        return self.pipe is None or self.pipe.has_first or self.pipe.has_last

    @property
    def owns_loss(self) -> bool:
        """Whether this rank's loss counts in the global total (one rank per data-parallel replica)."""
        return self.layout.tp_rank == 0 and (self.pipe is None or self.pipe.has_last)

    def train(self) -> None:
        for m in self.parts:
            m.train()

    def step(self) -> None:
        """The optimizer step; then, in a pipeline with a tied embedding and bf16 parameters, the
        last stage's copy takes the first stage's values: both got the same update, but stochastic
        rounding draws independent noise for each, so they would drift apart. Then the weights'
        moving average (train.ema_decay) takes the new weights in."""
        self.optimizer.step()
        if self.pipe is not None and self.model_cfg.tie_embeddings and self.optim_cfg.param_dtype == "bf16":
            pl.sync_tied_weights(self.pipe)
        if self.ema is not None:
            self.ema.update()

    def _global_count(self, local: int) -> float:
        """The step's denominator summed over data-parallel ranks."""
        if self.layout.dp_size == 1:
            return float(local)
        t = torch.tensor(float(local), dtype=torch.float64, device=self.layout.device)
        dist.all_reduce(t, group=self.layout.group("dp"))
        return t.item()

    def forward_backward(self, micro_batches: list[Any], autocast: contextlib.AbstractContextManager
                         ) -> tuple[Tensor, float, dict[str, Tensor]]:
        """Run one optimizer step's forward and backward. Returns (this rank's summed loss, the global
        count, this rank's summed extra metrics). Gradients are scaled by 1 / global count."""
        if self.pipe is not None:
            return self._pipeline_step(micro_batches)
        obj, model = self.objective, self.model
        count = max(self._global_count(sum(obj.count(b) for b in micro_batches)), 1.0)
        loss_sum = torch.zeros((), device=self.layout.device)
        extras: dict[str, Tensor] = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self._grad_sync(last), autocast:
                loss, more = obj.loss(model, batch)
                (loss * (self.grad_scale / count)).backward()
            loss_sum += loss.detach().float()
            for k, v in more.items():
                extras[k] = extras.get(k, 0.0) + v.detach().float()
        return loss_sum, count, extras

    def _grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients across data-parallel ranks only after the step's last micro-batch."""
        model = self.model
        if uses_ddp(self.layout):
            return contextlib.nullcontext() if last else model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _pipeline_step(self, micro_batches: list[Any]) -> tuple[Tensor, float, dict[str, Tensor]]:
        pipe = self.pipe
        assert pipe is not None
        local = sum(b.num_targets for b in micro_batches) if pipe.has_last else 0
        # only last-stage ranks need the count (the loss lives there); their dp group holds exactly them
        count = max(self._global_count(local), 1.0) if pipe.has_last else 1.0
        loss_sum = pipe.forward_backward(micro_batches, n_groups=self.accum_steps // pipe.n_microbatches, count=count,
                                         grad_scale=self.grad_scale, device=self.layout.device)
        if self.model_cfg.tie_embeddings:
            pl.sync_tied_grads(pipe)
        return loss_sum, count, {}

    def pipeline_eval(self, batches: list[Any]) -> tuple[float, float]:
        """(summed nats, target count) of `batches` through the pipeline, on every rank."""
        assert self.pipe is not None
        t = self.train_cfg
        nats, count = self.pipe.evaluate(batches, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                                         device=self.layout.device)
        return self.reduce_eval(nats, count)

    def reduce(self, loss_sum: Tensor, count: float, extras: dict[str, Tensor], flags: list[float]
               ) -> tuple[float, dict[str, float], list[bool]]:
        """One small all-reduce per step: (global mean loss, global extra means, flags raised on any rank).
        Only loss-owning ranks contribute the loss, so tensor-parallel peers and pipeline stages that
        did not compute it are not double-counted."""
        keys = sorted(extras)
        own = 1.0 if self.owns_loss else 0.0
        vec = [float(loss_sum) * own, count * own, *(float(extras[k]) * own for k in keys), *flags]
        if self.layout.distributed:
            t = torch.tensor(vec, dtype=torch.float64, device=self.layout.device)
            dist.all_reduce(t)
            vec = t.tolist()
        total_count = max(vec[1] / max(self._loss_replicas(), 1), 1.0)
        out_extras = {k: v / total_count for k, v in zip(keys, vec[2:2 + len(keys)])}
        return vec[0] / total_count, out_extras, [f > 0 for f in vec[2 + len(keys):]]

    def reduce_eval(self, nats: float, count: float) -> tuple[float, float]:
        """Pipeline eval totals from the last stage to every rank (each data-parallel replica
        evaluated the same batches, so their sums are averaged)."""
        if not self.layout.distributed:
            return nats, count
        own = 1.0 if self.owns_loss else 0.0
        t = torch.tensor([nats * own, count * own], dtype=torch.float64, device=self.layout.device)
        dist.all_reduce(t)
        return t[0].item() / self.layout.dp_size, t[1].item() / self.layout.dp_size

    def _loss_replicas(self) -> int:
        """How many owning ranks reported the same global count (one per data-parallel rank)."""
        return self.layout.dp_size

    # ---- gradient norm ------------------------------------------------------------------------

    def params(self) -> list[nn.Parameter]:
        return [p for m in self.parts for p in m.parameters()]

    def _norm_params(self) -> list[nn.Parameter]:
        """Parameters counted in the gradient norm: a pipeline's tied-head copy is the embedding's
        twin (same gradient after sync_tied_grads), so it is counted once, as on one device."""
        if self.pipe is None or not self.model_cfg.tie_embeddings or not self.pipe.has_last or self.pipe.n_stages == 1:
            return self.params()
        twin = self.pipe.modules_by_id()[self.pipe.n_stages - 1].head.weight
        return [p for p in self.params() if p is not twin]

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Global pre-clip L2 norm of the gradients (over shards and stages); clips in place."""
        grads = [p.grad for p in self._norm_params() if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False, foreach=True)
        if hasattr(total, "full_tensor"):  # DTensor over the dp/tp mesh
            total = total.full_tensor()
        if self.pipe is not None:
            total = total.square()
            dist.all_reduce(total, group=self.layout.group("pp"))
            total = total.sqrt()
        # torch multiplies by min(1, max_norm / norm) always, to spare accelerators a host sync; on CPU a norm within
        # the limit skips that pass over every gradient (a multiply by exactly 1: the same numbers)
        if max_norm < float("inf") and not (total.device.type == "cpu" and float(total) <= max_norm):
            torch.nn.utils.clip_grads_with_norm_(self.params(), max_norm, total, foreach=True)
        return total
