"""`kiln doctor [PRESET]`: check that this machine can train PRESET before spending hours on it.

Each check prints PASS / WARN / FAIL / SKIP (not applicable here) and one line of detail: versions,
device and bf16, flex and flash attention, a tiny model's forward/backward (fp32 and bf16
autocast), an optimizer step, the tokenizer round trip, a batch from the real data loader, the
diversity of its batches (documents per batch against random rows), disk space and the output
folder. The tiny model keeps the preset's architecture switches (QK-norm, NoPE, residual kind,
init, tying, attention backend) at a size that runs in a second on a CPU.
Exit code 0 when nothing FAILs, 1 otherwise. The last line is JSON with the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from rich.table import Table

from kiln import __version__
from kiln.cliargs import parse_with_overrides
from kiln.config import Config, ModelConfig, load_config, split_preset
from kiln.data.factory import Batching, build_train_source, measure_diversity, train_sources, uses_shards
from kiln.data.packing import Batch
from kiln.data.sources import is_hub_source, source_name
from kiln.data.tokenizer import load_tokenizer
from kiln.device import cpu_has_bf16_matmul, pick_device
from kiln.errors import ConfigError, KilnError
from kiln.estimate import estimate_memory, state_bytes
from kiln.eval.loss import token_loss_sum
from kiln.model import build_model, count_params
from kiln.model.attention import AttnMask, attend
from kiln.optim import build_optimizer, param_dtype
from kiln.parallel.mesh import check_model_split
from kiln.runinfo import git_describe
from kiln.train.checkpoint import checkpoint_step, list_checkpoints
from kiln.train.plan import make_plan
from kiln.train.preflight import check_sources, check_startup, run_folder_plan
from kiln.train.sinks import wandb_enabled

Status = Literal["PASS", "WARN", "FAIL", "SKIP"]
MIN_FREE_BYTES = 5 * 2**30  # WARN below 5 GiB free in the output folder's file system
ROUND_TRIP_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune "
                   "must be in want of a wife.\n\n  def f(x):\n      return x ** 2  # caf\u00e9, na\u00efve, 3.14")


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    seconds: float = 0.0


@dataclass
class Context:
    """What the checks share: the config, the device, and results later checks reuse."""

    cfg: Config
    device: torch.device
    out_dir: Path
    tokenizer: Any = None
    model: Any = None
    batch: Any = None
    notes: dict[str, str] = field(default_factory=dict)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# checks: each returns (status, detail); an exception is a FAIL with its message


def check_versions(ctx: Context) -> tuple[Status, str]:
    tv = torch.__version__
    detail = (f"python {platform.python_version()}, torch {tv}, transformers {_version('transformers')}, "
              f"datasets {_version('datasets')}, kiln {__version__} (git {git_describe() or 'unknown'})")
    major, minor = (int(x) for x in tv.split(".")[:2])
    if (major, minor) < (2, 5):
        return "WARN", detail + "; torch < 2.5 has no flex attention"
    return "PASS", detail


def training_bytes(cfg: Config, device: torch.device) -> int:
    """Predicted peak memory per device of training `cfg` on `device` (kiln.estimate: the configured
    optimizer, parameter dtype, batch, checkpointing and layout, activations included)."""
    return estimate_memory(cfg, device="cuda" if device.type == "cuda" else "cpu").total


def checkpoint_bytes(cfg: Config) -> int:
    """Bytes of one checkpoint's tensors: the parameters and the configured optimizer's state."""
    params, optimizer, _ = state_bytes(cfg)
    return params + optimizer


def check_device(ctx: Context) -> tuple[Status, str]:
    n = count_params(ctx.cfg.model)
    need = training_bytes(ctx.cfg, ctx.device)
    preset = (f"{ctx.cfg.run.name}: {n / 1e6:.1f}M params, training peak ~{_gib(need)} per device "
              f"(kiln estimate: {ctx.cfg.optim.name}, micro-batch {ctx.cfg.train.micro_batch_size} x "
              f"{ctx.cfg.train.seq_len}, AC {ctx.cfg.train.activation_checkpointing})")
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        detail = (f"{torch.cuda.device_count()} x {props.name}, {_gib(props.total_memory)}, "
                  f"sm_{props.major}{props.minor}, CUDA {torch.version.cuda}; {preset}")
        return _fits(need, props.total_memory, "GPU memory", detail)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    detail = (f"CPU only ({platform.machine()}, {torch.get_num_threads()} threads, {_gib(ram)} RAM; "
              f"no CUDA device visible); {preset}")
    return _fits(need, ram, "RAM", detail) if ram else ("PASS", detail)


def _fits(need: int, have: int, what: str, detail: str) -> tuple[Status, str]:
    """FAIL past the device's memory, WARN within 10% of it, each with the fix."""
    fix = ("; lower train.micro_batch_size (train.global_batch_size keeps the batch through accumulation) or set "
           "train.activation_checkpointing full (kiln estimate shows the effect)")
    if need > have:
        return "FAIL", f"does not fit: the estimate is {need / have:.1f}x this device's {what}{fix}; {detail}"
    if need > 0.9 * have:
        return "WARN", f"within 10% of this device's {what}{fix}; {detail}"
    return "PASS", detail


