"""Adafactor (+ bf16 stochastic rounding), Muon (+ DTensor/FSDP2), 8-bit AdamW: against closed forms,
reference implementations, uninterrupted runs and a single-process run.

Run as a script under torchrun, this file is the 2-process worker of the DTensor test.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import needs_inductor_cpu
from kiln.config import ModelConfig, OptimConfig
from kiln.errors import ConfigError
from kiln.model import build_model
from kiln.optim import Adafactor, Muon, build_optimizer, muon_param_groups, newton_schulz, stochastic_round_


@pytest.fixture(autouse=True)
def _one_thread():
    # These tensors are tiny: on a shared 2-core machine, waking a second intra-op thread per op costs
    # more than the op (measured 0.3 s vs 0.04 s for 100 steps of the SR test), so run them on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64)


def tiny_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    return build_model(TINY, seed=0).to(dtype)


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # a learnable toy language: each next token is (token * 5 + 3) mod 64, with a random start
    starts = torch.randint(0, 64, (n, 8, 1), generator=g)
    steps = torch.arange(17).view(1, 1, -1)
    return list((starts * 5**steps + 3 * (5**steps - 1) // 4) % 64)  # (8, 17) each


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor], lr: float) -> list[float]:
    losses = []
    for toks in data:
        for group in opt.param_groups:  # as the trainer does
            group["lr"] = lr
        logits = model(toks[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), toks[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def roundtrip(obj: dict) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def assert_resume_is_exact(cfg: OptimConfig, dtype: torch.dtype, lr: float, n: int = 8) -> list[float]:
    """n steps straight vs n/2 steps, save, fresh model + optimizer, load, n/2 steps: identical bits."""
    data = batches(n)
    model_a = tiny_model(dtype)
    opt_a = build_optimizer(model_a, cfg, device_type="cpu")
    losses_a = train_steps(model_a, opt_a, data, lr)

    model_b = tiny_model(dtype)
    opt_b = build_optimizer(model_b, cfg, device_type="cpu")
    losses_b = train_steps(model_b, opt_b, data[: n // 2], lr)
    saved = roundtrip({"model": model_b.state_dict(), "optim": opt_b.state_dict()})
    model_c = tiny_model(dtype)
    opt_c = build_optimizer(model_c, cfg, device_type="cpu")
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["optim"])
    losses_b += train_steps(model_c, opt_c, data[n // 2:], lr)

    assert losses_a == losses_b
    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        assert pa.dtype == dtype and torch.equal(pa, pc), name
    return losses_a


# ---- stochastic rounding -------------------------------------------------------------------------


def _bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


@pytest.mark.parametrize("value", [1.0 + 2**-10, -3.3, 1.234e-3])
def test_stochastic_rounding_is_unbiased(value):
    v = torch.tensor(value).item()  # the fp32 value actually rounded
    toward_zero = _float(_bits(v) & ~0xFFFF)  # the two bf16 neighbours, by bit pattern
    away = _float((_bits(v) & ~0xFFFF) + 0x10000)
    n = 200_000
    src = torch.full((n,), v, dtype=torch.float32)
    out = stochastic_round_(torch.empty(n, dtype=torch.bfloat16), src, generator=torch.Generator().manual_seed(0))
    out = out.double()
    assert set(out.unique().tolist()) == {toward_zero, away}  # only the two neighbours
    p_away = (v - toward_zero) / (away - toward_zero)
    std = math.sqrt(p_away * (1 - p_away) / n) * abs(away - toward_zero)
    assert abs(out.mean().item() - v) < 4 * std  # unbiased
    assert abs((out == away).double().mean().item() - p_away) < 0.01
    # round-to-nearest is biased by the whole distance to the nearest neighbour
    assert abs(torch.tensor(v).bfloat16().double().item() - v) > 20 * std


def test_stochastic_rounding_keeps_representable_values():
    x = torch.randn(1000).bfloat16()
    out = stochastic_round_(torch.empty_like(x), x.float(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


def test_bf16_params_train_with_stochastic_rounding_where_nearest_stalls():
    # Least squares with bf16 weights in [1, 2) (ulp 2^-7) and Adafactor steps of lr x |u| <= 3e-4 x 8
    # (RMS(u) <= 1 after clipping, 64 elements): always under half an ulp, so round-to-nearest never
    # moves a weight, while stochastic rounding moves them by the right amount on average.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    w_true = 1.5 + 0.1 * torch.rand(16, 4, generator=g)
    y = x @ w_true

    def run(stochastic: bool) -> list[float]:
        w = nn.Parameter((w_true + 0.03 * torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
                         .bfloat16())
        opt = Adafactor([w], lr=3e-4, stochastic_rounding=stochastic, seed=0)
        losses = []
        for _ in range(100):
            loss = (x @ w.float() - y).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    nearest, sr = run(False), run(True)
    assert nearest[-1] == nearest[0]  # stalled: not one weight changed
    assert sr[-1] < 0.5 * sr[0]


# ---- Adafactor ------------------------------------------------------------------------------------


def test_adafactor_matches_dense_reference():
    # Reference written with the dense V = R C^T / sum(R) of the paper (sums, not means), three steps,
    # a (6, 4) matrix, a vector, beta1 and weight decay on.
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
    grads = [(torch.randn(6, 4, generator=g), torch.randn(4, generator=g)) for _ in range(3)]
    lr, wd, beta1, eps1 = 0.01, 0.1, 0.9, 1e-30

    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    opt = Adafactor([w, b], lr=lr, beta1=beta1, weight_decay=wd)
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    assert opt.state[w]["exp_avg_sq_row"].shape == (6,) and opt.state[w]["exp_avg_sq_col"].shape == (4,)

    ref_w, ref_b = w0.double().clone(), b0.double().clone()
    row_sum, col_sum, v_b = torch.zeros(6, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), 0
    m_w, m_b = torch.zeros(6, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t, (gw, gb) in enumerate(grads, start=1):
        beta2 = 1 - t**-0.8
        sq = gw.double() ** 2 + eps1
        row_sum = beta2 * row_sum + (1 - beta2) * sq.sum(1)
        col_sum = beta2 * col_sum + (1 - beta2) * sq.sum(0)
        v_w = torch.outer(row_sum, col_sum) / row_sum.sum()
        v_b = beta2 * v_b + (1 - beta2) * (gb.double() ** 2 + eps1)
        for ref, grad, v, m in ((ref_w, gw, v_w, m_w), (ref_b, gb, v_b, m_b)):
            u = grad.double() / v.sqrt()
            u = u / max(1.0, u.pow(2).mean().sqrt().item())
            m.mul_(beta1).add_((1 - beta1) * u)
            ref.mul_(1 - lr * wd).sub_(lr * m)
    assert torch.allclose(w.double(), ref_w, rtol=1e-5, atol=1e-6)
    assert torch.allclose(b.double(), ref_b, rtol=1e-5, atol=1e-6)


def test_adafactor_bf16_sr_reduces_loss_and_resumes_exactly():
    cfg = OptimConfig(name="adafactor", weight_decay=0.1, param_dtype="bf16", sr_seed=7)
    losses = assert_resume_is_exact(cfg, torch.bfloat16, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0]


def test_adafactor_state_stays_fp32_for_bf16_params_after_load():
    model = tiny_model(torch.bfloat16)
    opt = build_optimizer(model, OptimConfig(name="adafactor", adafactor_beta1=0.9), device_type="cpu")
    train_steps(model, opt, batches(1), 1e-2)
    opt2 = build_optimizer(model, OptimConfig(name="adafactor", adafactor_beta1=0.9), device_type="cpu")
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    for p, st in opt2.state.items():
        assert p.dtype == torch.bfloat16
        assert all(v.dtype == torch.float32 for k, v in st.items() if k != "step")


def test_adafactor_scale_parameter_scales_the_step_by_rms():
    """optim.adafactor_scale_parameter (HF's scale_parameter): the step is lr x max(eps2, RMS(X)) per tensor,
    with the schedule still supplying lr (no 1/sqrt(t) relative step)."""
    deltas = {}
    for scale in (False, True):
        torch.manual_seed(0)  # the same weights both times
        model = nn.Linear(16, 8)  # a (8, 16) weight and an (8,) bias
        torch.nn.init.normal_(model.weight, std=0.5)
        torch.nn.init.constant_(model.bias, 1e-4)  # RMS below eps2 = 1e-3: the floor applies
        before = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(model, OptimConfig(name="adafactor", adafactor_scale_parameter=scale, weight_decay=0.0,
                                                 lr=1e-2), device_type="cpu")
        model(torch.ones(4, 16)).square().sum().backward()
        opt.step()
        assert all(g["scale_parameter"] is scale for g in opt.param_groups)
        deltas[scale] = [(b - p.detach()) for b, p in zip(before, model.parameters())]
        rms = [max(1e-3, b.square().mean().sqrt().item()) for b in before]
    for plain, scaled, r in zip(deltas[False], deltas[True], rms):
        torch.testing.assert_close(scaled, plain * r)


def test_dcp_optimizer_state_drops_the_rounding_generator():
    """Why the trainer saves the rounding generator through Engine's Optimizers.extra_state(): DCP's
    layout-independent optimizer state dict keeps only torch's "state" and "param_groups"."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = tiny_model(torch.bfloat16)
    opt = build_optimizer(model, OptimConfig(name="muon", param_dtype="bf16"), device_type="cpu")
    train_steps(model, opt, batches(1), 1e-2)
    assert "rounding_rng" in opt.state_dict()  # the torch.save path carries it
    assert set(get_optimizer_state_dict(model, opt)) == {"state", "param_groups"}


# ---- Muon -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 16), (16, 48)])
def test_newton_schulz_approximates_the_orthogonal_factor(shape, dtype):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g, steps=5, dtype=dtype)
    assert o.dtype == torch.float32 and o.shape == g.shape
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    sv = torch.linalg.svdvals(o)
    # the quintic iteration trades exactness for speed: singular values land in ~[0.7, 1.2], not at 1
    assert sv.min() > 0.5 and sv.max() < 1.3
    polar = u @ vh
    cos = (o * polar).sum() / (o.norm() * polar.norm())
    assert cos > 0.95  # same direction as the exact U V^T


