"""Runs a few optimizer steps of the Engine on fixed global batches; prints JSON from rank 0.

Usage: [torchrun --nproc_per_node N] python tests/distributed/engine_worker.py OUT_DIR NAME='--parallel.x N ...' ...
Runs each named layout in turn in one process group (startup is most of a small test's time) and
writes OUT_DIR/NAME.json. Every layout sees the same global batch per step (each data-parallel rank
takes a contiguous slice), so its losses and gradient norms must equal the single-process run's up
to reduction order.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from kiln.config import load_config
from kiln.data.packing import Batch
from kiln.model.loss import shared_rows
from kiln.parallel.mesh import init_layout, shutdown
from kiln.parallel.pipeline import microbatches
from kiln.train.engine import Engine
from kiln.train.objective import Objective, RunSettings
from kiln.train.plan import make_plan

STEPS = 3
BASE = ["--model.vocab_size", "128", "--model.d_model", "32", "--model.n_layers", "4", "--model.n_heads", "4",
        "--model.n_kv_heads", "2", "--model.ffn_dim", "64", "--model.max_seq_len", "64", "--train.seq_len", "16",
        "--train.micro_batch_size", "2", "--train.global_batch_size", "8", "--optim.lr", "1e-2",
        "--optim.warmup_steps", "0", "--run.device", "cpu",
        "--train.dtype", "fp32"]  # the steps run without autocast; auto would give FSDP bf16 parameters on bf16 CPUs


def global_batch(step: int, rows: int, T: int, vocab: int) -> Batch:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (rows, T + 1), generator=g)
    cuts = torch.randint(1, T, (rows, 2), generator=g)  # two document boundaries per row
    pos = torch.arange(T + 1)
    doc = (pos[None] >= cuts[:, :1]).int() + (pos[None] >= cuts[:, 1:]).int()
    targets = tokens[:, 1:].clone()
    targets[doc[:, 1:] != doc[:, :-1]] = -100
    return Batch(tokens=tokens[:, :-1].contiguous(), targets=targets, doc_ids=doc[:, :-1].contiguous())


def run(overrides: list[str]) -> tuple[list[dict], object]:
    cfg = load_config("tiny", BASE + overrides)
    layout = init_layout(cfg.parallel, cfg.model, "cpu")
    plan = make_plan(cfg.model, cfg.train, cfg.optim, dp_size=layout.dp_size,
                     pipeline_microbatches=microbatches(cfg.parallel) if layout.pp > 1 else 1)
    objective = Objective()
    objective.configure(RunSettings.of(cfg))
    engine = Engine(model=cfg.model, optim=cfg.optim, train=cfg.train, parallel=cfg.parallel,
                    doc_mask=cfg.data.doc_mask, layout=layout, objective=objective, seed=0, accum_steps=plan.accum_steps)
    t = cfg.train
    n_mb = plan.accum_steps
    records = []
    for step in range(STEPS):
        gb = global_batch(step, t.global_batch_size, t.seq_len, cfg.model.vocab_size)
        per_rank = t.global_batch_size // layout.dp_size
        lo = layout.dp_rank * per_rank
        mine = [Batch(gb.tokens[i:i + t.micro_batch_size], gb.targets[i:i + t.micro_batch_size],
                      gb.doc_ids[i:i + t.micro_batch_size]) for i in range(lo, lo + per_rank, t.micro_batch_size)]
        assert len(mine) == n_mb
        batches = mine if engine.reads_data else []
        engine.train()
        loss_sum, count, extras = engine.forward_backward(batches, torch.autocast("cpu", enabled=False))
        norm = engine.clip_grad_norm(1.0)
        loss, _, _ = engine.reduce(loss_sum, count, extras, [])
        engine.step()
        engine.optimizer.zero_grad()
        records.append({"step": step, "loss": loss, "grad_norm": float(norm)})
    if layout.world_size == 1 and engine.model.share_head_rows:  # the rows the loss computed as one
        records[-1]["shared_head_rows"] = shared_rows(engine.model.head.weight.detach()).size
    if engine.pipe is not None and cfg.model.tie_embeddings:  # the tied copies must still be equal
        mods = engine.pipe.modules_by_id()
        last = engine.pipe.n_stages - 1
        pair = [mods[0].tok_emb.weight if 0 in mods else None, mods[last].head.weight if last in mods else None]
        local = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in pair if p is not None]
        if local:  # a V schedule's middle rank holds neither copy
            records[-1]["param_dtype"] = str(local[0].dtype)
        if len(local) == 2:
            records[-1]["tied_max_diff"] = (local[0].float() - local[1].float()).abs().max().item()
        elif engine.pipe.tie_group is not None:
            other = torch.empty_like(local[0])
            ranks = sorted(torch.distributed.get_process_group_ranks(engine.pipe.tie_group))
            peer = ranks[1] if torch.distributed.get_rank() == ranks[0] else ranks[0]
            ops = [torch.distributed.P2POp(torch.distributed.isend, local[0].contiguous(), peer),
                   torch.distributed.P2POp(torch.distributed.irecv, other, peer)]
            for w in torch.distributed.batch_isend_irecv(ops):
                w.wait()
            diff = torch.tensor((local[0].float() - other.float()).abs().max().item())
            torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX, group=engine.pipe.tie_group)  # rank 0 writes
            records[-1]["tied_max_diff"] = diff.item()
    return records, layout


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    layout = None
    for spec in sys.argv[2:]:
        name, _, args = spec.partition("=")
        records, layout = run(shlex.split(args))
        if layout.is_main:
            (out / f"{name}.json").write_text(json.dumps(records))
    if layout is not None:
        shutdown(layout)


if __name__ == "__main__":
    main()