def check_parallel(ctx: Context) -> tuple[Status, str]:
    """parallel.* against the model, as training checks it (the process count is torchrun's, not checked here)."""
    p, m = ctx.cfg.parallel, ctx.cfg.model
    layout = f"pp={p.pp} dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp}"
    try:
        check_model_split(p, m)
    except ConfigError as e:
        return "FAIL", str(e)
    return "PASS", (f"{layout} fits the model ({m.n_heads} heads, {m.n_kv_heads} kv heads, ffn {m.ffn_dim}, "
                    f"{m.n_layers} layers); launch {p.pp * p.dp_replicate * p.dp_shard * p.tp} process(es)")


def check_bf16(ctx: Context) -> tuple[Status, str]:
    a = torch.randn(64, 64, device=ctx.device, generator=torch.Generator(ctx.device).manual_seed(0))
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        out = a @ a
    err = ((out.float() - a @ a).abs().max() / (a @ a).abs().max()).item()
    if out.dtype != torch.bfloat16 or err > 2e-2:
        return "WARN", f"bf16 autocast gave {out.dtype}, relative error {err:.1e}; use train.dtype=fp32"
    if ctx.device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            return "WARN", "this GPU has no native bf16 (pre-Ampere): train.dtype=fp32, or expect slow emulation"
        return "PASS", f"native bf16 (relative error of a matmul {err:.1e}); train.dtype=auto uses bf16 autocast"
    if cpu_has_bf16_matmul():
        return "PASS", (f"bf16 autocast works on CPU (relative error {err:.1e}); bf16 matmul instructions (AMX or "
                        "AVX512-BF16): train.dtype=auto trains in bf16")
    return "PASS", (f"bf16 autocast works on CPU (relative error {err:.1e}); no AMX or AVX512-BF16, where bf16 is "
                    "emulated and slower than fp32: train.dtype=auto trains in fp32")


def _attn_inputs(device: torch.device, dtype: torch.dtype, *, grad: bool) -> tuple:
    """q (B, T, H, hd), k and v (B, T, Hkv, hd) and two documents per row, fixed seed."""
    g = torch.Generator(device).manual_seed(0)
    B, T, H, Hkv, hd = 2, 128, 4, 2, 32
    q = torch.randn(B, T, H, hd, device=device, generator=g, dtype=dtype)
    k = torch.randn(B, T, Hkv, hd, device=device, generator=g, dtype=dtype)
    v = torch.randn(B, T, Hkv, hd, device=device, generator=g, dtype=dtype)
    doc_ids = (torch.arange(T, device=device) >= torch.tensor([[50], [90]], device=device)).int()  # (B, T)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, lambda: AttnMask(doc_ids=doc_ids)


def _compare_backend(backend: str, device: torch.device, dtype: torch.dtype, *, grad: bool) -> float:
    """Max abs difference between `backend` and the eager reference (outputs, and grads when `grad`)."""
    q, k, v, mask = _attn_inputs(device, dtype, grad=grad)
    with torch.set_grad_enabled(grad):
        ref = attend(q, k, v, mask(), "eager")
        out = attend(q, k, v, mask(), backend)
    diff = (out.float() - ref.float()).abs().max().item()
    if grad:
        g_out = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        g_ref = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        diff = max([diff] + [(a.float() - b.float()).abs().max().item() for a, b in zip(g_out, g_ref)])
    return diff


