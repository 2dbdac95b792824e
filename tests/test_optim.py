"""LR schedules against closed-form values; parameter groups."""

from __future__ import annotations

import math

import pytest

from kiln.config import ModelConfig, OptimConfig
from kiln.model import build_model
from kiln.optim import lr_factor, param_groups


def f(step, total, **kw):
    return lr_factor(step, total_steps=total, cfg=OptimConfig(**kw))


def test_warmup_is_linear_to_the_peak():
    assert [f(s, 100, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_closed_form():
    kw = dict(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    for s in (10, 35, 60, 85, 110):
        progress = min((s - 10) / 100, 1.0)
        assert f(s, 110, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)), abs=1e-12)
    assert f(10, 110, **kw) == pytest.approx(1.0) and f(110, 110, **kw) == pytest.approx(0.1)
    assert f(60, 110, **kw) == pytest.approx(0.55)


@pytest.mark.parametrize("shape, mid", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_closed_form(shape, mid):
    kw = dict(schedule="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape=shape, min_lr_ratio=0.0)
    assert all(f(s, 100, **kw) == 1.0 for s in range(10, 80))  # stable phase
    assert f(90, 100, **kw) == pytest.approx(mid)  # halfway through the decay
    assert f(100, 100, **kw) == pytest.approx(0.0)


def test_constant_and_tiny_runs():
    assert f(50, 100, schedule="constant", warmup_steps=0) == 1.0
    assert f(0, 1, warmup_steps=100) > 0  # warmup longer than the run still gives a usable LR


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
