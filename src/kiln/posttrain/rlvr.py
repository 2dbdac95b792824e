"""Reinforcement learning with verifiable rewards: GRPO-style group sampling, KL to a frozen reference.

Data: jsonl records {"prompt", "answer"} (prompt: a string, one user message, or a list of messages).
Each micro-batch is train.micro_batch_size prompts. In `loss` (the trainer's one loop, unchanged):

  1. sample G = posttrain.group_size completions per prompt with the current policy (eval mode, no
     grad, KV-cache decoding of the prompt's group as one batch, seeded per prompt, see below);
  2. score each with the verifiers (kiln.posttrain.rewards) -> r (B*G,);
  3. advantages A = (r - mean_group) / (std_group + 1e-4)  (GRPO, Shao et al. 2024, DeepSeekMath);
  4. per completion token: -A * exp(logp - sg(logp)) + kl_coef * k3, where
     k3 = exp(ref - logp) - (ref - logp) - 1 is Schulman's unbiased, non-negative KL(policy || ref)
     estimator; averaged over the completion's tokens, summed over completions.

logp is the log-probability under the distribution the completions were sampled from: the logits
divided by posttrain.temperature (the reference's too, for the KL; as TRL's GRPOTrainer does).
posttrain.top_k / top_p truncate the sampling distribution but are ignored in logp, so with them
the samples are slightly off-policy. One gradient step per generation, so GRPO's clipped ratio
pi / pi_old is 1 (up to that truncation) and is left out; the exp(logp - sg(logp)) factor is 1 in
value and gives the policy gradient A * grad logp.
count(batch) = completions (B * G). Metrics: reward, kl, completion_len, group_reward_std (means).
Eval: greedy completions of the validation prompts; eval_reward is their mean reward and
eval_loss = -eval_reward (the trainer's loop wants a loss).

Distributed (torchrun; DDP, FSDP2, TP; HSDP takes the FSDP path, untested): data-parallel ranks
split the prompts as SFT and DPO split their items (kiln.data.cursor: rank r of W takes the step's
prompts r, r+W, ...), and each prompt draw is seeded by its (epoch, index) in that global stream. A prompt's group is decoded alone
(G rows of the same prompt: no padding, no batch-mates), so its tokens depend only on its seed and
the weights: a distributed run samples what one process samples, and resuming on another number of
ranks continues the same stream. A group lives on one rank, so advantages need no communication;
the loss and the metrics are sums over completions that the engine divides by the global count.
Sharded weights (FSDP, TP) cannot decode rank by rank (ranks would run different numbers of decode
steps and their collectives would go out of step), so each rank decodes with a whole local copy of
the policy, gathered once per optimizer step (SamplingCopy); DDP and one process decode with the
policy itself. Under TP the scored batch is padded to a length divisible by parallel.tp (sequence
parallelism shards that dim). Tested against one process (tests/distributed/test_posttrain_layouts.py):
FSDP, DDP and TP on 2 ranks log the same rewards and, within 1e-5, the same losses; a run saved on
2 FSDP ranks resumes in one process like the uninterrupted one. The price: decoding runs one batch
of G rows per prompt, not one of the micro-batch's B x G rows (on a GPU, less parallel work per
decoding step; not measured).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from kiln.data.cursor import CursorLoader, DataId, EpochCursor, shuffled
from kiln.data.packing import IGNORE
from kiln.data.records import load_records
from kiln.device import autocast_for
from kiln.errors import DataError
from kiln.eval.loss import right_padded, token_logps
from kiln.generate import continuation_text, generate
from kiln.model import build_model
from kiln.parallel.parallelize import unwrap
from kiln.posttrain.chat import ChatFormat, as_messages, naming
from kiln.posttrain.dpo import autocast_dtype_of, cast_frozen, load_reference, pad_to_multiple
from kiln.posttrain.rewards import Reward
from kiln.train.objective import Objective


@dataclass
class Task:
    prompt: list[int]  # chat-templated prompt tokens, ending with the generation prompt
    text: str  # the prompt as the verifier sees it (the last user message)
    answer: str


@dataclass
class PromptBatch:
    tasks: list[Task]
    seeds: list[int]  # sampling seed of each task's group (from its position in the global stream)
    step: int = -1  # the optimizer step the batch belongs to (-1: unknown; the sampling copy is refreshed)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PromptBatch:
        return self  # token tensors are built in `loss`, after sampling


def encode_tasks(records: list[tuple[str, dict]], fmt: ChatFormat, *, max_prompt_len: int) -> list[Task]:
    out = []
    for where, rec in records:
        if not isinstance(rec, dict) or "prompt" not in rec or "answer" not in rec:
            raise DataError(f"{where}: an RLVR record needs \"prompt\" and \"answer\"")
        answer = rec["answer"]
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):  # null became the answer "None"
            raise DataError(f"{where}: 'answer' must be a string or a number, got {json.dumps(answer)[:40]}")
        msgs = as_messages(rec["prompt"], role="user", where=where, field="prompt")
        with naming(where):
            ids = fmt.prompt_ids(msgs)
        if len(ids) > max_prompt_len:
            raise DataError(f"{where}: the prompt has {len(ids)} tokens; with posttrain.max_new_tokens it must fit "
                            f"model.max_seq_len ({max_prompt_len} tokens left for it)")
        out.append(Task(ids, msgs[-1]["content"], str(rec["answer"])))
    if not out:
        raise DataError("RLVR data: no prompts")
    return out


class PromptLoader(CursorLoader):
    """Endless, Stateful prompt batches, shuffled per epoch by (seed, epoch). Each prompt draw's sampling
    seed comes from (seed, epoch, index in the epoch): the same draw gets the same seed on every layout
    and after a resume, so the state is the cursor alone and reshards like SFT's and DPO's.
    `global_batch` (prompts per optimizer step over all ranks) tells each batch its step."""

    KIND, ITEMS, WHAT = "prompts", "prompts", "RLVR data"

    def __init__(self, tasks: list[Task], *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 global_batch: int = 0, data: DataId | None = None) -> None:
        self.tasks, self.batch_size, self.seed, self.rank = tasks, batch_size, seed, rank
        self.data = data or DataId()
        self.global_batch = global_batch
        self.cursor = EpochCursor(shuffled(len(tasks), seed=seed, stream=4), empty="RLVR data: no prompts",
                                  rank=rank, world_size=world_size)

    def next_batch(self) -> PromptBatch:
        taken = self.cursor.take_positioned(self.batch_size)
        seeds = [int(np.random.default_rng([self.seed, 5, epoch, index]).integers(2**62)) for (epoch, index), _ in taken]
        (epoch, index), _ = taken[0]
        step = (epoch * len(self.tasks) + index) // self.global_batch if self.global_batch > 0 else -1
        return PromptBatch([self.tasks[int(i)] for _, i in taken], seeds, step)

    def n_items(self) -> int:
        return len(self.tasks)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(N,) rewards, N = prompts x G, grouped consecutively -> (N,) (r - mean) / (std + eps) per group."""
    r = rewards.view(-1, group_size)
    std = r.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).flatten()