def check_flex(ctx: Context) -> tuple[Status, str]:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        status: Status = "FAIL" if ctx.cfg.model.attention == "flex" else "WARN"
        return status, f"not in torch {torch.__version__} (needs >= 2.5); use model.attention=sdpa"
    cuda = ctx.device.type == "cuda"
    bad: Status = "FAIL" if ctx.cfg.model.attention == "flex" else "WARN"  # only blocks a flex preset
    what = ("compiled forward+backward on CUDA" if cuda else
            "forward on CPU (no flex backward on CPU: train there with sdpa, same document mask)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile" on CPU
            diff = _compare_backend("flex", ctx.device, torch.float32, grad=cuda)
    except Exception as e:  # compile errors (no triton, old driver) surface here
        return bad, f"{what}: {_one_line(e)}"
    tol = 2e-3 if cuda else 1e-4  # CUDA: the compiled kernel's reduction order differs from eager's
    if diff > tol:
        return bad, f"{what}: max |flex - eager| = {diff:.1e} > {tol:.0e} with a document mask"
    return "PASS", f"{what} matches eager with a document mask (max diff {diff:.1e})"


def check_flash(ctx: Context) -> tuple[Status, str]:
    version = _version("flash-attn") or _version("flash_attn")
    wanted = ctx.cfg.model.attention == "flash"
    if ctx.device.type != "cuda":
        return ("FAIL" if wanted else "SKIP"), ("CUDA only" + (f" (installed: {version})" if version else "")
                                                + ("; the preset asks for model.attention=flash" if wanted else ""))
    if version is None:
        return ("FAIL" if wanted else "WARN"), ("flash-attn not installed (pip install flash-attn "
                                                "--no-build-isolation); sdpa and flex cover training without it")
    bad: Status = "FAIL" if wanted else "WARN"
    try:
        diff = _compare_backend("flash", ctx.device, torch.bfloat16, grad=True)
    except Exception as e:  # a wheel built for another torch / CUDA fails at import or call
        return bad, f"flash-attn {version}: {_one_line(e)}"
    if diff > 5e-2:
        return bad, f"flash-attn {version}: max |flash - eager| = {diff:.1e} in bf16 with a document mask"
    return "PASS", f"flash-attn {version}: varlen forward+backward matches eager in bf16 (max diff {diff:.1e})"


def tiny_model_config(cfg: ModelConfig, *, device: torch.device) -> tuple[ModelConfig, str]:
    """The preset's architecture switches at a tiny size, with a backend that can train on `device`."""
    backend, note = cfg.attention, ""
    if backend == "flex" and device.type != "cuda":
        backend, note = "sdpa", " (flex -> sdpa: no flex backward on CPU)"
    if backend == "flash" and (device.type != "cuda" or not _version("flash-attn")):
        backend, note = "sdpa", " (flash -> sdpa: flash-attn needs CUDA and the package)"
    kv = 4 if cfg.n_kv_heads == cfg.n_heads else 2
    tiny = dataclasses.replace(cfg, d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv, head_dim=0, ffn_dim=128,
                               max_seq_len=128, nope_every=min(cfg.nope_every, 2), attention=backend)
    return tiny, f"{backend}{note}"


def _synthetic_batch(vocab: int, device: torch.device) -> Any:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 65), generator=g)  # (B, T+1)
    doc_ids = (torch.arange(65) >= 40).int().expand(2, 65)  # two documents per row
    targets = tokens[:, 1:].clone()
    targets[doc_ids[:, 1:] != doc_ids[:, :-1]] = -100
    return Batch(tokens[:, :-1].contiguous(), targets, doc_ids[:, :-1].contiguous()).to(device)


def check_model(ctx: Context) -> tuple[Status, str]:
    tiny, backend = tiny_model_config(ctx.cfg.model, device=ctx.device)
    model = build_model(tiny, device=ctx.device, seed=0)
    batch = _synthetic_batch(tiny.vocab_size, ctx.device)
    zeroed = _unzero_outputs(model) if tiny.init_zero_out else 0
    loss = token_loss_sum(model, batch, doc_mask=True) / batch.num_targets
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    if not math.isfinite(loss.item()) or any(g is None or not torch.isfinite(g).all() for g in grads):
        return "FAIL", f"{backend}: loss {loss.item()} or a gradient is not finite at initialisation"
    zero = sum(int(g.abs().sum().item() == 0) for g in grads)
    ln_v = math.log(tiny.vocab_size)
    detail = f"{backend}: loss at init {loss.item():.3f} (ln V = {ln_v:.3f}), {len(grads)} finite gradients"
    if zeroed:
        detail += f" (model.init_zero_out: its {zeroed} zero tensors set to small random values for this check)"
    status: Status = "PASS"
    if zero:
        status, detail = "FAIL", detail + f", {zero} of them all zero"
    elif abs(loss.item() - ln_v) > 1.0:  # random init predicts ~uniformly: anything else is a bad init
        status, detail = "WARN", detail + "; far from ln V: check the init"
    if ctx.device.type == "cpu" or torch.cuda.is_bf16_supported():
        model.zero_grad(set_to_none=True)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            loss_bf16 = token_loss_sum(model, batch, doc_mask=True) / batch.num_targets
        loss_bf16.backward()
        bad = not all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        gap = abs(loss_bf16.item() - loss.item())
        detail += f"; bf16 autocast loss {loss_bf16.item():.3f}"
        if bad or gap > 0.05 * loss.item():
            status, detail = "FAIL", detail + (" with non-finite gradients" if bad else f", {gap:.3f} from fp32")
    model.zero_grad(set_to_none=True)
    ctx.model, ctx.batch = model, batch
    return status, detail


