"""The memory estimator against what autograd really saves and what a real step really allocates."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from conftest import run_kiln
from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.estimate import default_device, estimate_memory, layer_activation_terms
from kiln.model import build_model
from kiln.parallel.compile_ac import apply_activation_checkpointing
from kiln.parallel.mesh import check_layout


def _cfg(*extra: str):
    return load_config("tiny", ["--model.vocab_size", "512", "--model.d_model", "64", "--model.n_layers", "2",
                                "--model.ffn_dim", "96", "--train.seq_len", "32", "--train.micro_batch_size", "2", "--train.global_batch_size", "2",
                                *extra])


def _saved_bytes(cfg, *, autocast: bool, ac: str = "none") -> int:
    """Bytes of the distinct storages autograd saves in a forward (parameters excluded)."""
    model = apply_activation_checkpointing(build_model(cfg.model, seed=0), ac)
    B, T = cfg.train.micro_batch_size, cfg.train.seq_len
    tok = torch.randint(0, cfg.model.vocab_size, (B, T))
    doc = (torch.arange(T) >= T // 3).long().expand(B, T) if cfg.data.doc_mask else None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.hidden(tok, doc_ids=doc)
    return sum(seen.values())


def _block_weight_copies(cfg) -> int:
    m = cfg.model
    per_layer = 2 * m.d_model * m.hd * (m.n_heads + m.n_kv_heads) + 3 * m.d_model * m.ffn_dim
    return 2 * m.n_layers * per_layer  # bf16 copies made by autocast and saved by the linears


@pytest.mark.parametrize("qk, bf16, doc", list(itertools.product([False, True], repeat=3)))
def test_activations_equal_saved_tensors(qk, bf16, doc):
    cfg = _cfg("--model.qk_norm", str(qk).lower(), "--train.dtype", "bf16" if bf16 else "fp32",
               "--data.doc_mask", str(doc).lower())
    est = estimate_memory(cfg, device="cpu")
    measured = _saved_bytes(cfg, autocast=bf16)
    assert est.activations + (_block_weight_copies(cfg) if bf16 else 0) == measured


def test_full_checkpointing_saves_block_inputs_only():
    cfg = _cfg("--train.activation_checkpointing", "full", "--train.dtype", "fp32")
    est = estimate_memory(cfg, device="cpu")
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    recompute = sum(layer_activation_terms(cfg.model, autocast=False, ac="none").values()) * tokens
    assert est.recompute == recompute
    d, B, T, hd = cfg.model.d_model, cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.hd
    # outside the checkpoints autograd keeps each block's input, the final norm's tensors and the token ids
    hooks = cfg.model.n_layers * 4 * d * tokens + (8 * d + 4) * tokens + 8 * tokens
    assert _saved_bytes(cfg, autocast=False, ac="full") == hooks
    # the document bias and RoPE tables stay alive too (the checkpointed calls hold the mask), unseen by hooks
    assert est.activations - hooks == B * T * T * 4 + 2 * 4 * B * T * (hd // 2)
    none = estimate_memory(cfg, device="cpu", ac="none")
    selective = estimate_memory(cfg, device="cpu", ac="selective")
    assert est.per_layer_per_token < selective.per_layer_per_token < none.per_layer_per_token


def test_params_and_optimizer_states_are_exact():
    cfg = _cfg()
    model = build_model(cfg.model, seed=0)
    from kiln.optim import build_optimizer

    opt = build_optimizer(model, cfg.optim, device_type="cpu")
    model(torch.randint(0, 512, (1, 8)), targets=torch.randint(0, 512, (1, 8))).backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.numel() > 1)
    est = estimate_memory(cfg, device="cpu")
    assert est.params == sum(p.numel() * 4 for p in model.parameters())
    assert est.optimizer == state
    assert est.grads == 0  # no accumulation: gradients are not alive at the end of the forward pass
    accum = estimate_memory(_cfg("--train.global_batch_size", "8"), device="cpu")
    assert accum.grads == est.params


def test_layouts_divide_the_right_terms():
    base = estimate_memory(load_config("dense-180m"), device="cuda")
    fsdp = estimate_memory(load_config("dense-180m", ["--parallel.dp_shard", "4"]), device="cuda")
    tp = estimate_memory(load_config("dense-180m", ["--parallel.tp", "2"]), device="cuda")
    pp = estimate_memory(load_config("dense-180m", ["--parallel.pp", "2"]), device="cuda")
    assert fsdp.params == base.params // 4 and fsdp.optimizer == base.optimizer // 4
    assert fsdp.activations == base.activations  # FSDP shards state, not activations
    assert tp.params < 0.51 * base.params + 4 * 32 * 768 * 4  # matrices halved; norms replicated
    assert tp.activations < 0.51 * base.activations
    assert pp.params < 0.51 * base.params + base.params * 0.12  # half the layers, plus the embedding
    assert base.total > 0.9 * 80 * 2**30 * 0.5  # dense-180m at 16 x 2048 needs ~50 GiB without checkpointing


@pytest.mark.parametrize("ac, dtype", [("none", "fp32"), ("none", "bf16"), ("selective", "fp32"), ("full", "bf16"),
                                       ("full", "fp32")])
def test_estimate_matches_a_measured_cpu_step(ac, dtype):
    """Peak tensor memory of one real optimizer step (torch's MemTracker) on CPU, within 10%."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from kiln.bench import synthetic_batches
    from kiln.eval.loss import token_loss_sum
    from kiln.optim import build_optimizer

    cfg = load_config("tiny", ["--model.vocab_size", "2048", "--model.n_layers", "3", "--train.seq_len", "64",
                               "--train.micro_batch_size", "4", "--train.global_batch_size", "4", "--model.qk_norm",
                               "true", "--train.dtype", dtype, "--train.activation_checkpointing", ac])
    model = apply_activation_checkpointing(build_model(cfg.model, seed=0), ac)
    opt = build_optimizer(model, cfg.optim, device_type="cpu")
    batch = synthetic_batches(cfg, 1)[0]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = token_loss_sum(model, batch, doc_mask=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # optimizer states exist from here on, as in a running job
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    measured = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    est = estimate_memory(cfg, device="cpu").total
    assert abs(est - measured) / measured < 0.10, (est, measured)


def one_step(cfg):
    """(model, optimizer) after one real step, parameters in the optimizer's dtype as the trainer keeps them
    (kiln.train.engine)."""
    from kiln.optim import build_optimizer, param_dtype

    model = build_model(cfg.model, seed=0)
    for p in model.parameters():
        p.data = p.data.to(param_dtype(cfg.optim))
    opt = build_optimizer(model, cfg.optim, device_type="cpu")
    model(torch.randint(0, 512, (1, 8)), targets=torch.randint(0, 512, (1, 8))).backward()
    opt.step()
    return model, opt


def optimizer_state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.numel() > 1)  # per-parameter step counters are scalars


@pytest.mark.parametrize("name, dtype, beta1", [("adamw", "fp32", None), ("adafactor", "fp32", None),
                                                ("adafactor", "bf16", 0.9), ("muon", "fp32", None),
                                                ("muon", "bf16", None)])
@pytest.mark.parametrize("tie", [True, False])
def test_params_and_optimizer_states_match_every_optimizer(name, dtype, beta1, tie):
    """Parameters and optimizer state of a real step, for each optimizer, parameter dtype and tying: Muon's
    AdamW moments and Adafactor's statistics stay fp32 under bf16 parameters; an untied embedding goes to
    Muon's AdamW part."""
    extra = ["--optim.name", name, "--optim.param_dtype", dtype, "--model.tie_embeddings", str(tie).lower()]
    if beta1 is not None:
        extra += ["--optim.adafactor_beta1", str(beta1)]
    cfg = _cfg(*extra)
    model, opt = one_step(cfg)
    est = estimate_memory(cfg, device="cpu")
    assert est.params == sum(p.numel() * p.element_size() for p in model.parameters())
    assert est.optimizer == optimizer_state_bytes(opt)


def test_no_autocast_weight_copies_for_bf16_parameters():
    """Autocast casts fp32 weights to bf16 and the linears save the copies; bf16 weights are used as they
    are. Measured: saved tensors of a forward shaped like a weight matrix (or its transpose) that are not
    the parameters themselves; B x T = 120 rows matches no weight dimension."""
    def weight_copies(cfg) -> int:
        model = build_model(cfg.model, seed=0)
        if cfg.optim.param_dtype == "bf16":
            for p in model.parameters():
                p.data = p.data.bfloat16()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        shapes = {s for p in model.parameters() if p.ndim == 2 for s in (tuple(p.shape), tuple(p.shape)[::-1])}
        seen: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params and tuple(t.shape) in shapes:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model.hidden(torch.randint(0, 512, (3, 40)))
        return sum(seen.values())

    fp32 = _cfg("--train.dtype", "bf16")
    bf16 = _cfg("--train.dtype", "bf16", "--optim.name", "muon", "--optim.param_dtype", "bf16")
    assert weight_copies(fp32) == _block_weight_copies(fp32) > 0
    assert weight_copies(bf16) == 0
    assert estimate_memory(fp32, device="cpu").autocast_copies > 0
    assert estimate_memory(bf16, device="cpu").autocast_copies == 0


def test_fsdp_gathers_bf16_blocks_instead_of_autocast_copies():
    """FSDP2 with bf16 mixed precision and pp=1 all-gathers bf16 weights block by block and frees them:
    no all-layer autocast copies; two blocks (current + prefetch) and the root (embedding/head) in bf16."""
    from kiln.perf import block_matrix_shapes

    m = load_config("dense-180m").model
    block = sum(r * c for r, c in block_matrix_shapes(m))
    emb = m.vocab_size * m.d_model  # tied
    fsdp = estimate_memory(load_config("dense-180m", ["--parallel.dp_shard", "4"]), device="cuda")
    assert fsdp.autocast_copies == 0 and fsdp.parallel_buffers == (2 * block + emb) * 2
    fp32 = estimate_memory(load_config("dense-180m", ["--parallel.dp_shard", "4", "--train.dtype", "fp32"]),
                           device="cpu")  # no autocast
    assert fp32.autocast_copies == 0 and fp32.parallel_buffers == (2 * block + emb) * 4
    # with pipelining FSDP keeps the stage's blocks gathered from forward to backward (no reshard)
    pp = estimate_memory(load_config("dense-180m", ["--parallel.dp_shard", "2", "--parallel.pp", "2"]),
                         device="cuda")
    assert pp.autocast_copies == 2 * (block * m.n_layers // 2 + emb)


def test_the_weights_moving_average_counts_as_state():
    """train.ema_decay keeps an fp32 copy of every weight, bf16 weights included: measured on the real
    WeightEMA, beside the optimizer's state."""
    from kiln.train.ema import WeightEMA

    cfg = _cfg("--optim.name", "muon", "--optim.param_dtype", "bf16", "--train.ema_decay", "0.99")
    model, opt = one_step(cfg)
    ema = WeightEMA([model], decay=cfg.train.ema_decay, tie_embeddings=cfg.model.tie_embeddings)
    average = sum(t.numel() * t.element_size() for t in ema.state_dict().values())
    assert estimate_memory(cfg, device="cpu").optimizer == optimizer_state_bytes(opt) + average


@pytest.mark.parametrize("flag, value", [("--parallel.tp", "3"), ("--parallel.pp", "8")])
def test_a_layout_training_refuses_is_refused_with_trainings_line(flag, value):
    """tiny (4 heads, 4 layers) cannot split over tp=3 or 8 pipeline stages: `kiln estimate` says so in the
    line training prints (at the process count the layout asks for), instead of estimating fractional layers."""
    res = run_kiln("estimate", "tiny", flag, value, capture_output=True, text=True, timeout=120)
    cfg = load_config("tiny", [flag, value])
    with pytest.raises(ConfigError) as training:
        check_layout(cfg.parallel, cfg.model, world_size=int(value))
    assert res.returncode == 2 and res.stdout == "", res.stdout[-2000:]
    assert res.stderr.splitlines() == [f"kiln: error: {training.value}"], res.stderr[-2000:]


@pytest.mark.parametrize("schedule, stages", [("1F1B", 2), ("DualPipeV", 4)])
def test_fewer_pipeline_microbatches_than_stages_is_refused_before_the_process_count(schedule, stages):
    """parallel.pp_microbatches under the schedule's stage count (2 per rank for looped and V schedules) was a
    torch traceback on every rank once the process group was up; it is one line naming the key, the stage count
    and the fix, from the config alone (before the world size is compared: here one process for pp=2)."""
    cfg = load_config("tiny", ["--parallel.pp", "2", "--parallel.pp_schedule", schedule,
                               "--parallel.pp_microbatches", str(stages - 1)])
    with pytest.raises(ConfigError) as e:
        check_layout(cfg.parallel, cfg.model, world_size=1)
    per = "one stage per rank" if stages == 2 else "2 stages per rank"
    assert (f"parallel.pp_microbatches={stages - 1} is fewer than the pipeline's {stages} stages (parallel.pp=2, "
            f"{per} with {schedule})") in str(e.value)
    assert f"set --parallel.pp_microbatches {stages} or more, or 0 (one per stage)" in str(e.value)
    for enough in (0, stages):  # 0: one per stage
        check_layout(dataclasses.replace(cfg.parallel, pp_microbatches=enough), cfg.model, world_size=2)


@pytest.mark.parametrize("schedule, stages", [("GPipe", 2), ("Interleaved1F1B", 4)])
def test_schedules_that_run_fewer_microbatches_than_stages_are_not_refused(schedule, stages):
    """torch refuses it for 1F1B and DualPipeV only; GPipe and the looped schedules train with it."""
    cfg = load_config("tiny", ["--parallel.pp", "2", "--parallel.pp_schedule", schedule,
                               "--parallel.pp_microbatches", str(stages - 1)])
    check_layout(cfg.parallel, cfg.model, world_size=2)


def test_kiln_train_refuses_too_few_pipeline_microbatches_in_one_line(tmp_path, capsys):
    """Through the CLI in one process: the refusal comes before the process count (2 would be needed) is checked."""
    from kiln.cli import main

    code = main(["train", "tiny", "--model.n_layers", "2", "--parallel.pp", "2", "--parallel.pp_microbatches", "1",
                 "--run.out_dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, (out, err)
    assert [ln for ln in err.splitlines() if ln.startswith("kiln: error:")] == [
        "kiln: error: parallel: parallel.pp_microbatches=1 is fewer than the pipeline's 2 stages (parallel.pp=2, "
        "one stage per rank with 1F1B); a pipeline step needs a microbatch for every stage: set "
        "--parallel.pp_microbatches 2 or more, or 0 (one per stage)"], err
    assert not (tmp_path / "run").exists()


def test_the_cli_estimates_for_this_machine_unless_told():
    """`kiln estimate tiny` on a machine without a GPU said "bf16 autocast on cuda" and 2.5x the peak that
    `kiln bench` measures here; it now estimates where the run would train, as doctor and bench measure."""
    here = default_device(load_config("tiny", []))
    for flags, device in (([], here), (["--device", "cuda"], "cuda"), (["--device", "cpu"], "cpu")):
        res = run_kiln("estimate", "tiny", *flags, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        last = json.loads(res.stdout.strip().splitlines()[-1])
        assert last["device"] == device
        assert last["total"] == estimate_memory(load_config("tiny", []), device=device).total
