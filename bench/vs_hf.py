"""kiln vs Hugging Face transformers, same shapes, same weights, same data, same optimizer, one process.

    python bench/vs_hf.py                      # the CPU reference shape (4 x d256, GQA 4/2, vocab 32768, 8 x 256)
    python bench/vs_hf.py --device cuda --dtype bf16 --preset dense-180m --batch 16 --seq 2048

Both models start from kiln's initialisation (the HF copy is made with kiln.export.to_hf_model) and
their step-0 losses must agree before anything is timed. Each step is what training does: forward,
loss, backward, clip_grad_norm_(1.0), AdamW (torch's fused kernel for both, as kiln builds it; same
hyperparameters and decay groups). The variants run interleaved (A B C A B C ...), so a noisy shared machine slows
them alike; the step time is the median over the timed steps. The result is printed as a table
and, unless --no-write, recorded in bench/RESULTS.md (machine, date and commit beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from report import write_block  # noqa: E402

from kiln.config import ModelConfig, OptimConfig, load_config  # noqa: E402
from kiln.data.packing import Batch  # noqa: E402
from kiln.device import cpu_name, matmul_precision  # noqa: E402
from kiln.eval.loss import token_loss_sum  # noqa: E402
from kiln.export import to_hf_model  # noqa: E402
from kiln.model import build_model  # noqa: E402
from kiln.optim import build_optimizer  # noqa: E402
from kiln.perf import device_peak, flops_per_token, mfu  # noqa: E402
from kiln.runinfo import git_describe  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="", help="take the model shape from a kiln preset (default: the CPU shape)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = bf16 autocast, fp32 weights")
    p.add_argument("--variants", default="hf,kiln,kiln-plain-loss",
                   help="comma list of hf, kiln, kiln-plain-loss, kiln-compiled")
    p.add_argument("--json", default="", help="also append the result as one JSON line to this file")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.preset:
        cfg = load_config(args.preset).model
        cfg.attention = "sdpa"
        return cfg
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_seq_len=max(args.seq, 256),
                       tie_embeddings=True, attention="sdpa")


def hf_optimizer(model: torch.nn.Module, cfg: OptimConfig, *, device_type: str) -> torch.optim.Optimizer:
    """AdamW with kiln's groups: decay weight matrices, not norms or the (tied) embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
    extra = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}  # as kiln.optim.builder
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra)


class Variant:
    """One model + optimizer + the function that computes its mean loss on a batch."""

    def __init__(self, name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Any) -> None:
        self.name, self.model, self.opt, self.loss_fn = name, model, opt, loss_fn
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, batch: Batch, autocast: Any, device: torch.device) -> float:
        t0 = time.perf_counter()
        with autocast():
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()  # a device sync: the step has finished
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.losses.append(value)
        return time.perf_counter() - t0


def kiln_loss(impl: str):
    def fn(model, batch: Batch) -> torch.Tensor:
        return token_loss_sum(model, batch, doc_mask=False, impl=impl) / batch.num_targets
    return fn


def hf_loss(model, batch: Batch) -> torch.Tensor:
    # shift_labels: the targets are already next tokens, exactly kiln's (HF then does not shift `labels`)
    return model(input_ids=batch.tokens, labels=batch.targets, shift_labels=batch.targets, use_cache=False).loss