def _unzero_outputs(model: torch.nn.Module) -> int:
    """model.init_zero_out starts the head and each block's output projections at zero: no gradient reaches the
    other tensors until those have moved (by design), so the gradient check would find them unconnected. Give
    the zero tensors small random values instead; returns how many there were."""
    g = torch.Generator().manual_seed(1)
    zero = [p for p in model.parameters() if not p.detach().any()]
    with torch.no_grad():
        for p in zero:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return len(zero)


def check_optimizer(ctx: Context, *, lr: float = 3e-3, steps: int = 5) -> tuple[Status, str]:
    if ctx.model is None:
        return "SKIP", "needs the model check to pass"
    model, batch = ctx.model, ctx.batch
    dtype = param_dtype(ctx.cfg.optim)
    for p in model.parameters():  # as the trainer does: parameters in optim.param_dtype, buffers stay fp32
        p.data = p.data.to(dtype)
    ocfg = dataclasses.replace(ctx.cfg.optim, lr=lr)  # the preset's optimizer at a fixed lr: a sanity check
    opt = build_optimizer(model, ocfg, device_type=ctx.device.type, tie_embeddings=ctx.cfg.model.tie_embeddings)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    name = type(opt).__name__
    if dtype != torch.float32:
        sr = "stochastic rounding" if ctx.cfg.optim.stochastic_rounding else "round-to-nearest"
        name += f" on {str(dtype).removeprefix('torch.')} parameters ({sr})"
    for i in range(steps):
        loss = token_loss_sum(model, batch, doc_mask=True) / batch.num_targets
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])] if i == 0 else []
        if unchanged:
            return "FAIL", f"{name}: one step at lr {lr:g} left {len(unchanged)} tensors unchanged ({unchanged[0]})"
    if not losses[-1] < losses[0]:
        return "FAIL", f"{name}: {steps} steps on one batch did not lower the loss ({losses[0]:.3f} -> {losses[-1]:.3f})"
    return "PASS", (f"{name}: one step changed all {len(before)} tensors; {steps} steps on one batch "
                    f"{losses[0]:.3f} -> {losses[-1]:.3f}")


def check_tokenizer(ctx: Context) -> tuple[Status, str]:
    spec = ctx.cfg.data.tokenizer
    tok = load_tokenizer(spec)
    ids = tok.encode(ROUND_TRIP_TEXT)
    back = tok.decode(ids)
    detail = f"{spec}: {tok.vocab_size} ids, eos {tok.eos_id}; {len(ROUND_TRIP_TEXT)} chars -> {len(ids)} tokens"
    if back != ROUND_TRIP_TEXT:
        at = next((i for i, (a, b) in enumerate(zip(back, ROUND_TRIP_TEXT)) if a != b), min(len(back), len(ids)))
        return "FAIL", detail + f"; decode(encode(text)) differs at char {at}: {back[at:at + 20]!r}"
    if tok.vocab_size > ctx.cfg.model.vocab_size:
        return "FAIL", detail + f"; larger than model.vocab_size {ctx.cfg.model.vocab_size}"
    ctx.tokenizer = tok
    return "PASS", detail + ", round trip exact"