def test_muon_param_groups_send_embedding_head_norms_to_adamw():
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                    tie_embeddings=False), seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, decay, no_decay = muon_param_groups(model, OptimConfig(name="muon"))
    assert {names[id(p)] for p in muon["params"]} == {
        f"layers.0.{m}.weight" for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up",
                                         "mlp.w_down")}
    assert {names[id(p)] for p in decay["params"]} == {"head.weight"}
    assert "tok_emb.weight" in {names[id(p)] for p in no_decay["params"]}
    assert muon["use_muon"] and not decay["use_muon"] and no_decay["weight_decay"] == 0.0


def test_newton_schulz_stack_equals_one_by_one():
    """The optimizer orthogonalises matrices of one shape as one batch: each result is the lone matrix's."""
    g = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(1))
    stacked = newton_schulz(g)
    for i in range(3):
        torch.testing.assert_close(stacked[i], newton_schulz(g[i]), rtol=0, atol=1e-6)
    tall = newton_schulz(g.mT)  # tall matrices iterate on their transpose
    torch.testing.assert_close(tall, stacked.mT, rtol=0, atol=1e-6)


@pytest.mark.parametrize("autocast, want", [(None, None), (torch.bfloat16, torch.bfloat16)])
def test_muon_iterates_in_bf16_only_when_the_run_autocasts_to_bf16(autocast, want):
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64),
                        seed=0)
    opt = build_optimizer(model, OptimConfig(name="muon"), device_type="cpu", autocast_dtype=autocast)
    assert opt.ns_dtype == want


