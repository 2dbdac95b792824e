"""LR schedules against closed-form values (cosine, WSD, InfiniteLR), LR scaling, the schedule summary,
parameter groups and the optimizer config."""

from __future__ import annotations

import math
import re

import pytest

from kiln.config import ModelConfig, OptimConfig, load_config
from kiln.errors import ConfigError
from kiln.model import build_model
from kiln.optim import describe_schedule, infinite_phases, lr_factor, param_groups, scaled_lr


def f(step, total, **kw):
    return lr_factor(step, total_steps=total, cfg=OptimConfig(**kw))


def test_warmup_is_linear_to_the_peak():
    assert [f(s, 100, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_closed_form():
    # 111 steps run: 0..110. Warmup 0..9, then the cosine from step 10 (peak) to step 110 (the floor)
    kw = dict(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    for s in (10, 35, 60, 85, 110):
        progress = (s - 10) / 100
        assert f(s, 111, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)), abs=1e-12)
    assert f(10, 111, **kw) == pytest.approx(1.0) and f(60, 111, **kw) == pytest.approx(0.55)
    assert f(110, 111, **kw) == pytest.approx(0.1, abs=1e-12)  # the last step that runs is at the floor


@pytest.mark.parametrize("shape, mid", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_closed_form(shape, mid):
    # 101 steps: 0..100; the decay is the last round(0.2 x 101) = 20 steps, 81..100
    kw = dict(schedule="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape=shape, min_lr_ratio=0.0)
    assert all(f(s, 101, **kw) == 1.0 for s in range(10, 82))  # stable phase (step 81: progress 0)
    assert f(81 + 19 / 2, 101, **kw) == pytest.approx(mid)  # halfway through the decay
    assert f(100, 101, **kw) == pytest.approx(0.0, abs=1e-12)  # the last step that runs


@pytest.mark.parametrize("kw", [
    dict(schedule="cosine", warmup_steps=7, min_lr_ratio=0.1),
    dict(schedule="wsd", warmup_steps=7, decay_fraction=0.3, min_lr_ratio=0.05),
    dict(schedule="wsd", warmup_steps=7, decay_fraction=0.3, decay_shape="1-sqrt", min_lr_ratio=0.0),
    dict(schedule="infinite", warmup_steps=7, min_cooldown_tokens=0, anneal_steps=9, min_lr_ratio=0.2),
])
@pytest.mark.parametrize("total", [20, 37])
def test_decays_end_exactly_at_the_last_step_run(kw, total):
    """The trainer runs steps 0..total-1: the last one gets min_lr_ratio, and the curve never goes up."""
    factors = [lr_factor(s, total_steps=total, cfg=OptimConfig(**kw), tokens_per_step=1) for s in range(total)]
    assert factors[-1] == pytest.approx(kw["min_lr_ratio"], abs=1e-12)
    assert factors[-2] > kw["min_lr_ratio"] + 1e-6
    assert all(a >= b for a, b in zip(factors[7:], factors[8:]))


@pytest.mark.parametrize("kw, total", [
    (dict(schedule="wsd", warmup_steps=5, decay_fraction=0.01), 20),  # round(0.2) steps: one decay step
    (dict(schedule="cosine", warmup_steps=100), 101),  # the warmup leaves one step
    (dict(schedule="infinite", warmup_steps=5, min_cooldown_tokens=0, anneal_steps=1), 20),
])
def test_a_decay_of_one_step_ends_the_run_at_the_floor(kw, total):
    """A decay that gets only the last step stayed at the peak (its progress was 0 there), while the plan said
    "decay steps 19-19 to 0.1 x peak". That step is the decay's end: the floor."""
    cfg = OptimConfig(**kw)
    assert lr_factor(total - 1, total_steps=total, cfg=cfg, tokens_per_step=1) == pytest.approx(0.1)
    assert lr_factor(total - 2, total_steps=total, cfg=cfg, tokens_per_step=1) > 0.5
    assert f"100% (step {total - 1}) 3e-05 (10.00%)" in "\n".join(describe_schedule(total, cfg, 1))


def test_constant_and_tiny_runs():
    assert f(50, 100, schedule="constant", warmup_steps=0) == 1.0
    assert f(0, 1, warmup_steps=100) > 0  # warmup longer than the run still gives a usable LR
    for cfg in (OptimConfig(warmup_steps=0), OptimConfig(schedule="wsd", warmup_steps=0)):  # one step: the peak
        assert lr_factor(0, total_steps=1, cfg=cfg) == 1.0 and "decay" not in "".join(describe_schedule(1, cfg))
    cut = OptimConfig(warmup_steps=30)  # `tiny` for 20 steps: the warmup is cut to the run and it ends at the peak
    assert [lr_factor(s, total_steps=20, cfg=cut) for s in (18, 19)] == [1.0, 1.0]


def test_no_decay_on_norms_and_embeddings():
    model = build_model(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                    qk_norm=True), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "tok_emb.weight", "layers.0.attn_norm.weight", "layers.0.mlp_norm.weight", "norm.weight",
        "layers.0.attn.q_norm.weight", "layers.0.attn.k_norm.weight"}
    assert all(p.ndim == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---- InfiniteLR (the forgather guide) ------------------------------------------------------------------------


def inf(step, total, tokens_per_step=None, **kw):
    kw = {"schedule": "infinite", "constant_lr_ratio": 0.5, "cooldown_ratio": 0.7, "min_cooldown_tokens": 0,
          **kw}
    return lr_factor(step, total_steps=total, cfg=OptimConfig(**kw), tokens_per_step=tokens_per_step)


def test_infinite_closed_form_ratio_cooldown():
    # warmup 10, cooldown C = 0.7 x 100 = 70 steps (10..80), then constant 0.5
    assert [inf(s, 100, warmup_steps=10) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert inf(10, 100, warmup_steps=10) == 1.0
    assert inf(45, 100, warmup_steps=10) == pytest.approx(0.75)  # halfway through the cosine
    assert inf(27.5, 100, warmup_steps=10) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert inf(80, 100, warmup_steps=10) == pytest.approx(0.5)
    assert all(inf(s, 100, warmup_steps=10) == 0.5 for s in range(80, 100))


def test_infinite_closed_form_token_cooldown():
    # 200k tokens at 1000 tokens/step = 200 steps > 0.7 x 100: the cooldown outlasts the run
    kw = dict(warmup_steps=10, min_cooldown_tokens=200_000)
    assert inf(110, 100, 1000, **kw) == pytest.approx(0.75)  # (110 - 10) / 200 = halfway
    assert inf(99, 100, 1000, **kw) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 89 / 200)))
    with pytest.raises(ValueError, match="tokens_per_step"):
        inf(50, 100, None, **kw)


def test_infinite_anneal_is_geometric_to_the_floor():
    # 100 steps (0..99); the anneal is the last 20 (80..99): progress (step - 80) / 19
    kw = dict(warmup_steps=10, anneal_steps=20, min_lr_ratio=0.1)
    assert inf(79, 100, **kw) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 69 / 70)))  # cooling
    assert inf(80, 100, **kw) == pytest.approx(0.5)  # anneal starts from the constant
    assert inf(90, 100, **kw) == pytest.approx(0.5 * 0.2 ** (10 / 19))
    assert inf(99, 100, **kw) == pytest.approx(0.1, abs=1e-12)  # the last step that runs
    # an anneal that starts mid-cooldown starts from the cooldown's value there: no jump
    kw2 = dict(warmup_steps=10, anneal_steps=20, min_lr_ratio=0.1, cooldown_ratio=1.0)
    start = 0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 70 / 100))
    assert inf(80, 100, **kw2) == pytest.approx(start)
    assert inf(79, 100, **kw2) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 69 / 100)))
    assert inf(89.5, 100, **kw2) == pytest.approx(start * (0.1 / start) ** 0.5)