def check_data(ctx: Context) -> tuple[Status, str]:
    if ctx.tokenizer is None:
        return "SKIP", "needs the tokenizer check to pass"
    cfg = ctx.cfg
    sources = train_sources(cfg.data)
    local = [s for s in sources if uses_shards(cfg.data) or not is_hub_source(s)]
    hub = [s.path for s in sources if s not in local]
    check_sources(cfg)  # `kiln train`'s own refusal of a missing or empty source, naming its key
    if not local:
        return "WARN", f"only HF hub sources ({', '.join(hub)}): not fetched here (network); run kiln train to see"
    # the trainer's own batch source, one sequence per batch, tokenizing in this process, rows in stream
    # order (the row shuffle would tokenize its whole first window for one row; "data diversity" measures it)
    data = dataclasses.replace(cfg.data, train=local, shards="", num_workers=0, row_shuffle=0,
                               format="shards" if uses_shards(cfg.data) else cfg.data.format)
    one_row = Batching(seq_len=cfg.train.seq_len, batch_size=1, seed=cfg.run.seed)
    batch = build_train_source(data, ctx.tokenizer, one_row).next_batch()
    seq_len = cfg.train.seq_len
    top = int(batch.tokens.max())
    docs = int(batch.doc_ids.max()) + 1
    preview = ctx.tokenizer.decode(batch.tokens[0, :12].tolist()).replace("\n", " ").strip()
    detail = (f"{', '.join(source_name(s) for s in local)}: batch {tuple(batch.tokens.shape)}, {docs} document(s), "
              f"{batch.num_targets} targets, starts {preview[:40]!r}")
    if tuple(batch.tokens.shape) != (1, seq_len) or top >= cfg.model.vocab_size or batch.num_targets == 0:
        return "FAIL", detail + f"; max id {top} vs model.vocab_size {cfg.model.vocab_size}"
    if hub:
        return "WARN", detail + f"; hub sources not fetched here: {', '.join(hub)}"
    return "PASS", detail


def check_diversity(ctx: Context) -> tuple[Status, str]:
    """Distinct documents and sources per batch and per 10 batches of the trainer's loader, against rows
    drawn at random (kiln.data.diversity): WARN when batches hold far fewer documents than random rows."""
    if ctx.tokenizer is None:
        return "SKIP", "needs the tokenizer check to pass"
    cfg = ctx.cfg
    sources = train_sources(cfg.data)
    if not uses_shards(cfg.data) and any(is_hub_source(s) for s in sources):
        return "SKIP", "HF hub sources are not fetched here (network); measure local data with `kiln data verify`"
    batching = Batching(seq_len=cfg.train.seq_len, batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed)
    d = measure_diversity(cfg.data, ctx.tokenizer, batching, sources=sources)
    return d.status, d.line()


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(ctx: Context) -> tuple[Status, str]:
    where = _existing_ancestor(ctx.out_dir)
    free = shutil.disk_usage(where).free
    keep = ctx.cfg.train.keep_last or 10
    ckpt = checkpoint_bytes(ctx.cfg)
    need = max(MIN_FREE_BYTES, (keep + 1) * ckpt)  # keep_last checkpoints plus the one being written
    detail = f"{_gib(free)} free at {where}; one checkpoint ~{_gib(ckpt)}, keep_last {ctx.cfg.train.keep_last}"
    return ("WARN" if free < need else "PASS"), detail + (f" (want >= {_gib(need)})" if free < need else "")


def check_out_dir(ctx: Context) -> tuple[Status, str]:
    out = ctx.out_dir
    created = []  # folders this check made, removed again afterwards
    try:
        p = out.absolute()
        while not p.exists():
            created.append(p)
            p = p.parent
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kiln-doctor-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return "FAIL", f"{out}: not writable ({e.strerror or e}); pass --run.out_dir DIR"
    finally:
        for d in created:
            if d.is_dir():
                d.rmdir()
    try:  # a run folder whose checkpoint this config cannot resume fails `kiln train` at once
        plan = run_folder_plan(ctx.cfg, out=out)
    except KilnError as e:  # its fix may name `kiln train`'s own flags (--fresh), so say whose error it is
        return "FAIL", f"`kiln train` would stop: {e}"
    ckpts, c = list_checkpoints(out), ctx.cfg
    steps = None if c.train.time_budget else make_plan(c.model, c.train, c.optim, stages=c.data.stages).total_steps
    if ckpts and steps is not None and checkpoint_step(ckpts[-1]) >= steps:  # "resumes" would be wrong
        return "WARN", (f"{out}: complete at {ckpts[-1].name}, so `kiln train` has nothing to train; raise "
                        "train.max_steps / train.total_tokens to train further, or pass --fresh to start over")
    return "PASS", f"writable: {plan}"


