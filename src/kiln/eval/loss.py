"""Validation loss, perplexity and bits per byte over fixed packed batches."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from kiln.data.packing import Batch
from kiln.model import Transformer


def token_loss_sum(model: Transformer, batch: Batch, *, doc_mask: bool) -> torch.Tensor:
    """Summed next-token cross-entropy (nats, fp32) over the batch's non-ignored targets."""
    logits = model(batch.tokens, doc_ids=batch.doc_ids if doc_mask else None)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=-100, reduction="sum")


@torch.no_grad()
def evaluate(model: Transformer, batches: Iterable[Batch], *, device: torch.device, doc_mask: bool,
             autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """Mean loss per target token and perplexity over `batches`."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches:
        batch = batch.to(device)
        with autocast or contextlib.nullcontext():
            total += token_loss_sum(model, batch, doc_mask=doc_mask).double()
        count += batch.num_targets
    model.train(was_training)
    loss = total.item() / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "nats": total.item()}