def test_forgather_claim_3b_tokens():
    """The forgather guide: 3B tokens at 65,536 tokens/step, warmup 500, 100B min_cooldown_tokens, constant 7.5e-6 of
    max 1.4e-5: the cooldown is 1.53M steps (1.22M at 81,920 tokens/step) and the LR stays >= 99.6% of max."""
    cfg = OptimConfig(schedule="infinite", warmup_steps=500, constant_lr_ratio=7.5e-6 / 1.4e-5)
    total = 3_000_000_000 // 65536  # 45,776 steps
    ph = infinite_phases(total, cfg, 65536)
    assert ph.cooldown_from_tokens and ph.cooldown_steps == pytest.approx(1_525_878.9, abs=0.05)
    assert ph.cooldown_end == pytest.approx(500 + 1_525_878.9, abs=0.05)
    assert infinite_phases(total, cfg, 81920).cooldown_steps == pytest.approx(1_220_703.1, abs=0.05)  # "1.22M"
    ratio_only = OptimConfig(schedule="infinite", warmup_steps=500, min_cooldown_tokens=0)
    ph_ratio = infinite_phases(total, ratio_only, None)
    assert not ph_ratio.cooldown_from_tokens and ph_ratio.cooldown_steps == pytest.approx(32_043.2)  # "32K"
    factors = [lr_factor(s, total_steps=total, cfg=cfg, tokens_per_step=65536) for s in range(500, total, 97)]
    last = lr_factor(total - 1, total_steps=total, cfg=cfg, tokens_per_step=65536)
    assert min(factors) >= last >= 0.996
    assert last == pytest.approx(0.99899, abs=1e-5)