def test_muon_embedding_steps_at_its_own_lr_ratio():
    """optim.embed_lr_ratio: an untied input embedding gets its own AdamW group at lr x ratio; the first
    AdamW step moves every weight by lr (sign of the gradient), so the embedding moves by lr x ratio."""
    mcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                       tie_embeddings=False)
    model = build_model(mcfg, seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = muon_param_groups(model, OptimConfig(name="muon", embed_lr_ratio=4.0))
    embed = next(g for g in groups if g["name"] == "embed")
    assert [names[id(p)] for p in embed["params"]] == ["tok_emb.weight"] and embed["lr_ratio"] == 4.0
    assert all("tok_emb.weight" not in {names[id(p)] for p in g["params"]} for g in groups if g is not embed)
    # tied: the embedding is the head too, so it keeps the shared group; the default adds no group
    tied = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                   tie_embeddings=True), seed=0)
    assert "embed" not in {g["name"] for g in muon_param_groups(tied, OptimConfig(name="muon", embed_lr_ratio=4.0),
                                                                tied=True)}
    tied_opt = build_optimizer(tied, OptimConfig(name="muon", embed_lr_ratio=4.0), device_type="cpu")
    assert "embed" not in {g["name"] for g in tied_opt.param_groups}  # the Transformer's own tie_embeddings
    assert "embed" not in {g["name"] for g in muon_param_groups(model, OptimConfig(name="muon"))}

    opt = build_optimizer(model, OptimConfig(name="muon", embed_lr_ratio=4.0, weight_decay=0.0), device_type="cpu")
    for g in opt.param_groups:
        g["lr"] = 1e-3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.arange(16)[None]
    model(ids).float().pow(2).mean().backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}
    # the rows of the ids seen; |update| = lr x ratio after one Adam step, but where |grad| is near eps
    assert moved["tok_emb.weight"][:16].median().item() == pytest.approx(4e-3, rel=1e-4)
    assert moved["head.weight"].median().item() == pytest.approx(1e-3, rel=1e-4)