def machine(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {threads} threads ({os.cpu_count()} cores visible)"


def resolved_loss_impl(device: torch.device) -> str:
    """What kiln's loss_impl="auto" runs on `device` (kiln.model.loss.linear_cross_entropy's rule):
    Liger's fused kernel on CUDA when it imports, else kiln's chunked loss."""
    from kiln.model.loss import _liger_loss

    return "liger" if device.type == "cuda" and _liger_loss() is not None else "chunked"


LOSS_LABELS = {"chunked": "chunked loss", "liger": "Liger fused loss", "plain": "plain loss"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = model_config(args)
    ocfg = OptimConfig(lr=3e-4, weight_decay=0.1)
    use_bf16 = args.dtype == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    base = build_model(cfg, device=device, seed=1234)
    fused = resolved_loss_impl(device)  # the variants run this impl explicitly and are labelled by it
    variants: list[Variant] = []
    for name in args.variants.split(","):
        if name == "hf":
            m = to_hf_model(base, cfg).to(device).train()
            variants.append(Variant("HF " + type(m).__name__, m, hf_optimizer(m, ocfg, device_type=device.type), hf_loss))
            continue
        m = build_model(cfg, device=device, seed=1234).train()
        if name == "kiln":
            v = Variant(f"kiln ({LOSS_LABELS[fused]})", m, None, kiln_loss(fused))
        elif name == "kiln-plain-loss":
            v = Variant("kiln (plain loss)", m, None, kiln_loss("plain"))
        elif name == "kiln-compiled":
            from kiln.parallel.compile_ac import apply_compile

            apply_compile(m, mode="block")
            v = Variant(f"kiln ({LOSS_LABELS[fused]}, compiled blocks)", m, None, kiln_loss(fused))
        else:
            raise SystemExit(f"unknown variant {name}")
        v.opt = build_optimizer(m, ocfg, device_type=device.type)
        variants.append(v)

    del base  # each variant holds its own copy (four fp32 copies of a 1B model are 16 GB)
    g = torch.Generator().manual_seed(0)

    def make_batch() -> Batch:
        rows = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(),
                     torch.zeros(args.batch, args.seq, dtype=torch.int32)).to(device)

    batches = [make_batch() for _ in range(4)]
    with torch.no_grad():  # same weights -> same loss before any update (apples to apples)
        step0 = {v.name: v.loss_fn(v.model, batches[0]).item() for v in variants}
    ref = next(iter(step0.values()))
    tol = 2e-2 if use_bf16 else 1e-4
    for value in step0.values():
        if abs(value - ref) > tol:
            raise SystemExit(f"step-0 losses differ: {step0}")

    for i in range(args.warmup + args.steps):
        for v in variants:  # interleaved, so machine noise hits every variant alike
            dt = v.step(batches[i % len(batches)], autocast, device)
            if i >= args.warmup:
                v.times.append(dt)

    tokens = args.batch * args.seq
    flops = flops_per_token(cfg, seq_len=args.seq).total
    peak = device_peak(device, precision=matmul_precision(device=device,
                                                          autocast_dtype=torch.bfloat16 if use_bf16 else None))
    rows = []
    for v in variants:
        step = statistics.median(v.times)
        rows.append({"variant": v.name, "step_ms": step * 1000, "tokens_per_sec": tokens / step,
                     "mfu": mfu(tokens_per_sec=tokens / step, flops_per_token=flops, peak_flops=peak.peak_flops),
                     "loss_first": v.losses[0], "loss_last": v.losses[-1], "step_ms_min": min(v.times) * 1000,
                     "step_ms_all": [round(t * 1000, 3) for t in v.times]})
    hf = next((v for v in variants if v.name.startswith("HF")), None)
    for v, r in zip(variants, rows):
        # paired: round i's HF step over round i's step of this variant (adjacent in time, so a load spike
        # hits both), then the median over rounds; the ratio of the two medians is kept beside it
        r["vs_hf"] = statistics.median(a / b for a, b in zip(hf.times, v.times)) if hf else None
        r["vs_hf_of_medians"] = statistics.median(hf.times) / statistics.median(v.times) if hf else None
    shape = (f"{cfg.n_layers} layers, d={cfg.d_model}, heads {cfg.n_heads}/{cfg.n_kv_heads}, ffn {cfg.ffn_dim}, "
             f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'}"
             f"{', qk-norm' if cfg.qk_norm else ''}, batch {args.batch}x{args.seq}, {args.dtype}")
    import transformers

    return {"date": time.strftime("%Y-%m-%d"), "commit": git_describe(ROOT) or "unknown", "machine": machine(device, args.threads),
            "device": device.type, "shape": shape, "steps": args.steps, "warmup": args.warmup,
            "step0_loss": step0, "torch": torch.__version__, "transformers": transformers.__version__,
            "flops_per_token": flops, "peak_note": peak.note, "rows": rows}


def table(res: dict[str, Any]) -> str:
    lines = [f"{res['shape']}; median of {res['steps']} steps after {res['warmup']} warm-up, variants interleaved; "
             "vs HF is the median over rounds of HF's step time over the variant's in the same round.",
             f"Machine: {res['machine']}; {res['date']}; commit {res['commit']}; torch {res['torch']}, "
             f"transformers {res['transformers']}.", "",
             "| variant | step ms | tokens/s | MFU | vs HF |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        m = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = f"{r['vs_hf']:.2f}x" if r["vs_hf"] is not None else ""
        lines.append(f"| {r['variant']} | {r['step_ms']:.0f} | {r['tokens_per_sec']:.0f} | {m} | {ratio} |")
    lines += ["", "Step-0 loss (same weights): " + ", ".join(f"{k} {v:.5f}" for k, v in res["step0_loss"].items())]
    return "\n".join(lines)


def write_results(res: dict[str, Any], body: str) -> None:
    """Replace this device's vs-HF block in bench/RESULTS.md (the file's other sections are kept)."""
    write_block(f"vs_hf:{res['device']}", body, heading="## kiln vs Hugging Face (bench/vs_hf.py)", path=RESULTS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and "kiln-compiled" in args.variants and os.environ.get("OMP_WAIT_POLICY") is None:
        # After inductor's OpenMP kernels have run, spinning idle threads slow every eager op in the
        # process 2-10x on a 2-core machine (measured); passive waiting avoids it. It must be set before
        # OpenMP starts, hence the re-exec; every variant runs under it alike.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])])
    res = run(args)
    body = table(res)
    print(body)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "vs_hf", **res}) + "\n")
    if not args.no_write:
        write_results(res, body)
        print(f"\nwritten to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