def check_setup(ctx: Context) -> tuple[Status, str]:
    """What `kiln train`'s setup refuses from the config (kiln.train.preflight.check_startup)."""
    if ctx.tokenizer is None:
        return "SKIP", "the tokenizer did not load"
    try:
        check_startup(ctx.cfg, ctx.tokenizer, ctx.device, resuming=bool(list_checkpoints(ctx.out_dir)))
    except KilnError as e:
        return "FAIL", f"`kiln train` would stop: {e}"
    c = ctx.cfg
    return "PASS", (f"attention {c.model.attention}, loss {c.train.loss_impl}"
                    + (f", checkpoint_url {c.train.checkpoint_url}" if c.train.checkpoint_url else "")
                    + (f", init_from {c.run.init_from}" if c.run.init_from else "")
                    + (f", eval tasks {', '.join(c.train.eval_tasks)}" if c.train.eval_tasks else ""))


def check_wandb(ctx: Context) -> tuple[Status, str]:
    version = _version("wandb")
    wanted = wandb_enabled(ctx.cfg)
    if version is None:
        if wanted:
            return "FAIL", "run.wandb is on but wandb is not installed: pip install wandb (or 'kiln[wandb]')"
        return "SKIP", "not installed (optional: pip install wandb; JSONL and TensorBoard always log)"
    mode = ctx.cfg.run.wandb_mode
    if mode == "auto":
        mode = f"WANDB_MODE={os.environ['WANDB_MODE']}" if os.environ.get("WANDB_MODE") else "auto, WANDB_MODE unset"
    return "PASS", f"wandb {version} installed; {'on' if wanted else 'off'} for this preset (mode {mode})"


CHECKS: list[tuple[str, Callable[[Context], tuple[Status, str]]]] = [
    ("versions", check_versions), ("parallel layout", check_parallel), ("device", check_device),
    ("bf16", check_bf16), ("flex attention", check_flex), ("flash-attn", check_flash), ("model fwd/bwd", check_model),
    ("optimizer step", check_optimizer),
    ("tokenizer", check_tokenizer), ("run setup", check_setup), ("data sample", check_data), ("data diversity", check_diversity),
    ("disk space", check_disk),
    ("out dir", check_out_dir), ("wandb", check_wandb),
]


def run_checks(cfg: Config, *, out_dir: Path | None = None, device: torch.device | None = None) -> list[Check]:
    """Run every check in order; an exception inside a check is that check's FAIL."""

    ctx = Context(cfg=cfg, device=device or pick_device(cfg.run.device), out_dir=Path(out_dir or cfg.run.out_dir))
    results = []
    for name, fn in CHECKS:
        t0 = time.perf_counter()
        try:
            status, detail = fn(ctx)
        except Exception as e:  # a crash in a check is the finding, not a doctor bug to raise
            status, detail = "FAIL", _one_line(e)
        results.append(Check(name, status, detail, time.perf_counter() - t0))
    return results


def print_report(results: list[Check]) -> dict[str, Any]:
    """The table, then (returned and printed) a JSON line with the counts."""
    colors = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}
    table = Table(title="kiln doctor")
    table.add_column("check", style="bold", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail")
    table.add_column("s", justify="right", no_wrap=True)
    for r in results:
        table.add_row(r.name, f"[{colors[r.status]}]{r.status}[/]", r.detail, f"{r.seconds:.1f}")
    Console().print(table)  # the terminal's width; redirected, $COLUMNS or 80 (rich's default)
    counts = {s.lower(): sum(r.status == s for r in results) for s in ("PASS", "WARN", "FAIL", "SKIP")}
    report = {**counts, "failed": [r.name for r in results if r.status == "FAIL"],
              "seconds": round(sum(r.seconds for r in results), 2)}
    print(json.dumps(report))
    return report


def main(argv: list[str]) -> int:
    """`kiln doctor [PRESET] [--out-dir DIR] [--section.key VALUE ...]`; exit 1 when a check FAILs."""
    p = argparse.ArgumentParser(prog="kiln doctor", usage="kiln doctor [PRESET] [--out-dir DIR] [--section.key VALUE ...]",
                                description="Sanity checks before training PRESET (default: tiny).",
                                allow_abbrev=False)
    p.add_argument("--out-dir", metavar="DIR",
                   help="output folder to check (default: the preset's run.out_dir)")
    preset, argv = split_preset(argv)
    args, overrides = parse_with_overrides(p, argv)
    cfg = load_config(preset or "tiny", overrides)
    if args.out_dir:
        cfg.run.out_dir = args.out_dir
    results = run_checks(cfg)
    report = print_report(results)
    return 1 if report["fail"] else 0
