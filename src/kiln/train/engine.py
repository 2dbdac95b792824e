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
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.config import Config
from kiln.errors import ConfigError
from kiln.model import Transformer
from kiln.optim import build_optimizer
from kiln.parallel import pipeline as pl
from kiln.parallel.mesh import Layout
from kiln.parallel.parallelize import materialize, parallelize, unwrap, uses_ddp
from kiln.train.objective import Objective


def _cast_params(model: nn.Module, cfg: Config) -> nn.Module:
    """optim.param_dtype=bf16 (Adafactor / Muon with stochastic rounding): parameters in bf16 with no
    fp32 master copy. Buffers (RoPE frequencies) stay fp32."""
    from kiln.optim import param_dtype

    dtype = param_dtype(cfg.optim)
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
    """Builds the model(s) for `layout`, the optimizer, and runs forward/backward/clip."""

    def __init__(self, cfg: Config, layout: Layout, objective: Objective, *, seed: int) -> None:
        self.cfg, self.layout, self.objective = cfg, layout, objective
        self.pipe: pl.Pipeline | None = None
        if cfg.model.attention == "flex" and layout.device.type == "cpu":  # before compile hides the error
            raise ConfigError("model.attention=flex has no backward on CPU in this PyTorch; train on CPU with "
                              "model.attention=sdpa (same document mask), or use flex on a GPU")
        if layout.pp > 1:
            if type(objective) is not Objective:
                raise ConfigError("parallel.pp > 1 supports pretraining only; post-training runs with data, tensor "
                                  "or fully-sharded parallelism")
            self.parts = self._build_pipeline(seed)
        else:
            with torch.device("meta"):
                model = Transformer(cfg.model)
            model = parallelize(_cast_params(model, cfg), layout, cfg)
            self.parts = [materialize(model, layout, seed=seed)]
        self.optimizer = Optimizers([build_optimizer(unwrap(m), cfg.optim, device_type=layout.device.type)
                                     for m in self.parts])
        # DDP and FSDP average gradients over data-parallel ranks; the loss is already divided by the
        # global count, so backward runs on loss x dp_size to make that average the sum we want.
        self.grad_scale = float(layout.dp_size)

    # ---- construction ----------------------------------------------------------------------

    def _build_pipeline(self, seed: int) -> list[nn.Module]:
        from torch.distributed.pipelining import PipelineStage

        cfg, layout = self.cfg, self.layout
        p = cfg.parallel
        n_stages = p.pp * pl.stages_per_rank(p.pp_schedule)
        ids = pl.stage_ids(p.pp_schedule, p.pp, layout.pp_rank)
        modules = []
        for sid in ids:
            module = parallelize(_cast_params(pl.build_stage(cfg.model, sid, n_stages), cfg), layout, cfg)
            modules.append(materialize(module, layout, seed=seed))
        stages = [PipelineStage(m, sid, n_stages, layout.device, group=layout.group("pp")) for m, sid in zip(modules, ids)]
        n_mb = p.pp_microbatches or pl.default_microbatches(p.pp_schedule, p.pp)
        scale = [1.0]

        def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:  # on the last stage, per microbatch
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            return ce * scale[0]

        schedule = pl.make_schedule(p.pp_schedule, stages, n_mb, loss_fn)
        group = pl.tie_group(layout.mesh, p.pp_schedule, p.pp) if cfg.model.tie_embeddings else None
        self.pipe = pl.Pipeline(stages=modules, ids=ids, n_stages=n_stages, schedule=schedule, n_microbatches=n_mb,
                                tie_group=group, loss_scale=scale)
        return modules

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

    def micro_batches_per_step(self) -> int:
        """Micro-batches each data-parallel rank consumes per optimizer step."""
        t = self.cfg.train
        n = t.global_batch_size // (t.micro_batch_size * self.layout.dp_size)
        if self.pipe is not None and n % self.pipe.n_microbatches:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} gives {n} micro-batches of {t.micro_batch_size} per "
                f"data-parallel rank, not a multiple of the pipeline's {self.pipe.n_microbatches} microbatches "
                "(parallel.pp_microbatches); adjust one of them")
        return n

    def train(self) -> None:
        for m in self.parts:
            m.train()

    def step(self) -> None:
        """The optimizer step; then, in a pipeline with a tied embedding and bf16 parameters, the
        last stage's copy takes the first stage's values: both got the same update, but stochastic
        rounding draws independent noise for each, so they would drift apart."""
        self.optimizer.step()
        if self.pipe is not None and self.cfg.model.tie_embeddings and self.cfg.optim.param_dtype == "bf16":
            pl.sync_tied_weights(self.pipe)

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
                loss, more = obj.loss(model, batch, cfg=self.cfg)
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
        pipe, cfg = self.pipe, self.cfg
        assert pipe is not None
        n = pipe.n_microbatches
        local = sum(b.num_targets for b in micro_batches) if pipe.has_last else 0
        # only last-stage ranks need the count (the loss lives there); their dp group holds exactly them
        count = max(self._global_count(local), 1.0) if pipe.has_last else 1.0
        pipe.loss_scale[0] = self.grad_scale / count
        loss_sum = torch.zeros((), device=self.layout.device)
        groups = [micro_batches[i:i + n] for i in range(0, len(micro_batches), n)] if micro_batches else []
        for g in groups or [None] * (self.micro_batches_per_step() // n):
            losses: list[Tensor] = []
            self._run_schedule(pipe.schedule.step, g, losses)
            if losses:
                loss_sum += torch.stack([x.detach().float() for x in losses]).sum() * (count / self.grad_scale)
        if cfg.model.tie_embeddings:
            pl.sync_tied_grads(pipe)
        return loss_sum, count, {}

    def _run_schedule(self, fn: Any, group: list[Any] | None, losses: list[Tensor]) -> None:
        """Call schedule.step / .eval with what this rank's stages consume."""
        pipe = self.pipe
        assert pipe is not None
        args: tuple[Tensor, ...] = ()
        kwargs: dict[str, Any] = {}
        if group is not None and pipe.has_first:
            tokens = torch.cat([b.tokens for b in group])
            args = (tokens, torch.cat([b.doc_ids for b in group])) if self.cfg.data.doc_mask else (tokens,)
        if group is not None and pipe.has_last:
            kwargs = {"target": torch.cat([b.targets for b in group]), "losses": losses}
        fn(*args, **kwargs)

    @torch.no_grad()
    def pipeline_eval(self, batches: list[Any]) -> tuple[float, int]:
        """(summed nats, target count) over `batches` regrouped into full pipeline steps; rows that do not
        fill a last pipeline step are skipped (a schedule runs fixed shapes)."""
        pipe = self.pipe
        assert pipe is not None
        from kiln.data.packing import Batch

        T = self.cfg.train.seq_len
        rows = [(b.tokens[i], b.targets[i], b.doc_ids[i]) for b in batches for i in range(b.tokens.shape[0])
                if b.tokens.shape[1] == T]
        per_step = pipe.n_microbatches * self.cfg.train.micro_batch_size
        pipe.loss_scale[0] = 1.0
        nats, count = 0.0, 0
        for start in range(0, len(rows) - per_step + 1, per_step):
            chunk = rows[start:start + per_step]
            batch = Batch(tokens=torch.stack([r[0] for r in chunk]), targets=torch.stack([r[1] for r in chunk]),
                          doc_ids=torch.stack([r[2] for r in chunk])).to(self.layout.device)
            losses: list[Tensor] = []
            self._run_schedule(pipe.schedule.eval, [batch], losses)
            nats += float(sum(x.float().item() for x in losses))
            count += batch.num_targets
        return nats, count

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

    # ---- checkpoint state (torch.distributed.checkpoint, layout-independent names) ------------

    def _alias(self, part: nn.Module) -> dict[str, str]:
        """Saved-name aliases: a pipeline's last-stage copy of a tied embedding is stored (and read back)
        as the embedding itself, so checkpoints move between pipelined and plain layouts."""
        m = unwrap(part)
        if self.cfg.model.tie_embeddings and m.tok_emb is None and getattr(m, "head", None) is not None:
            return {"head.weight": "tok_emb.weight"}
        return {}

    @staticmethod
    def _rename(sd: dict[str, Any], alias: dict[str, str]) -> dict[str, Any]:
        out = {}
        for k, v in sd.items():
            for old, new in alias.items():
                if k == old or k.endswith("." + old) or f".{old}." in k or k.startswith(old + "."):
                    k = k.replace(old, new)
            out[k] = v
        return out

    def _part_state(self, part: nn.Module, optim: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        model_sd = get_model_state_dict(part)
        if self.cfg.model.tie_embeddings and "tok_emb.weight" in model_sd:
            model_sd.pop("head.weight", None)  # the tensor-parallel head shares the embedding Parameter
        optim_sd = get_optimizer_state_dict(part, optim, options=StateDictOptions(flatten_optimizer_state_dict=True))
        alias = self._alias(part)
        return self._rename(model_sd, alias), self._rename(optim_sd, alias)

    def state_dict(self, *, optimizer: bool = True) -> dict[str, Any]:
        """{"model": ..., "optim": ...} keyed by whole-model parameter names, values possibly sharded."""
        model_sd: dict[str, Any] = {}
        optim_sd: dict[str, Any] = {}
        for part, optim in zip(self.parts, self.optimizer.optims):
            m, o = self._part_state(part, optim)
            model_sd.update(m)
            optim_sd.update(o)
        return {"model": model_sd, "optim": optim_sd} if optimizer else {"model": model_sd}

    def load_state_dict(self, state: dict[str, Any], *, optimizer: bool = True) -> None:
        """Copy a state loaded (in place, by DCP) into `self.state_dict()`'s structure back into the parts."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        for part, optim in zip(self.parts, self.optimizer.optims):
            inverse = {v: k for k, v in self._alias(part).items()}
            own_model, own_optim = self._part_state(part, optim)
            model_sd = self._rename({k: state["model"][k] for k in own_model}, inverse)
            set_model_state_dict(part, model_sd, options=StateDictOptions(strict=False))
            if optimizer:
                optim_sd = self._rename({k: state["optim"][k] for k in own_optim}, inverse)
                set_optimizer_state_dict(part, optim, optim_sd,
                                         options=StateDictOptions(flatten_optimizer_state_dict=True))

    # ---- gradient norm ------------------------------------------------------------------------

    def params(self) -> list[nn.Parameter]:
        return [p for m in self.parts for p in m.parameters()]

    def _norm_params(self) -> list[nn.Parameter]:
        """Parameters counted in the gradient norm: a pipeline's tied-head copy is the embedding's
        twin (same gradient after sync_tied_grads), so it is counted once, as on one device."""
        if self.pipe is None or not self.cfg.model.tie_embeddings or not self.pipe.has_last or self.pipe.n_stages == 1:
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
        if max_norm < float("inf"):
            torch.nn.utils.clip_grads_with_norm_(self.params(), max_norm, total, foreach=True)
        return total