def completion_batch(prompts: list[list[int]], completions: list[list[int]], *, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded inputs and targets (-100 except on completion tokens). Each (N, T)."""
    return right_padded([p + c for p, c in zip(prompts, completions)],
                        [[False] * len(p) + [True] * len(c) for p, c in zip(prompts, completions)], pad_id=pad_id)


class SamplingCopy:
    """A whole local copy of a sharded (FSDP / TP) policy to decode with, refreshed once per optimizer step.

    `get_model_state_dict(full_state_dict=True)` all-gathers every parameter on every rank; `loss` runs
    on every rank for each micro-batch in lockstep, so the gathers line up. Decoding then runs on plain
    local modules, with no collectives, however many steps each rank decodes. The copy's parameters
    take the policy's dtype and, under autocast, its linear weights the autocast dtype (as DPO's
    reference: the same logits, about half the memory). A policy with no sharded parameter (one
    process, DDP) is used as it is.
    """

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.step: int | None = None

    @staticmethod
    def needed(model: nn.Module) -> bool:
        return any(isinstance(p, DTensor) for p in model.parameters())

    def policy(self, model: nn.Module, *, step: int, autocast_dtype: torch.dtype | None) -> nn.Module:
        """The module to decode with at `step` (-1: refresh in any case)."""
        if not self.needed(model):
            return model
        if self.model is None:
            self.model = cast_frozen(build_model(unwrap(model).cfg, device=next(model.parameters()).device, seed=0),
                                     like=model, autocast_dtype=autocast_dtype)
        if step < 0 or step != self.step:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.copy_(full[name])
            del full
            self.step = step
        return self.model


class RLVRObjective(Objective):
    """GRPO with verifiable rewards; count = completions."""

    name = "rlvr"

    def __init__(self, train: list[Task], val: list[Task] | None = None, *, reference: Path, reward: Reward,
                 tokenizer, group_size: int, kl_coef: float, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, data: DataId | None = None) -> None:
        self.train, self.val, self.reference, self.reward, self.tok = train, val or [], reference, reward, tokenizer
        self.data = data  # train's, checked on a resume
        self.G, self.kl_coef, self.max_new_tokens = group_size, kl_coef, max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.ref: nn.Module | None = None
        self.copy = SamplingCopy()

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return autocast_for(self._run.dtype, device) if self._run is not None else contextlib.nullcontext()

    def setup(self, model: nn.Module, *, device: torch.device) -> None:
        self.ref = None if self.kl_coef <= 0 else load_reference(
            self.reference, device=device, like=model, autocast_dtype=autocast_dtype_of(self._autocast(device), device))

    def train_data(self, tokenizer, *, rank: int = 0, world_size: int = 1) -> PromptLoader:
        b = self.run.batching
        return PromptLoader(self.train, batch_size=b.batch_size, seed=b.seed, rank=rank, world_size=world_size,
                            global_batch=self.run.global_batch_size, data=self.data)

    def val_data(self, tokenizer) -> dict[str, list[list[Task]]]:
        return {"rlvr": [self.val]} if self.val else {}

    def count(self, batch: PromptBatch) -> int:
        return len(batch.tasks) * self.G

    def completions_text(self, prompt: list[int], completion: list[int]) -> str:
        if completion and completion[-1] == self.tok.eos_id:
            completion = completion[:-1]
        return continuation_text(self.tok, prompt, completion)

    def _decode(self, model: nn.Module, prompts: list[list[int]], *, temperature: float, seed: int) -> list[list[int]]:
        was = model.training
        model.eval()
        outs = generate(model, prompts, max_new_tokens=self.max_new_tokens, temperature=temperature,
                        top_k=self.top_k, top_p=self.top_p, eos_id=self.tok.eos_id, seed=seed)
        model.train(was)
        return outs

    def sample(self, model: nn.Module, tasks: list[Task], *, n: int, temperature: float,
               seeds: list[int]) -> list[list[int]]:
        """n completions per task (grouped consecutively), sampled with `model` in eval mode. Task i's
        group is decoded alone with seed seeds[i], so its tokens do not depend on the other tasks."""
        return [o for t, seed in zip(tasks, seeds, strict=True)
                for o in self._decode(model, [t.prompt] * n, temperature=temperature, seed=seed)]

    def _policy(self, model: nn.Module, *, step: int) -> nn.Module:
        """What to decode with: the policy, or its gathered local copy when it is sharded."""
        device = next(model.parameters()).device
        return self.copy.policy(model, step=step, autocast_dtype=autocast_dtype_of(self._autocast(device), device))

    def score(self, tasks: list[Task], outs: list[list[int]], n: int) -> Tensor:
        rewards = [self.reward(t.text, self.completions_text(t.prompt, o), t.answer)
                   for t, o in zip([t for t in tasks for _ in range(n)], outs)]
        return torch.tensor(rewards, dtype=torch.float32)

    def loss(self, model: nn.Module, batch: PromptBatch) -> tuple[Tensor, dict[str, Tensor]]:
        outs = self.sample(self._policy(model, step=batch.step), batch.tasks, n=self.G,
                           temperature=self.temperature, seeds=batch.seeds)
        rewards = self.score(batch.tasks, outs, self.G)  # (N,)
        device = next(model.parameters()).device
        adv = group_advantages(rewards, self.G).to(device)  # (N,)
        prompts = [t.prompt for t in batch.tasks for _ in range(self.G)]
        tok, tgt = pad_to_multiple(*completion_batch(prompts, outs, pad_id=self.tok.eos_id),
                                   multiple=self._run.tp if self._run is not None else 1)
        tok, tgt = tok.to(device), tgt.to(device)
        mask = (tgt != IGNORE).float()  # (N, T)
        lengths = mask.sum(dim=1).clamp(min=1)  # (N,)
        logp = token_logps(model, tok, tgt, temperature=self.temperature)  # (N, T)
        per_tok = -adv[:, None] * torch.exp(logp - logp.detach())
        kl = torch.zeros_like(logp)
        if self.ref is not None:
            with torch.no_grad(), self._autocast(device):  # fresh: the reference's linear weights may be bf16
                ref = token_logps(self.ref, tok, tgt, temperature=self.temperature)
            delta = ref - logp
            kl = torch.exp(delta) - delta - 1  # k3 >= 0
            per_tok = per_tok + self.kl_coef * kl
        per_seq = (per_tok * mask).sum(dim=1) / lengths  # (N,)
        kl_seq = ((kl * mask).sum(dim=1) / lengths).detach()
        std = rewards.view(-1, self.G).std(dim=1, unbiased=False)
        extras = {"reward": rewards.sum().to(device), "kl": kl_seq.sum(), "completion_len": lengths.sum().detach(),
                  "group_reward_std": (std.repeat_interleave(self.G)).sum().to(device)}
        return per_seq.sum(), extras

    def evaluate(self, model, val, *, device, autocast) -> dict[str, float]:
        tasks = val["rlvr"][0]
        policy = self._policy(model, step=-1)  # after the step's update: refreshed
        with autocast or contextlib.nullcontext():
            outs = self._decode(policy, [t.prompt for t in tasks], temperature=0.0, seed=0)  # greedy, one batch
        mean = float(self.score(tasks, outs, 1).mean())
        return {"eval_loss": -mean, "eval_reward": mean}


def load_tasks(path: str, fmt: ChatFormat, *, max_prompt_len: int, split: str = "train",
              what: str = "posttrain.data") -> list[Task]:
    return encode_tasks(load_records(path, split=split, what=what), fmt, max_prompt_len=max_prompt_len)
