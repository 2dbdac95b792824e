"""What differs between pretraining and post-training: the data, the loss, and what eval reports.

The train loop (kiln.train.trainer) is shared. It asks an `Objective` for:

    train_data(cfg, tokenizer, rank, world_size)  a Stateful batch source: next_batch(), state_dict(), load_state_dict()
    val_data(cfg, tokenizer)                      named lists of fixed evaluation batches
    count(batch)                                  this batch's share of the step's denominator (target tokens,
                                                  preference pairs, sequences ...), known before the forward
    loss(model, batch)                            (summed loss: fp32 scalar tensor, summed extra metrics)
    evaluate(model, val, ...)                     an eval record; it must contain "eval_loss"

Every micro-batch's summed loss is divided by the whole step's count (over accumulation and, when
distributed, data-parallel ranks), so the gradient is the true mean however the step is split (HF
transformers PR #34191 shows the bug averaging per micro-batch causes; docs/architecture.md). Extra metrics are sums too and are reported divided by the same count.
`setup(model, device)` runs once after the model exists (DPO keeps its frozen reference there).
On a resume, setup() still sees the fresh (not yet resumed) weights, and run.init_from is not
loaded: an objective that needs the starting policy (DPO's and RLVR's reference) loads it from the
checkpoint path itself (kiln.posttrain.dpo.load_reference) rather than copying the model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kiln.config import Config
from kiln.data.factory import build_train_source, build_val_sets
from kiln.data.packing import Batch
from kiln.data.tokenizer import Tokenizer
from kiln.eval.loss import eval_record, evaluate, token_loss_sum


class BatchSource(Protocol):
    """A Stateful, deterministic, endless source of micro-batches (each has `.to(device)`)."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Objective:
    """Pretraining: next-token cross-entropy on packed documents. Subclass for other objectives."""

    name = "pretrain"

    def setup(self, model: nn.Module, *, device: torch.device) -> None:
        """Called once after the model is built and initialised (or loaded)."""

    def train_data(self, cfg: Config, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1) -> BatchSource:
        """`rank` / `world_size` are the DATA-PARALLEL rank and size (kiln.data.factory documents the state)."""
        return build_train_source(cfg, tokenizer, dp_rank=rank, dp_world=world_size)

    def val_data(self, cfg: Config, tokenizer: Tokenizer) -> dict[str, list[Any]]:
        return build_val_sets(cfg, tokenizer)

    def count(self, batch: Batch) -> int:
        return batch.num_targets

    def loss(self, model: nn.Module, batch: Batch, *, cfg: Config) -> tuple[Tensor, dict[str, Tensor]]:
        return token_loss_sum(model, batch, doc_mask=cfg.data.doc_mask, impl=cfg.train.loss_impl), {}

    def evaluate(self, model: nn.Module, val: dict[str, list[Any]], *, cfg: Config, device: torch.device,
                 autocast: contextlib.AbstractContextManager) -> dict[str, float]:
        """Loss and perplexity per validation source, plus the token-weighted total."""
        per_source = {}
        for name, batches in val.items():
            res = evaluate(model, batches, device=device, doc_mask=cfg.data.doc_mask, autocast=autocast,
                           impl=cfg.train.loss_impl)
            per_source[name] = (res["nats"], res["tokens"])
        return eval_record(per_source)
