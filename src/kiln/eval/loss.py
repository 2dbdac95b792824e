"""Validation loss / perplexity and per-token log-probabilities, on top of the model's fused loss.

`token_loss_sum` is the pretraining loss: the summed next-token cross-entropy, computed by the model's
forward with the fused, chunked head + cross-entropy of kiln.model.loss (the full logits never exist).
`token_logps` gives per-token log-probabilities (DPO, RLVR, multiple-choice scoring) the same way:
the head runs on row chunks of the final hidden states, and only on positions that have a target.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kiln.config import LossImpl
from kiln.data.packing import IGNORE, Batch
from kiln.model import Transformer
from kiln.model.loss import default_chunk_rows


def token_loss_sum(model: Transformer, batch: Batch, *, doc_mask: bool, impl: LossImpl = "auto",
                   unseen_smoothing: float = 0.0) -> torch.Tensor:
    """Summed next-token cross-entropy (nats, fp32) over the batch's non-ignored targets.

    Never materialises the full (B*T, V) fp32 logits unless impl="plain" (kiln.model.loss). `unseen_smoothing`
    (train.unseen_smoothing) changes the gradient only, not the value (kiln.model.loss).
    """
    # Through forward (not model.hidden + the head here): DDP and FSDP only see what runs inside it.
    return model(batch.tokens, batch.doc_ids if doc_mask else None, targets=batch.targets, loss_impl=impl,
                 unseen_smoothing=unseen_smoothing)


@torch.no_grad()
def evaluate(model: Transformer, batches: Iterable[Batch], *, device: torch.device, doc_mask: bool,
             autocast: contextlib.AbstractContextManager | None = None, impl: LossImpl = "auto") -> dict[str, float]:
    """Mean loss per target token and perplexity over `batches` (`impl`: train.loss_impl)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches:
        batch = batch.to(device)
        with autocast or contextlib.nullcontext():
            total += token_loss_sum(model, batch, doc_mask=doc_mask, impl=impl).double()
        count += batch.num_targets
    model.train(was_training)
    loss = total.item() / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "nats": total.item()}


def eval_record(per_source: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{eval_loss, eval_ppl} per source and token-weighted over all, from each source's (summed nats, targets)."""
    record: dict[str, float] = {}
    nats_all, count_all = 0.0, 0.0
    for name, (nats, count) in per_source.items():
        record[f"eval_loss/{name}"] = nats / max(count, 1)
        record[f"eval_ppl/{name}"] = math.exp(min(record[f"eval_loss/{name}"], 50.0))
        nats_all, count_all = nats_all + nats, count_all + count
    record["eval_loss"] = nats_all / max(count_all, 1)
    record["eval_ppl"] = math.exp(min(record["eval_loss"], 50.0))
    return record


# ---------------------------------------------------------------------------------------------
# Per-token log-probabilities (DPO, RLVR, multiple-choice evaluation)


def right_padded(seqs: list, scored: list, *, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded inputs and targets for scoring tokens of sequences of different lengths.

    seqs[i] is a token sequence and scored[i] (same length, bool) marks the tokens to score; token j
    is predicted at position j - 1, so the first token is never scored. Returns (tokens, targets),
    each (N, T) int64 with T = longest sequence - 1: tokens = seq[:-1] then pad_id, targets = seq[1:]
    where scored, else -100.
    """
    T = max(len(s) for s in seqs) - 1
    tok = np.full((len(seqs), T), pad_id, dtype=np.int64)
    tgt = np.full((len(seqs), T), IGNORE, dtype=np.int64)
    for i, (s, m) in enumerate(zip(seqs, scored)):
        s, m = np.asarray(s, dtype=np.int64), np.asarray(m, dtype=bool)
        tok[i, :len(s) - 1] = s[:-1]
        tgt[i, :len(s) - 1] = np.where(m[1:], s[1:], IGNORE)
    return torch.from_numpy(tok), torch.from_numpy(tgt)


def _chunk_logps(rows: Tensor, y: Tensor, head, temperature: float) -> Tensor:
    """rows: (c, d) hidden states with `head`, or (c, V) logits without -> log p(y) (c,) fp32."""
    z = (head(rows) if head is not None else rows).float()  # (c, V)
    if temperature != 1.0:
        z = z / temperature
    return -F.cross_entropy(z, y, reduction="none")


def token_logps(model: torch.nn.Module, tokens: Tensor, targets: Tensor, *, temperature: float = 1.0,
                chunk_rows: int | None = None, greedy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """log p(targets[n, t] | tokens[n, :t+1]) at every position, 0 where the target is -100: (N, T) fp32.

    Only positions with a target are scored, `chunk_rows` at a time. On a plain kiln Transformer
    the head runs per chunk of final hidden states (`model.hidden`), so neither the (N*T, V) logits
    nor their fp32 log-softmax ever exist whole; with gradients each chunk is recomputed in backward
    (activation checkpointing), so one chunk of logits is alive at a time there too. A wrapped model
    (DDP, FSDP: their hooks only run in forward) or a sharded head (TP) goes through forward, which
    returns the full logits; only the fp32 log-softmax is chunked then. Logits are divided by
    `temperature` first (the log-probs of the distribution RLVR samples from; 0 means 1). With
    greedy=True also returns (N, T) bool: the target is the argmax (True where ignored). Right padding
    needs no mask: attention is causal, so padding never reaches earlier positions.
    """
    temperature = temperature or 1.0
    flat = targets.reshape(-1)  # (N*T,)
    idx = (flat != IGNORE).nonzero().squeeze(1)  # (M,) positions with a target
    y = flat[idx]
    if type(model) is Transformer and model.fused_loss:
        rows, head = model.hidden(tokens).flatten(0, 1)[idx], model.logits  # (M, d)
    else:
        rows, head = model(tokens).flatten(0, 1)[idx], None  # (M, V)
    chunk = chunk_rows or default_chunk_rows(tokens.device)
    recompute = torch.is_grad_enabled() and rows.requires_grad
    parts, hits = [rows[:0].float().sum(-1)], []  # the empty part keeps the graph when nothing is scored
    for s in range(0, len(idx), chunk):
        r, yc = rows[s:s + chunk], y[s:s + chunk]
        if recompute:
            parts.append(checkpoint(_chunk_logps, r, yc, head, temperature, use_reentrant=False))
            if greedy:
                with torch.no_grad():
                    hits.append((head(r) if head is not None else r).argmax(-1) == yc)
        else:
            z = head(r) if head is not None else r  # (c, V)
            parts.append(_chunk_logps(z, yc, None, temperature))
            if greedy:
                hits.append(z.argmax(-1) == yc)
    logp = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device).index_put((idx,), torch.cat(parts))
    if not greedy:
        return logp.view(targets.shape)
    is_greedy = torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
    if hits:
        is_greedy[idx] = torch.cat(hits)
    return logp.view(targets.shape), is_greedy.view(targets.shape)