def test_muon_first_step_closed_form_with_lr_ratio():
    # Step 1 with Nesterov: B = G, U = G + mu G, W1 = W0 (1 - lr wd) - lr ratio 0.2 sqrt(max dim) NS(U)
    g = torch.Generator().manual_seed(0)
    w0, grad = torch.randn(8, 20, generator=g), torch.randn(8, 20, generator=g)
    w = nn.Parameter(w0.clone())
    opt = Muon([{"params": [w], "use_muon": True, "lr_ratio": 3.0}], lr=1.0, momentum=0.9, weight_decay=0.1)
    opt.param_groups[0]["lr"] = 0.01  # the trainer writes the schedule's LR; the ratio stays with the group
    w.grad = grad.clone()
    opt.step()
    expected = w0 * (1 - 0.03 * 0.1) - 0.03 * 0.2 * math.sqrt(20) * newton_schulz(grad * 1.9)
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert torch.equal(w.grad, grad)  # the optimizer never writes into .grad


@pytest.mark.parametrize("fused", [True, False])
def test_muon_adamw_part_matches_torch_adamw(fused):
    """Plain fp32 tensors take torch's fused kernel (bitwise torch's fused AdamW); the per-tensor path
    (bf16 parameters, DTensors: forced here with a bf16 bystander in the group) matches torch's loop."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, generator=g)
    grads = [torch.randn(5, 3, generator=g) for _ in range(4)]
    a, b = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    group = [a] if fused else [a, nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    ours = Muon([{"params": group, "use_muon": False}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=fused,
                            foreach=False if not fused else None)
    for grad in grads:
        a.grad, b.grad = grad.clone(), grad.clone()
        if not fused:
            group[1].grad = torch.ones(2, dtype=torch.bfloat16)
        ours.step()
        ref.step()
    if fused:
        assert torch.equal(a, b)
    else:
        assert torch.allclose(a, b, rtol=0, atol=1e-7)
        assert not torch.equal(a, p0)
    assert ours.state[a]["step"].item() == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muon_reduces_loss_and_resumes_exactly(dtype):
    cfg = OptimConfig(name="muon", weight_decay=0.1, muon_lr_ratio=2.0,
                      param_dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    losses = assert_resume_is_exact(cfg, dtype, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0]


def _dist_worker(out: str) -> None:
    """Under torchrun (2 gloo ranks): FSDP2-sharded MLP with Muon vs the same MLP in one process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    def make() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 7), nn.Tanh(), nn.Linear(7, 5))  # 7 rows: uneven shards
        return model

    def opt_for(model: nn.Module) -> Muon:
        mats = [p for p in model.parameters() if p.ndim == 2]
        vecs = [p for p in model.parameters() if p.ndim == 1]
        return Muon([{"params": mats, "use_muon": True}, {"params": vecs, "use_muon": False}],
                    lr=0.02, weight_decay=0.1)

    ref, sharded = make(), make()
    fully_shard(sharded, mesh=mesh)
    ref_opt, opt = opt_for(ref), opt_for(sharded)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 5, generator=g)
    half = slice(rank * 4, rank * 4 + 4)
    for _ in range(3):
        F.mse_loss(ref(x), y).backward()  # full batch in one process
        ref_opt.step()
        ref_opt.zero_grad()
        F.mse_loss(sharded(x[half]), y[half]).backward()  # FSDP2 averages the two halves' gradients
        opt.step()
        opt.zero_grad()
    diffs = [(a.full_tensor() - b).abs().max().item() for a, b in zip(sharded.parameters(), ref.parameters())]
    w = sharded[0].weight
    buf = opt.state[w]["momentum_buffer"]
    info = {"max_diff": max(diffs), "is_dtensor": isinstance(w, DTensor) and isinstance(buf, DTensor),
            "placements": [str(pl) for pl in w.placements], "local_rows": w.to_local().shape[0],
            "shard0": list(w.placements) == [Shard(0)]}
    if rank == 0:
        Path(out).write_text(json.dumps(info))
    dist.destroy_process_group()