def test_infinite_extending_total_tokens_on_resume():
    # The forgather guide, example 6: resume a 1000-step run as a 3000-step run.
    # min_cooldown_tokens dominates (5000 > 0.7 x 3000 steps): every trained step keeps its LR exactly.
    kw = dict(warmup_steps=50, min_cooldown_tokens=5_000_000)
    assert all(inf(s, 1000, 1000, **kw) == inf(s, 3000, 1000, **kw) for s in range(1000))
    # the ratio dominates: the cooldown stretches with the run, so the LR at the resume step rises a bit
    before, after = inf(999, 1000, 1000, warmup_steps=50), inf(999, 3000, 1000, warmup_steps=50)
    assert after > before
    assert before == 0.5 and after == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 949 / 2100)))


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "infinite"])
def test_schedules_are_continuous_after_warmup(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=20, min_cooldown_tokens=0, anneal_steps=30)
    f_ = [lr_factor(s, total_steps=300, cfg=cfg, tokens_per_step=100) for s in range(300)]
    assert max(abs(a - b) for a, b in zip(f_[20:], f_[21:])) < 0.05  # no jumps at phase boundaries


# ---- LR scaling and the schedule summary ----------------------------------------------------------


def test_sqrt_lr_scaling():
    cfg = OptimConfig(lr=1.4e-5, lr_scaling="sqrt")
    assert scaled_lr(cfg, 16) == pytest.approx(5.6e-5)  # the forgather guide: 1.4e-5 x sqrt(16)
    assert scaled_lr(cfg, 20) == pytest.approx(1.4e-5 * math.sqrt(20))
    assert scaled_lr(OptimConfig(lr=1.4e-5), 16) == 1.4e-5  # opt-in only


