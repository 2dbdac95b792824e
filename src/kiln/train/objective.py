"""What differs between pretraining and post-training: the data, the loss, and what eval reports.

The train loop (kiln.train.trainer) is shared. It asks an `Objective` for:

    configure(RunSettings)                        what it reads of the run's config, once, before anything else
    train_data(tokenizer, rank, world_size)       a Stateful batch source: next_batch(), state_dict(), load_state_dict()
    val_data(tokenizer)                           named lists of fixed evaluation batches
    count(batch)                                  this batch's share of the step's denominator (target tokens,
                                                  preference pairs, sequences ...), known before the forward
    loss(model, batch)                            (summed loss: fp32 scalar tensor, summed extra metrics)
    evaluate(model, val, ...)                     an eval record; it must contain "eval_loss"

Every micro-batch's summed loss is divided by the whole step's count (over accumulation and, when
distributed, data-parallel ranks), so the gradient is the true mean however the step is split (HF
transformers PR #34191 shows the bug averaging per micro-batch causes; docs/architecture.md). Extra
metrics are sums too and are reported divided by the same count.
`setup(model, device)` runs once after the model exists (DPO keeps its frozen reference there).
On a resume, setup() still sees the fresh (not yet resumed) weights, and run.init_from is not
loaded: an objective that needs the starting policy (DPO's and RLVR's reference) loads it from the
checkpoint path itself (kiln.posttrain.dpo.load_reference) rather than copying the model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kiln.config import Config, DataConfig, DType, LossImpl
from kiln.data.batchsource import BatchSource
from kiln.data.factory import Batching, build_train_source, build_val_sets
from kiln.data.packing import Batch
from kiln.data.tokenizer import Tokenizer
from kiln.eval.loss import eval_record, evaluate, token_loss_sum


def unseen_smoothing_blocker(cfg: Config) -> str:
    """Why train.unseen_smoothing cannot act in this run ("" when it can): it smooths onto the equal rows of an
    untied head that starts at zero, inside the chunked fused loss (kiln.model.loss, "Unseen smoothing")."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if m.tie_embeddings:
        return "the head is tied to the embedding (model.tie_embeddings true)"
    if not m.init_zero_out:
        return "the head does not start at zero (model.init_zero_out false)"
    if t.loss_impl not in ("auto", "chunked"):
        return f"train.loss_impl {t.loss_impl} (it needs auto or chunked)"
    if p.tp > 1 or p.pp > 1:
        return "tensor and pipeline parallelism compute the loss on whole logits"
    return ""


@dataclass(frozen=True)
class RunSettings:
    """What an objective reads of the run's config (the trainer gives it once: `Objective.configure`)."""

    data: DataConfig
    batching: Batching  # train.seq_len, train.micro_batch_size, run.seed
    global_batch_size: int
    loss_impl: LossImpl
    dtype: DType  # train.dtype: frozen references run under the trainer's autocast
    tp: int  # parallel.tp: sequence lengths must divide by it (sequence parallelism)
    eval_tokens: int
    unseen_smoothing: float = 0.0  # train.unseen_smoothing where the run can apply it, else 0

    @classmethod
    def of(cls, cfg: Config) -> RunSettings:
        t = cfg.train
        return cls(data=cfg.data, batching=Batching(seq_len=t.seq_len, batch_size=t.micro_batch_size,
                                                    seed=cfg.run.seed),
                   global_batch_size=t.global_batch_size, loss_impl=t.loss_impl, dtype=t.dtype, tp=cfg.parallel.tp,
                   eval_tokens=t.eval_tokens,
                   unseen_smoothing=0.0 if unseen_smoothing_blocker(cfg) else t.unseen_smoothing)


class Objective:
    """Pretraining: next-token cross-entropy on packed documents. Subclass for other objectives."""

    name = "pretrain"
    _run: RunSettings | None = None

    def configure(self, run: RunSettings) -> None:
        """The run's settings; the trainer calls this once, before setup and any data."""
        self._run = run

    @property
    def run(self) -> RunSettings:
        assert self._run is not None, "Objective.configure() was not called"
        return self._run

    def setup(self, model: nn.Module, *, device: torch.device) -> None:
        """Called once after the model is built and initialised (or loaded)."""

    def train_data(self, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1) -> BatchSource:
        """`rank` / `world_size` are the DATA-PARALLEL rank and size (kiln.data.factory documents the state)."""
        return build_train_source(self.run.data, tokenizer, self.run.batching, dp_rank=rank, dp_world=world_size)

    def val_data(self, tokenizer: Tokenizer) -> dict[str, list[Any]]:
        return build_val_sets(self.run.data, tokenizer, self.run.batching, max_tokens=self.run.eval_tokens)

    def count(self, batch: Batch) -> int:
        return batch.num_targets

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return token_loss_sum(model, batch, doc_mask=self.run.data.doc_mask, impl=self.run.loss_impl,
                              unseen_smoothing=self.run.unseen_smoothing), {}

    def evaluate(self, model: nn.Module, val: dict[str, list[Any]], *, device: torch.device,
                 autocast: contextlib.AbstractContextManager) -> dict[str, float]:
        """Loss and perplexity per validation source, plus the token-weighted total."""
        per_source = {}
        for name, batches in val.items():
            res = evaluate(model, batches, device=device, doc_mask=self.run.data.doc_mask, autocast=autocast,
                           impl=self.run.loss_impl)
            per_source[name] = (res["nats"], res["tokens"])
        return eval_record(per_source)
