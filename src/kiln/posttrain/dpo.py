"""Preference optimisation against a frozen reference: sigmoid DPO and APO-zero / APO-down.

Data: jsonl records {"prompt", "chosen", "rejected"}; the prompt is a string (one user message) or a
list of messages, each response a string (one assistant message) or a list of messages. A response
that repeats the prompt's messages first (the whole conversation, as in UltraFeedback-binarized) has
that copy removed. Both sequences are rendered with the chat template; only the final assistant
message's tokens count in the log-probabilities.

With log-ratios  c = logp_policy(chosen) - logp_ref(chosen),  r = logp_policy(rejected) - logp_ref(rejected)
(sums over response tokens), rewards are beta * c and beta * r, and per pair:

    sigmoid   -log sigmoid(beta * (c - r))                          DPO, Rafailov et al. 2023
    apo_zero  (1 - sigmoid(beta * c)) + sigmoid(beta * r)           APO-zero, D'Oosterlinck et al. 2024, eq. 7
    apo_down  sigmoid(beta * c) + (1 - sigmoid(beta * (c - r)))     APO-down, same paper, eq. 8

APO-zero pushes chosen up and rejected down in absolute terms (chosen better than the model's own
outputs); APO-down lowers both, the rejected more (chosen worse than the model's own outputs).
count(batch) = pairs. Metrics: rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy
(means over pairs).

The reference is the run's starting checkpoint, loaded in `setup` from its path (not copied from the
policy: on a resume the policy already holds later weights). posttrain.ref=precomputed computes its
log-probs for every pair once there, under the trainer's autocast (so at step 0 the policy's
log-probs equal them and c = r = 0), and frees it: the memory-light choice. copy keeps it in memory
and scores each batch; it is a whole unsharded model on every rank, its parameters in the policy's
dtype and, under bf16 autocast, its linear weights stored in bf16 (autocast would cast them anyway).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.data.cursor import CursorLoader, DataId, EpochCursor, shuffled
from kiln.data.packing import IGNORE
from kiln.data.records import load_records
from kiln.device import autocast_for
from kiln.errors import DataError
from kiln.eval.loss import right_padded, token_logps
from kiln.posttrain.chat import ChatFormat, Encoded, as_messages, naming
from kiln.train.objective import Objective


@dataclass
class Pair:
    chosen: Encoded  # mask: the chosen response's tokens
    rejected: Encoded
    ref: tuple[float, float] | None = None  # precomputed reference log-probs (chosen, rejected)


@dataclass
class PairBatch:
    """B pairs as 2B right-padded rows: chosen rows first, then rejected rows."""

    tokens: Tensor  # (2B, T) int64
    targets: Tensor  # (2B, T) int64, -100 outside the responses
    ref_logps: Tensor | None  # (2B,) fp32 when precomputed

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PairBatch:
        ref = None if self.ref_logps is None else self.ref_logps.to(device)
        return PairBatch(self.tokens.to(device, non_blocking=non_blocking),
                         self.targets.to(device, non_blocking=non_blocking), ref)

    @property
    def pairs(self) -> int:
        return self.tokens.shape[0] // 2


def encode_pairs(records: list[tuple[str, dict]], fmt: ChatFormat, *, max_len: int) -> list[Pair]:
    """Tokenize preference records; pairs whose responses do not fit max_len tokens are cut from the right."""
    out, cut, same = [], 0, []
    for where, rec in records:
        if not isinstance(rec, dict) or not all(k in rec for k in ("prompt", "chosen", "rejected")):
            raise DataError(f"{where}: a preference record needs \"prompt\", \"chosen\" and \"rejected\"")
        prompt = as_messages(rec["prompt"], role="user", where=where, field="prompt")
        seqs = []
        for key in ("chosen", "rejected"):
            response = as_messages(rec[key], role="assistant", where=where, field=key)
            if len(response) > len(prompt) and response[:len(prompt)] == prompt:
                response = response[len(prompt):]  # the whole conversation: keep the reply only
            elif any(m["role"] == "user" for m in response):  # it was glued after the prompt: two user turns
                raise DataError(f"{where}: '{key}' is a conversation that does not start with the prompt's messages; "
                                "give the reply alone, or the whole conversation from the prompt on")
            msgs = prompt + response
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: '{key}' must end with an assistant message")
            with naming(where):
                enc = fmt.encode(msgs, train_on="last")
            if len(enc.ids) > max_len:
                enc, cut = Encoded(enc.ids[:max_len], enc.mask[:max_len]), cut + 1
            seqs.append(enc)
        if not (seqs[0].mask[1:].any() and seqs[1].mask[1:].any()):
            raise DataError(f"{where}: the prompt alone fills the {max_len} tokens a sequence holds (train.seq_len "
                            f"{max_len - 1}, + 1 for the shifted targets); raise --train.seq_len or shorten the prompt")
        if np.array_equal(seqs[0].ids, seqs[1].ids):  # its loss has no gradient toward either: nothing to prefer
            same.append(where)
            continue
        out.append(Pair(seqs[0], seqs[1]))
    if cut:
        print(f"note: {cut} response(s) cut to fit {max_len} tokens", file=sys.stderr)
    if same and not out:
        raise DataError(f"{same[0]}: every pair's chosen and rejected are the same text (as encoded); a preference "
                        "needs two different replies")
    if same:
        print(f"note: {len(same)} pair(s) whose chosen and rejected are the same text skipped (the first: {same[0]})",
              file=sys.stderr)
    return out


def make_pair_batch(pairs: list[Pair], *, pad_id: int) -> PairBatch:
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tok, tgt = right_padded([s.ids for s in seqs], [s.mask for s in seqs], pad_id=pad_id)
    ref = None
    if all(p.ref is not None for p in pairs):
        ref = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float32)
    return PairBatch(tok, tgt, ref)


def pad_to_multiple(tokens: Tensor, targets: Tensor, *, multiple: int) -> tuple[Tensor, Tensor]:
    """(N, T) inputs and targets right-padded (token 0, target -100) to a length divisible by
    parallel.tp: tensor parallelism shards the sequence dim (sequence parallel), which the collectives
    need even. The padding comes after every scored token, so causal attention leaves their scores alone."""
    extra = -tokens.shape[1] % multiple
    if extra == 0:
        return tokens, targets
    return F.pad(tokens, (0, extra), value=0), F.pad(targets, (0, extra), value=IGNORE)


def sequence_logps(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    """Sum of log p(target) over the non-ignored targets of each row. (N, T) -> (N,) fp32."""
    return token_logps(model, tokens, targets).sum(dim=1)


def preference_loss(c: Tensor, r: Tensor, *, beta: float, kind: str) -> Tensor:
    """Per-pair loss from policy-minus-reference log-ratios c (chosen) and r (rejected), both (B,)."""
    if kind == "sigmoid":
        return -F.logsigmoid(beta * (c - r))
    if kind == "apo_zero":
        return (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
    if kind == "apo_down":
        return torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * (c - r)))
    raise AssertionError(f"unknown preference loss {kind}")


class PairLoader(CursorLoader):
    """Endless, Stateful micro-batches of pairs, shuffled per epoch by (seed, epoch)."""

    KIND, ITEMS, WHAT = "pairs", "pairs", "preference data"

    def __init__(self, pairs: list[Pair], *, batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, data: DataId | None = None) -> None:
        self.pairs, self.batch_size, self.pad_id, self.data = pairs, batch_size, pad_id, data or DataId()
        self.cursor = EpochCursor(shuffled(len(pairs), seed=seed, stream=3), empty="DPO data: no preference pairs",
                                  rank=rank, world_size=world_size)

    def n_items(self) -> int:
        return len(self.pairs)

    def next_batch(self) -> PairBatch:
        return make_pair_batch([self.pairs[int(i)] for i in self.cursor.take(self.batch_size)], pad_id=self.pad_id)


def load_reference(ckpt: Path, *, device: torch.device, like: nn.Module | None = None,
                   autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """The frozen reference policy: the checkpoint's weights, eval mode, no gradients.

    Its parameters take the dtype of `like`'s (the policy: bf16 under optim.param_dtype=bf16). With
    `autocast_dtype` (the trainer's autocast) the nn.Linear weights are stored in it: autocast casts
    them to that dtype before every matmul anyway, so the logits are bit-identical and the copy is
    about half the size.
    """
    from kiln.model import build_model
    from kiln.train.checkpoint import load_model_weights, read_config

    ref = build_model(read_config(ckpt).model, device=device, seed=0)
    load_model_weights(ref, ckpt)
    return cast_frozen(ref, like=like, autocast_dtype=autocast_dtype)


def cast_frozen(model: nn.Module, *, like: nn.Module | None, autocast_dtype: torch.dtype | None) -> nn.Module:
    """`model` in eval mode without gradients, its parameters in `like`'s dtype (fp32 without one)
    and, with `autocast_dtype`, its nn.Linear weights in that dtype (see load_reference)."""
    dtype = next(like.parameters()).dtype if like is not None else torch.float32
    for p in model.parameters():  # parameters only: buffers (RoPE frequencies) stay fp32, as in the policy
        p.data = p.data.to(dtype)
    if autocast_dtype is not None:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.data = m.weight.data.to(autocast_dtype)
    return model.eval().requires_grad_(False)


def autocast_dtype_of(autocast: contextlib.AbstractContextManager, device: torch.device) -> torch.dtype | None:
    """The dtype `autocast` runs matmuls in on `device`, or None when it is not an enabled autocast."""
    with autocast:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class DPOObjective(Objective):
    """DPO / APO on preference pairs; count = pairs."""

    name = "dpo"

    def __init__(self, train: list[Pair], val: list[Pair] | None = None, *, reference: Path, beta: float,
                 kind: str = "sigmoid", precompute: bool = False, batch_size: int = 8,
                 data: DataId | None = None) -> None:
        self.train, self.val, self.data = train, val or [], data  # data: train's, checked on a resume
        self.reference, self.beta, self.kind, self.precompute = reference, beta, kind, precompute
        self.batch_size = batch_size
        self.ref: nn.Module | None = None

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return autocast_for(self._run.dtype, device) if self._run is not None else contextlib.nullcontext()

    def setup(self, model: nn.Module, *, device: torch.device) -> None:
        autocast = self._autocast(device)
        ref = load_reference(self.reference, device=device, like=model,
                             autocast_dtype=autocast_dtype_of(autocast, device))
        if not self.precompute:
            self.ref = ref
            return
        pad = 0
        # under the trainer's autocast: the policy's log-probs in `loss` are computed under it too
        with torch.no_grad(), autocast:
            for pairs in (self.train, self.val):
                for i in range(0, len(pairs), self.batch_size):
                    chunk = pairs[i:i + self.batch_size]
                    b = make_pair_batch(chunk, pad_id=pad).to(device)
                    lp = sequence_logps(ref, b.tokens, b.targets).tolist()  # (2B,)
                    n = len(chunk)
                    for j, p in enumerate(chunk):
                        p.ref = (lp[j], lp[n + j])
        del ref  # precomputed once: the reference never takes memory during training

    def train_data(self, tokenizer, *, rank: int = 0, world_size: int = 1) -> PairLoader:
        return PairLoader(self.train, batch_size=self.run.batching.batch_size, seed=self.run.batching.seed,
                          pad_id=tokenizer.eos_id, rank=rank, world_size=world_size, data=self.data)

    def val_data(self, tokenizer) -> dict[str, list[PairBatch]]:
        if not self.val:
            return {}
        B = self.run.batching.batch_size
        return {"pref": [make_pair_batch(self.val[i:i + B], pad_id=tokenizer.eos_id)
                         for i in range(0, len(self.val), B)]}

    def count(self, batch: PairBatch) -> int:
        return batch.pairs

    def _ref_logps(self, batch: PairBatch) -> Tensor:
        if batch.ref_logps is not None:
            return batch.ref_logps
        assert self.ref is not None, "setup() was not called"
        # its own (fresh) autocast: the reference's bf16 linear weights need it even where a caller has none
        with torch.no_grad(), self._autocast(batch.tokens.device):
            return sequence_logps(self.ref, batch.tokens, batch.targets)

    def loss(self, model: nn.Module, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        B = batch.pairs
        tp = self._run.tp if self._run is not None else 1
        tokens, targets = pad_to_multiple(batch.tokens, batch.targets, multiple=tp)
        logps = sequence_logps(model, tokens, targets)  # (2B,)
        ratios = logps - self._ref_logps(batch)
        c, r = ratios[:B], ratios[B:]
        losses = preference_loss(c, r, beta=self.beta, kind=self.kind)  # (B,)
        rc, rr = (self.beta * c).detach(), (self.beta * r).detach()
        extras = {"rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(), "rewards/margin": (rc - rr).sum(),
                  "rewards/accuracy": (rc > rr).float().sum()}
        return losses.sum(), extras

    @torch.no_grad()
    def evaluate(self, model, val, *, device, autocast) -> dict[str, float]:
        was = model.training
        model.eval()
        sums: dict[str, float] = {}
        n = 0
        for batch in val["pref"]:
            with autocast or contextlib.nullcontext():
                loss, extras = self.loss(model, batch.to(device))
            for k, v in {"loss": loss, **extras}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += batch.pairs
        model.train(was)
        out = {"eval_loss": sums["loss"] / n}
        out.update({f"eval_{k}": v / n for k, v in sums.items() if k != "loss"})
        return out


def load_pairs(path: str, fmt: ChatFormat, *, max_len: int, split: str = "train",
              what: str = "posttrain.data") -> list[Pair]:
    return encode_pairs(load_records(path, split=split, what=what), fmt, max_len=max_len)