def test_describe_schedule_reports_the_curve():
    cfg = OptimConfig(schedule="cosine", warmup_steps=100, lr=1e-3)
    lines = describe_schedule(1000, cfg, 4096)
    assert lines[0].startswith("lr schedule cosine: peak 0.001, warmup 100 steps")
    for step in (99, 250, 500, 750, 999):
        f_ = lr_factor(step, total_steps=1000, cfg=cfg)
        assert f"(step {step:,}) {1e-3 * f_:.3g} ({100 * f_:.2f}%)" in lines[-1]
    inf_cfg = OptimConfig(schedule="infinite", warmup_steps=500, lr=1.4e-5, lr_scaling="sqrt")
    text = "\n".join(describe_schedule(45776, inf_cfg, 65536, peak_lr=scaled_lr(inf_cfg, 16)))
    assert "peak 5.6e-05 (base 1.4e-05 x sqrt(global batch) = x4)" in text
    assert "over 1,525,879 steps (min_cooldown_tokens 1e+11 / 65,536 tokens/step)" in text
    assert "past the end of the run" in text and "(step 45,775) 5.59e-05 (99.90%)" in text
    wsd = OptimConfig(schedule="wsd", warmup_steps=30, lr=1e-3, decay_fraction=0.3)
    assert describe_schedule(1000, wsd)[1] == "  stable steps 30-699, linear decay steps 700-999 to 0.1 x peak"
    # a decay that would start inside the warmup leaves no stable phase: not an empty "stable steps 30-24"
    assert describe_schedule(35, wsd)[1] == "  no stable steps, linear decay steps 30-34 to 0.1 x peak"
    # a warmup that ends after the 25% point: the points stay in step order
    steps = [int(x) for x in re.findall(r"\(step ([\d,]+)\)", describe_schedule(40, wsd)[-1].replace(",", ""))]
    assert steps == sorted(steps) and steps[:2] == [10, 20], describe_schedule(40, wsd)[-1]
    # `kiln train tiny --train.max_steps 20`: tiny's 30 warmup steps take the whole run, said with the fix
    # (it printed "warmup 19 steps" and "cosine decay steps 19-19 to 0.1 x peak" beside the note: a decay that
    # never happens, the last step at the peak)
    short = describe_schedule(20, OptimConfig(schedule="cosine", warmup_steps=30, lr=1e-3))
    assert short[0] == "lr schedule cosine: peak 0.001, warmup 19 steps (optim.warmup_steps 30, cut to the run)"
    assert not any("decay steps" in line for line in short) and lr_factor(19, total_steps=20, cfg=OptimConfig(
        schedule="cosine", warmup_steps=30)) == 1.0
    assert short[-1] == ("  note: optim.warmup_steps 30 is not shorter than the run's 20 steps, so the warmup takes the "
                         "whole run and the LR never decays; set --optim.warmup_steps 2 for a decay")
    assert not describe_schedule(1000, wsd)[-1].startswith("  note")


# ---- config ---------------------------------------------------------------------------------------


def test_optim_config_choices_and_errors():
    cfg = load_config("tiny", ["--optim.name", "muon", "--optim.schedule", "infinite", "--optim.lr_scaling", "sqrt",
                               "--optim.min_cooldown_tokens", "2e9", "--optim.adafactor_beta1", "0.9"])
    assert (cfg.optim.name, cfg.optim.schedule, cfg.optim.min_cooldown_tokens) == ("muon", "infinite", 2e9)
    bad = {("--optim.name", "sgd"): "optim.name: expected one of",
           ("--optim.constant_lr_ratio", "1.5"): "optim.constant_lr_ratio: must be within",
           ("--optim.param_dtype", "bf16"): "optim.param_dtype=bf16 needs optim.name=adafactor or muon",
           ("--optim.lr_scaling", "linear"): "optim.lr_scaling: expected one of",
           ("--optim.schedule", "infinite", "--optim.anneal_steps", "10", "--optim.min_lr_ratio", "0.6",
            "--optim.constant_lr_ratio", "0.5"): "optim.min_lr_ratio .0.6. is above optim.constant_lr_ratio",
           ("--optim.name", "adafactor", "--parallel.dp_shard", "2"): "optim.name=adafactor cannot run on sharded",
           ("--optim.name", "adafactor", "--parallel.tp", "2"): "optim.name=adafactor cannot run on sharded"}
    for args, msg in bad.items():
        with pytest.raises(ConfigError, match=msg):
            load_config("tiny", list(args))
