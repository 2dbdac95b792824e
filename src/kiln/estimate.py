"""`kiln estimate`: peak training memory per device, from the config alone (no weights, no device).

    peak = params + optimizer states + [grads, when accumulating] + saved activations
           + max(loss buffers, head gradient + one recomputed block)
           + bf16 weight copies (autocast over fp32 parameters, except FSDP2 without pipelining)
           + FSDP / DDP buffers

Optimizer states follow each optimizer's code: torch's AdamW keeps moments in the parameter dtype;
Adafactor's statistics, Muon's momentum and Muon's AdamW moments are fp32 even for bf16 parameters.

Activations are counted tensor by tensor from what autograd saves in kiln's Block (kiln.model),
per token and layer, so the table below must change when the model code does; tests compare it with
the saved tensors of a real forward on CPU. Symbols: d = d_model, q = n_heads * head_dim,
kv = n_kv_heads * head_dim, f = ffn_dim, H = n_heads; b = bytes of the matmul dtype (2 under bf16
autocast, else 4); the residual stream and norms are fp32 (4 bytes) in both cases.

    attn_norm   input x, normalised y (4d + 4d) and 1/rms (4)
    q, k, v in  the norm output (4d in fp32; 3 separate casts of 2d each under autocast)
    attention   q, k, v after RoPE (bq + 2 b kv), its output (bq), logsumexp (4H); on CPU sdpa runs in fp32
                (4 bytes each) and the output gets a bf16 copy for the output projection (2q)
    qk_norm     + per q and k: fp32 copy, normalised (and its cast under autocast), 1/rms
    mlp_norm    4d + 4d + 4; gate/up input: 4d (fp32) or 2 x 2d (autocast)
    SwiGLU      gate out, up out, silu(gate), product: 4 x bf
Selective checkpointing (kiln.parallel.compile_ac) keeps only matmul and attention outputs plus the
block input; full checkpointing keeps the block input (4d); both recompute one block at a time.
The peak is taken at the end of the forward pass (before backward frees activations): gradients are
absent there unless an earlier micro-batch of the same step left them (accumulation > 1).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kiln.cliargs import parse_with_overrides
from kiln.config import Config, ModelConfig, load_config, split_preset
from kiln.device import autocast_dtype
from kiln.model import count_params
from kiln.model.attention import expand_kv_for_mask, sdpa_dtype
from kiln.model.loss import default_chunk_rows
from kiln.parallel.mesh import check_model_split
from kiln.parallel.pipeline import microbatches
from kiln.perf import block_matrix_shapes

GIB = 1024**3


@dataclass
class MemoryEstimate:
    """Bytes per device; `total` is the predicted peak of allocated tensor memory."""

    params: int
    grads: int
    optimizer: int
    activations: int
    loss_buffers: int
    recompute: int  # one block's activations rebuilt in backward (checkpointing only)
    autocast_copies: int
    parallel_buffers: int
    activation_checkpointing: str
    tokens_per_micro_batch: int
    per_layer_per_token: float
    notes: list[str] = field(default_factory=list)

    head_grad: int = 0  # the output head's gradient, alive from the loss on

    @property
    def total(self) -> int:
        # the loss buffers live at the end of the forward pass, a recomputed block later in backward
        transient = max(self.loss_buffers, self.head_grad + self.recompute)
        return (self.params + self.grads + self.optimizer + self.activations + transient
                + self.autocast_copies + self.parallel_buffers)

    total_bytes = total

    def summary(self) -> str:
        """One line: the terms in GiB."""
        parts = [("params", self.params), ("grads", self.grads), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("loss", self.loss_buffers), ("recompute", self.recompute),
                 ("bf16 copies", self.autocast_copies), ("parallel", self.parallel_buffers)]
        return ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts if v) + f" GiB; AC {self.activation_checkpointing}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def _uses_autocast(cfg: Config, device: str) -> bool:

    return autocast_dtype(cfg.train.dtype, torch.device(device)) == torch.bfloat16


def layer_activation_terms(m: ModelConfig, *, autocast: bool, ac: str, expand_kv: bool = False,
                           attn_fp32: bool = False) -> dict[str, float]:
    """Bytes saved for backward per token by one Block (before tensor-parallel division). `expand_kv`:
    masked GQA attention on CUDA gets k, v repeated to every query head (kiln.model.attention).
    `attn_fp32`: sdpa computes in fp32 under autocast (on CPU, kiln.model.attention.sdpa_dtype)."""
    d, hd, H, Hkv, f = m.d_model, m.hd, m.n_heads, m.n_kv_heads, m.ffn_dim
    q, kv = H * hd, Hkv * hd
    b = 2 if autocast else 4
    ba = 4 if attn_fp32 else b  # attention's q, k, v and output
    if ac == "full":
        return {"block input": 4 * d}
    if ac == "selective":  # matmul outputs (q, k, v, o, gate, up, down), attention output + lse, block input
        return {"block input": 4 * d, "matmul outputs": b * (q + 2 * kv + d + 2 * f + d),
                "attention output": ba * q + 4 * H}
    # DeepNet's post-norm saves the same tensors: the block input feeds q, k, v instead of a norm output
    terms = {
        "attn_norm": 8 * d + 4,
        "qkv input": 3 * 2 * d if autocast else 4 * d,
        "attention q,k,v,out": ba * (2 * q + 2 * kv),
        "logsumexp": 4 * H,
        "mlp_norm": 8 * d + 4,
        "gate/up input": 2 * 2 * d if autocast else 4 * d,
        "swiglu": 4 * b * f,
    }
    if attn_fp32 and autocast:
        terms["o_proj input"] = 2 * q  # the fp32 attention output cast for the output projection
    if m.qk_norm:
        # q: fp32 copy (4q) + normalised y (4q fp32; 2q bf16 when autocast) + 1/rms (4H); the same for k.
        # Under autocast RoPE's fp32 output is cast again for attention (counted above as bq), and the
        # fp32 copy replaces the bf16 RoPE input, so the extra is 6q (+4H) instead of 8q.
        extra = (6 if autocast else 8)
        terms["qk_norm"] = extra * (q + kv) + 4 * (H + Hkv)
    if expand_kv and Hkv < H:
        terms["k,v repeated per query head"] = b * 2 * (q - kv)
    return terms


def state_bytes(cfg: Config) -> tuple[int, int, str]:
    """(parameter bytes, optimizer-state bytes, a note) for the whole model before any sharding: what
    one checkpoint holds (`kiln doctor`'s disk check) and what estimate_memory divides per device. The
    weights' moving average (train.ema_decay: fp32, sharded like the weights) counts as optimizer state."""
    params, optim, note = _optimizer_state_bytes(cfg)
    if cfg.train.ema_decay > 0:
        return params, optim + 4 * count_params(cfg.model), note + "; + the fp32 average of train.ema_decay"
    return params, optim, note


def _optimizer_state_bytes(cfg: Config) -> tuple[int, int, str]:
    m, o = cfg.model, cfg.optim
    n = count_params(m)
    pbytes = 2 if o.param_dtype == "bf16" else 4
    if o.name == "adamw":  # torch's AdamW keeps its moments in the parameter dtype (fp32: see config)
        return n * pbytes, 2 * pbytes * n, "AdamW: exp_avg + exp_avg_sq in the parameter dtype"
    if o.name == "adamw8bit":
        return n * pbytes, int(n * (2 + 2 * 4 / 256)), "8-bit AdamW: two 1-byte states + an fp32 scale per 256"
    if o.name == "adafactor":  # every statistic is fp32 whatever the parameter dtype (kiln.optim.adafactor)
        emb = [(m.vocab_size, m.d_model)] * (1 if m.tie_embeddings else 2)
        shapes = block_matrix_shapes(m) * m.n_layers + emb
        vectors = n - sum(r * c for r, c in shapes)
        first = 4 * n if o.adafactor_beta1 is not None else 0
        return n * pbytes, sum(4 * (r + c) for r, c in shapes) + 4 * vectors + first, (
            "Adafactor: factored fp32 second moments" + (" + an fp32 first moment" if first else ""))
    assert o.name == "muon", o.name
    hidden = sum(r * c for r, c in block_matrix_shapes(m)) * m.n_layers  # block matrices, all layers
    # fp32 momentum for the block matrices; fp32 AdamW moments for embeddings, head and norms (kiln.optim.muon)
    return n * pbytes, 4 * hidden + 8 * (n - hidden), "Muon: fp32 momentum for block matrices, fp32 AdamW rest"


def default_device(cfg: Config) -> str:
    """Where run.device would train on this machine."""
    return "cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu"


def estimate_memory(cfg: Config, *, device: str | None = None, ac: str | None = None,
                    micro_batch_size: int | None = None) -> MemoryEstimate:
    """Predicted peak bytes per device for training `cfg` (`ac` overrides train.activation_checkpointing).

    `device`: "cuda" or "cpu" (decides bf16 autocast under train.dtype=auto); default: where
    run.device would train here.
    """
    device = device or default_device(cfg)
    t = cfg.train
    ac = ac or t.activation_checkpointing
    B = micro_batch_size or t.micro_batch_size
    notes: list[str] = []
    params, grads, optimizer = _state_terms(cfg, B=B, notes=notes)
    activations, recompute, per_layer = _activation_terms(cfg, device=device, ac=ac, B=B, notes=notes)
    loss_buffers, autocast_copies = _loss_terms(cfg, device=device, B=B, notes=notes)
    parallel = _parallel_terms(cfg, device=device, params=params)
    if cfg.parallel.dp_replicate > 1 and cfg.parallel.dp_shard == 1:  # DDP: buckets mirror the gradients
        grads = params
    if t.compile:
        notes.append("torch.compile fuses elementwise ops: activations are usually below this estimate")
    if cfg.optim.param_dtype == "bf16":
        notes.append("bf16 parameters: activations counted at the fp32/autocast sizes (an over-estimate)")
    if t.fp8:
        notes.append("fp8: not modelled (casts are transient; saved inputs shrink)")
    m = cfg.model
    return MemoryEstimate(params=params, grads=grads, optimizer=optimizer, activations=activations,
                          loss_buffers=loss_buffers, recompute=recompute,
                          head_grad=int(m.vocab_size * m.d_model * 4 / cfg.parallel.tp),
                          autocast_copies=autocast_copies, parallel_buffers=parallel, activation_checkpointing=ac,
                          tokens_per_micro_batch=B * t.seq_len, per_layer_per_token=per_layer, notes=notes)


def _layers_here(cfg: Config) -> int:
    """Layers on one pipeline stage's device (all of them without a pipeline)."""
    return math.ceil(cfg.model.n_layers / cfg.parallel.pp)


def _state_terms(cfg: Config, *, B: int, notes: list[str]) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) per device. TP shards block matrices and the vocab dim; PP
    keeps its stage's layers (the first stage also holds the embedding, counted here); FSDP shards the rest."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    n_total = count_params(m)
    block_matmul = sum(r * c for r, c in block_matrix_shapes(m))
    emb = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    vectors = n_total - block_matmul * m.n_layers - emb
    param_total, opt_total, opt_note = state_bytes(cfg)
    notes.append(opt_note)
    layers = _layers_here(cfg)
    share = (block_matmul * layers / p.tp + emb / p.tp + vectors * layers / m.n_layers) / n_total
    params = int(param_total * share / p.dp_shard)
    optimizer = int(opt_total * share / p.dp_shard)
    accum = max(t.global_batch_size // (B * p.dp_replicate * p.dp_shard), 1)
    return params, params if accum > 1 or p.pp > 1 else 0, optimizer


def _activation_terms(cfg: Config, *, device: str, ac: str, B: int, notes: list[str]) -> tuple[int, int, float]:
    """(saved activations, one block's recompute under activation checkpointing, bytes per layer and token)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    T, tokens, layers = t.seq_len, B * t.seq_len, _layers_here(cfg)
    autocast = _uses_autocast(cfg, device)
    expand_kv = cfg.data.doc_mask and m.attention == "sdpa" and expand_kv_for_mask(torch.device(device))
    attn_fp32 = autocast and m.attention == "sdpa" and sdpa_dtype(torch.device(device), torch.bfloat16) == torch.float32
    per_layer = sum(layer_activation_terms(m, autocast=autocast, ac=ac, expand_kv=expand_kv,
                                           attn_fp32=attn_fp32).values()) / p.tp
    in_flight = 1
    if p.pp > 1:
        n_micro = microbatches(p)
        in_flight = n_micro if p.pp_schedule == "GPipe" else min(p.pp, n_micro)
        notes.append(f"pipeline: first stage holds {in_flight} micro-batches of activations ({p.pp_schedule})")
    acts = per_layer * tokens * layers * in_flight
    recompute = 0.0
    if ac in ("full", "selective"):  # backward recomputes one block at a time
        recompute = sum(layer_activation_terms(m, autocast=autocast, ac="none", expand_kv=expand_kv,
                                               attn_fp32=attn_fp32).values()
                        ) / p.tp * tokens
    b = 2 if autocast else 4
    shared = 8 * tokens  # token ids kept by the embedding
    rope_rows = B if cfg.data.doc_mask else 1
    shared += 2 * 4 * rope_rows * T * (m.hd // 2)  # cos / sin shared by all layers
    if cfg.data.doc_mask and m.attention in ("sdpa", "eager"):
        shared += B * T * T * ((4 if attn_fp32 else b) if m.attention == "sdpa" else 1)  # one bias / bool mask
    if m.attention == "eager":
        acts += 2 * 4 * B * m.n_heads * T * T * layers / p.tp  # scores and probabilities per layer
        notes.append("eager attention saves (B, H, T, T) scores per layer")
    final_norm = (8 * m.d_model + 4) * tokens
    return int(acts + shared + final_norm), int(recompute), per_layer


def _loss_terms(cfg: Config, *, device: str, B: int, notes: list[str]) -> tuple[int, int]:
    """(loss buffers, autocast's bf16 weight copies)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    V, d, tokens = m.vocab_size, m.d_model, B * t.seq_len
    autocast = _uses_autocast(cfg, device)
    b = 2 if autocast else 4
    if p.tp > 1 or t.loss_impl == "plain":
        # full logits in the matmul dtype, their fp32 copy and log_softmax output (vocab-sharded under TP)
        loss_buffers = int(tokens * V * (b + 4 + 4) / p.tp)
    else:
        rows = min(default_chunk_rows(torch.device(device)), tokens)
        bufs = rows * V * (b + 4)  # logits chunk (its bf16 gradient reuses it), fp32 softmax
        bufs += V * d * 2 if autocast and tokens > rows else 0  # a chunk's bf16 dW before accumulation
        loss_buffers = bufs + V * d * 4 + tokens * d * 4  # + dW (fp32) and dh made in the forward pass
        if t.loss_impl == "liger" or (t.loss_impl == "auto" and device == "cuda"):
            notes.append("loss: Liger when installed (similar buffers), else kiln's chunked loss")
    # autocast casts each fp32 weight to bf16 once per forward and the linears save the copy; bf16
    # parameters need no copy, and neither does FSDP2 with its bf16 MixedPrecisionPolicy when blocks are
    # resharded after forward (pp == 1): it all-gathers bf16 weights and frees them after each block
    fsdp_frees = p.dp_shard > 1 and p.pp == 1
    copies = autocast and cfg.optim.param_dtype != "bf16" and not fsdp_frees
    block_matmul = sum(r * c for r, c in block_matrix_shapes(m))
    return int(loss_buffers), int(2 * (block_matmul * _layers_here(cfg) / p.tp + V * d / p.tp) if copies else 0)


def _parallel_terms(cfg: Config, *, device: str, params: int) -> int:
    """Communication buffers: FSDP2's gathered blocks (one + the prefetched next, and the root unit), or
    DDP's gradient buckets (as large as the gradients)."""
    m, p = cfg.model, cfg.parallel
    parallel = 0
    if p.dp_shard > 1:
        gathered = 2 if _uses_autocast(cfg, device) else (2 if cfg.optim.param_dtype == "bf16" else 4)
        block_matmul = sum(r * c for r, c in block_matrix_shapes(m))
        emb = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
        parallel += int((2 * block_matmul + emb) / p.tp * gathered)
    if p.dp_replicate > 1 and p.dp_shard == 1:
        parallel += params
    return parallel


def format_estimate(cfg: Config, *, device: str = "cuda") -> str:
    """A table: the configured layout for every activation-checkpointing mode, then the breakdown."""
    configured = cfg.train.activation_checkpointing
    lines = [f"memory estimate for {cfg.run.name}: micro-batch {cfg.train.micro_batch_size} x {cfg.train.seq_len}, "
             f"{'bf16 autocast' if _uses_autocast(cfg, device) else 'fp32'} on {device},",
             f"  optimizer {cfg.optim.name}, layout dp_shard={cfg.parallel.dp_shard} tp={cfg.parallel.tp} "
             f"pp={cfg.parallel.pp} dp_replicate={cfg.parallel.dp_replicate}", "",
             f"{'activation checkpointing':<26}{'activations':>15}{'peak':>13}"]  # right edges on the values' GiB
    for ac in ("none", "selective", "full"):
        e = estimate_memory(cfg, device=device, ac=ac)
        mark = "  <- configured" if ac == configured else ""
        lines.append(f"{ac:<26}{e.activations / GIB:>11.2f} GiB{e.total / GIB:>9.2f} GiB{mark}")
    e = estimate_memory(cfg, device=device)
    lines += ["", f"breakdown ({configured}):"]
    for k in ("params", "grads", "optimizer", "activations", "loss_buffers", "recompute", "autocast_copies",
              "parallel_buffers"):
        lines.append(f"  {k:<18}{getattr(e, k) / GIB:>9.3f} GiB")
    lines.append(f"  {'total':<18}{e.total / GIB:>9.3f} GiB")
    lines += [f"  note: {n}" for n in e.notes]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """CLI entry: `kiln estimate PRESET [--device cuda|cpu] [--section.key VALUE ...]`."""

    ap = argparse.ArgumentParser(prog="kiln estimate", usage="kiln estimate [PRESET] [--device cuda|cpu] "
                                 "[--section.key VALUE ...]",
                                 description="Peak training memory per device, from the config (PRESET: a preset "
                                 "name or YAML path, default tiny).", allow_abbrev=False)
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                    help="the device to estimate for (default: where run.device would train on this machine, as "
                         "kiln doctor and kiln bench measure; cuda for a GPU run planned here)")
    preset, argv = split_preset(argv)
    args, overrides = parse_with_overrides(ap, argv)
    cfg = load_config(preset or "tiny", overrides)
    check_model_split(cfg.parallel, cfg.model)  # a layout training refuses has no memory to estimate
    device = args.device or default_device(cfg)
    print(format_estimate(cfg, device=device))
    e = estimate_memory(cfg, device=device)
    print(json.dumps({"preset": cfg.run.name, "device": device, **e.as_dict()}))
    return 0