@pytest.mark.dist
def test_muon_on_fsdp2_dtensor_matches_single_process(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out.read_text())
    assert info["is_dtensor"] and info["shard0"] and info["local_rows"] == 4  # rank 0 holds 4 of 7 rows
    assert info["max_diff"] < 1e-6, info


# ---- 8-bit AdamW ----------------------------------------------------------------------------------


def test_adamw8bit_without_torchao_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(ConfigError, match=r"optim.name=adamw8bit needs torchao: pip install") as e:
        build_optimizer(nn.Linear(4, 4), OptimConfig(name="adamw8bit"), device_type="cpu")
    assert "\n" not in str(e.value)


def test_adamw8bit_on_unsupported_device_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optim.name=adamw8bit: .* no kernels for device 'mps'; use optim.name=adamw"):
        build_optimizer(nn.Linear(4, 4), OptimConfig(name="adamw8bit"), device_type="mps")


@needs_inductor_cpu
@pytest.mark.filterwarnings("ignore:OptimState8bit does not implement")
def test_adamw8bit_reduces_loss_on_cpu():
    pytest.importorskip("torchao")
    from torchao.optim.subclass_8bit import OptimState8bit

    g = torch.Generator().manual_seed(0)
    model = nn.Linear(64, 64, bias=False)  # 4096 weights: torchao quantises >= 4096 elements
    x = torch.randn(32, 64, generator=g)
    y = x @ torch.randn(64, 64, generator=g) * 0.1
    opt = build_optimizer(model, OptimConfig(name="adamw8bit", weight_decay=0.0), device_type="cpu")
    losses = []
    for _ in range(20):
        for group in opt.param_groups:
            group["lr"] = 1e-2  # a float, as the trainer writes it
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert isinstance(opt.state[model.weight]["exp_avg"], OptimState8bit)
    assert losses[-1] < 0.5 * losses[0]


if __name__ == "__main__":
    _dist_worker(sys.argv[1])
