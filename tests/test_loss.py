"""The chunked linear + cross-entropy against F.cross_entropy on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.config import ModelConfig
from kiln.data.packing import Batch
from kiln.errors import ConfigError
from kiln.eval.loss import token_loss_sum
from kiln.model import build_model
from kiln.model.loss import _liger_loss, linear_cross_entropy, shared_rows


def _inputs(N=300, d=24, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).requires_grad_()
    w = (0.3 * torch.randn(V, d, generator=g)).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = -100  # ignored targets (document boundaries)
    return h, w, y


def _loss_and_grads(impl, h, w, y, **kw):
    h.grad = w.grad = None
    loss = linear_cross_entropy(h, w, y, impl=impl, **kw)
    (loss / 123.0).backward()  # a scaled loss, as the trainer divides by the token count
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk_rows", [64, 77, 300, 1000])
def test_chunked_matches_full_logits(chunk_rows):
    h, w, y = _inputs()
    ref = F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100, reduction="sum")
    ref_h, ref_w = torch.autograd.grad(ref / 123.0, (h, w))
    loss, gh, gw = _loss_and_grads("chunked", h, w, y, chunk_rows=chunk_rows)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gh, ref_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, ref_w, rtol=1e-5, atol=1e-7)
    # the plain path is the same reference through kiln's API
    lp, ph, pw = _loss_and_grads("plain", h, w, y)
    assert torch.equal(lp, ref.detach()) and torch.equal(ph, ref_h)


def _with_equal_rows(seed=0, first_shared=200):
    """_inputs with rows first_shared.. of the head all equal to one vector, and one target among them."""
    h, w, y = _inputs(seed=seed)
    with torch.no_grad():
        w[first_shared:] = w[first_shared]
    y = y % first_shared  # targets among the rows of their own ...
    y[::7] = -100
    y[5] = 900  # ... and one inside the group: its row must get its own gradient
    return h, w, y


@pytest.mark.parametrize("autocast", [False, True])
def test_shared_rows_match_the_full_head(autocast):
    h, w, y = _with_equal_rows()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, gh, gw = _loss_and_grads("chunked", h, w, y, chunk_rows=64)
        loss_s, gh_s, gw_s = _loss_and_grads("chunked", h, w, y, chunk_rows=64, share_rows=True)
    group = shared_rows(w.detach(), y)
    assert group.size == 799 and group.own.numel() == 201 and 900 in group.own.tolist()
    tol = dict(rtol=0.02, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_s, loss, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(gh_s, gh, **tol)
    torch.testing.assert_close(gw_s, gw, **tol)
    # the group's rows have small gradients (~4e-4 here): compared on their own scale, each gets 1/M of u's
    in_group = torch.arange(1000) >= 200
    in_group[900] = False
    torch.testing.assert_close(gw_s[in_group], gw[in_group], rtol=0.05 if autocast else 1e-5, atol=1e-6 if autocast else 0.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # evaluation, targets
        full = linear_cross_entropy(h, w, y, impl="chunked", chunk_rows=64)  # inside the group included
        shared = linear_cross_entropy(h, w, y, impl="chunked", chunk_rows=64, share_rows=True)
    torch.testing.assert_close(shared, full, rtol=1e-6, atol=1e-3)
    # every row of the group got the same gradient, so an elementwise optimizer keeps them equal
    rows = gw_s[200:][torch.arange(200, 1000) != 900]
    assert torch.equal(rows, rows[:1].expand_as(rows))


@pytest.mark.parametrize("autocast", [False, True])
def test_unseen_smoothing_is_the_gradient_of_label_smoothing_onto_the_group(autocast):
    """The smoothed gradient against autograd on full logits of (1 - eps) CE + eps * mean over the group's rows of
    their CE; the returned value stays the plain cross-entropy, and the group's rows still get one gradient."""
    eps = 0.05
    h, w, y = _with_equal_rows()
    members = torch.arange(1000) >= 200
    members[900] = False  # a target: its row has left the group
    z = (h @ w.t()).float()
    lse, valid = torch.logsumexp(z, -1), y != -100
    ce = lse - z.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
    smoothed = ((1 - eps) * ce + eps * (lse[:, None] - z[:, members]).mean(1))[valid].sum()
    ref_h, ref_w = torch.autograd.grad(smoothed / 123.0, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, gh, gw = _loss_and_grads("chunked", h, w, y, chunk_rows=64, share_rows=True, unseen_smoothing=eps)
        plain = linear_cross_entropy(h, w, y, impl="chunked", chunk_rows=64, share_rows=True)
    torch.testing.assert_close(loss, ce[valid].sum().detach(), rtol=1e-3 if autocast else 1e-6, atol=1e-3)
    assert torch.equal(loss, plain.detach())  # the value is the plain cross-entropy, smoothing or not
    tol = dict(rtol=0.02, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, ref_h, **tol)
    torch.testing.assert_close(gw, ref_w, **tol)
    rows = gw[members]
    assert torch.equal(rows, rows[:1].expand_as(rows))
    if not autocast:  # the group gets eps of every valid target's mass: its rows' gradients move by -eps * sum of h
        _, _, gw_plain = _loss_and_grads("chunked", h, w, y, chunk_rows=64, share_rows=True)
        torch.testing.assert_close((gw - gw_plain)[members].sum(0), -eps * h.detach()[valid].sum(0) / 123.0,
                                   rtol=1e-4, atol=1e-6)


def test_unseen_smoothing_needs_the_group():
    h, w, y = _with_equal_rows()
    for kw in (dict(impl="chunked"), dict(impl="plain", share_rows=True), dict(impl="liger", share_rows=True)):
        with pytest.raises(ConfigError, match="train.unseen_smoothing needs the chunked loss"):
            linear_cross_entropy(h, w, y, unseen_smoothing=0.1, **kw)
    # a model whose loss runs on whole logits (tensor parallelism turns the fused loss off) refuses it too
    model = build_model(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                                    max_seq_len=8, tie_embeddings=False, init_zero_out=True))
    model.fused_loss = False
    tokens = torch.randint(0, 64, (1, 8))
    with pytest.raises(ConfigError, match="train.unseen_smoothing needs the fused loss"):
        model(tokens, targets=tokens, unseen_smoothing=0.1)
    # no two equal rows left: nothing to smooth onto, the plain gradient
    h, w, y = _inputs()
    assert all(torch.equal(a, b) for a, b in zip(
        _loss_and_grads("chunked", h, w, y, chunk_rows=64, share_rows=True, unseen_smoothing=0.1),
        _loss_and_grads("chunked", h, w, y, chunk_rows=64)))


def test_shared_rows_are_found_under_autocast():
    # rows a hair away from the group's vector: bf16 bucket keys (autocast's matmul) would put them in the group's
    # bucket, ahead of it; the search must run in fp32
    w = torch.full((1000, 24), 0.5)
    w[:200] += 1e-4 * torch.randn(200, 24, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        group = shared_rows(w, torch.tensor([3, -100]))
    assert group.size == 800 and group.own.tolist() == list(range(200))


def test_shared_rows_need_two_equal_rows_outside_the_targets():
    h, w, y = _inputs()
    assert shared_rows(w.detach(), y) is None  # all rows differ
    with torch.no_grad():
        w[10] = w[11]
    assert shared_rows(w.detach(), y[(y != 10) & (y != 11)]).size == 2
    assert shared_rows(w.detach(), torch.tensor([10])) is None  # one row left once a target takes the other
    loss, gh, gw = _loss_and_grads("chunked", h, w, y, chunk_rows=64)
    assert all(torch.equal(a, b) for a, b in zip(_loss_and_grads("chunked", h, w, y, chunk_rows=64, share_rows=True),
                                                  (loss, gh, gw)))  # no group: the plain chunked path


def test_chunked_is_deterministic_and_no_grad_agrees():
    h, w, y = _inputs(seed=3)
    a = _loss_and_grads("chunked", h, w, y, chunk_rows=50)
    b = _loss_and_grads("chunked", h, w, y, chunk_rows=50)
    assert all(torch.equal(x, z) for x, z in zip(a, b))  # bit for bit, run to run (resume tests rely on it)
    with torch.no_grad():
        evaluated = linear_cross_entropy(h, w, y, impl="chunked", chunk_rows=50)
    torch.testing.assert_close(evaluated, a[0], rtol=1e-6, atol=1e-4)


def test_all_targets_ignored_gives_zero():
    h, w, y = _inputs(N=40)
    loss, gh, gw = _loss_and_grads("chunked", h, w, torch.full_like(y, -100), chunk_rows=16)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_bf16_autocast_close_to_plain():
    h, w, y = _inputs(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_c, gh_c, gw_c = _loss_and_grads("chunked", h, w, y, chunk_rows=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_p, gh_p, gw_p = _loss_and_grads("plain", h, w, y)
    assert gh_c.dtype == h.dtype and gw_c.dtype == w.dtype
    torch.testing.assert_close(loss_c, loss_p, rtol=2e-3, atol=0.5)
    torch.testing.assert_close(gw_c, gw_p, rtol=0.05, atol=2e-3)
    torch.testing.assert_close(gh_c, gh_p, rtol=0.05, atol=2e-3)


def test_never_materialises_the_full_logits():
    from torch.distributed._tools.mem_tracker import MemTracker

    N, d, V = 1024, 16, 8192  # full fp32 logits: 32 MiB; one 128-row chunk of them: 4 MiB
    h, w, y = _inputs(N=N, d=d, V=V)

    def peak(impl):
        tracker = MemTracker()
        with tracker:
            linear_cross_entropy(h, w, y, impl=impl, chunk_rows=128).backward()
        h.grad = w.grad = None
        return sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())

    full_logits = N * V * 4
    assert peak("plain") > 2 * full_logits  # logits, log-softmax and their gradient
    assert peak("chunked") < full_logits / 2


def test_token_loss_sum_on_the_model_matches_plain():
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    tok = torch.randint(0, 300, (3, 20))
    tgt = torch.randint(0, 300, (3, 20))
    tgt[:, 5] = -100
    doc = (torch.arange(20) >= 6).int().expand(3, 20)
    batch = Batch(tokens=tok, targets=tgt, doc_ids=doc)
    grads = {}
    for impl in ("plain", "chunked"):
        model = build_model(cfg, seed=1)
        loss = token_loss_sum(model, batch, doc_mask=True, impl=impl)
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["chunked"][0], grads["plain"][0], rtol=1e-6, atol=1e-4)
    for n, g in grads["plain"][1].items():
        torch.testing.assert_close(grads["chunked"][1][n], g, rtol=1e-5, atol=1e-6)


def test_liger_without_the_package_is_a_clear_error():
    if _liger_loss() is not None:
        pytest.skip("liger-kernel is installed")
    h, w, y = _inputs(N=8)
    with pytest.raises(ConfigError, match="liger"):
        linear_cross_entropy(h, w, y, impl="liger")


def test_no_rows_at_all_gives_zero_with_gradients():
    """N = 0 rows (an empty micro-batch): a zero loss and zero gradients, not a range() error."""
    h, w, _ = _inputs(N=8)
    h0 = h[:0].detach().requires_grad_()
    loss = linear_cross_entropy(h0, w, torch.zeros(0, dtype=torch.long), impl="chunked", chunk_rows=16)
    loss.backward()
    assert loss.item() == 0.0 and not w.grad.any()


def test_evaluate_uses_the_given_loss_impl():
    from kiln.eval.loss import evaluate

    if _liger_loss() is not None:
        pytest.skip("liger-kernel is installed")
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    model = build_model(cfg, seed=1)
    batch = Batch(tokens=torch.randint(0, 300, (2, 8)), targets=torch.randint(0, 300, (2, 8)),
                  doc_ids=torch.zeros(2, 8, dtype=torch.int32))
    plain = evaluate(model, [batch], device=torch.device("cpu"), doc_mask=False, impl="plain")
    assert plain["loss"] == pytest.approx(evaluate(model, [batch], device=torch.device("cpu"), doc_mask=False)["loss"],
                                          rel=1e-5)
    with pytest.raises(ConfigError, match="liger"):  # train.loss_impl=liger reaches the loss
        evaluate(model, [batch], device=torch.device("cpu"), doc_mask=False, impl="liger")


def _plain_token_logps(model, tok, tgt, temperature=1.0):
    logits = model(tok).float() / temperature  # (N, T, V)
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(tgt != -100, lp, 0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_matches_full_logits_with_gradients(temperature):
    from kiln.eval.loss import token_logps

    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    tok = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    tgt[:, :6] = -100
    tgt[2, 15:] = -100
    weights = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))  # per-token weights, as RLVR's
    got, want = {}, {}
    for out, fn in ((got, lambda m: token_logps(m, tok, tgt, temperature=temperature, chunk_rows=7)),
                    (want, lambda m: _plain_token_logps(m, tok, tgt, temperature))):
        model = build_model(cfg, seed=1)
        lp = fn(model)
        (lp * weights).sum().backward()
        out["lp"], out["grads"] = lp.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(got["lp"], want["lp"], rtol=1e-5, atol=1e-5)
    assert (got["lp"][tgt == -100] == 0).all()
    for n, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-6)


def test_token_logps_runs_the_head_on_target_rows_in_chunks_only():
    """The head sees at most chunk_rows rows at a time and only positions with a target, so the
    (N*T, V) logits never exist; with gradients, backward recomputes each chunk."""
    from kiln.eval.loss import token_logps

    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    model = build_model(cfg, seed=1)
    seen = []
    head = model.logits
    model.logits = lambda h: seen.append(h.shape[0]) or head(h)
    tok = torch.randint(0, 300, (4, 30))
    tgt = torch.full((4, 30), -100)
    tgt[:, 20:] = torch.randint(0, 300, (4, 10))  # 40 target positions of 120
    with torch.no_grad():
        lp, greedy = token_logps(model, tok, tgt, chunk_rows=16, greedy=True)
    assert seen == [16, 16, 8]  # 40 rows: one head call per chunk gives log-probs and argmax
    assert greedy[:, :20].all()  # ignored positions count as greedy
    seen.clear()
    token_logps(model, tok, tgt, chunk_rows=16).sum().backward()
    assert sorted(seen) == [8, 8, 16, 16, 16, 16]  # forward, then the recomputation in backward


def _train_demo_head(cfg, batches, *, share: bool):
    """One optimizer step of `cfg` per batch through the Engine (as the trainer takes them, clipping included):
    the per-token losses, the weights and the model."""
    from kiln.device import autocast_for
    from kiln.parallel.mesh import init_layout
    from kiln.train.engine import Engine
    from kiln.train.objective import Objective, RunSettings

    objective = Objective()
    objective.configure(RunSettings.of(cfg))
    engine = Engine(model=cfg.model, optim=cfg.optim, train=cfg.train, parallel=cfg.parallel,
                    doc_mask=cfg.data.doc_mask, layout=init_layout(cfg.parallel, cfg.model, "cpu"),
                    objective=objective, seed=0, accum_steps=1)
    engine.model.share_head_rows = share
    assert torch.equal(engine.model.head.weight, torch.zeros_like(engine.model.head.weight))
    losses = []
    for b in batches:
        loss_sum, count, _ = engine.forward_backward([b], autocast_for("fp32", torch.device("cpu")))
        engine.clip_grad_norm(1.0)
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) / count)
    return losses, {n: p.detach().clone() for n, p in engine.model.named_parameters()}, engine.model


_SMALL_DEMO = ["--model.vocab_size", "2000", "--model.n_layers", "1", "--train.micro_batch_size", "2",
               "--train.global_batch_size", "2", "--train.seq_len", "32", "--train.dtype", "fp32"]


def test_training_with_shared_rows_matches_the_full_head():
    """Five real optimizer steps (Muon + AdamW groups, clipping) of a zero-initialised untied head, with the
    shared-rows loss and with the full head: the same losses and weights, and the never-targeted rows stay one
    vector (so the next step finds them again)."""
    from kiln.bench import synthetic_batches
    from kiln.config import load_config

    cfg = load_config("demo", [*_SMALL_DEMO, "--train.unseen_smoothing", "0"])
    batches = synthetic_batches(cfg, 5, seed=0)  # random ids: each step targets ids no earlier step did
    (full, w_full, _), (shared, w_shared, _) = (_train_demo_head(cfg, batches, share=s) for s in (False, True))
    assert shared == pytest.approx(full, rel=1e-5)
    for n, p in w_full.items():
        # not entry by entry: Adam divides by sqrt(v), so where a gradient is ~0 (the first steps behind a zero wo)
        # float-order differences move an entry by up to the lr
        assert (w_shared[n] - p).norm() < 1e-3 * p.norm(), n
    targeted = torch.cat([b.targets.flatten() for b in batches])
    group = shared_rows(w_shared["head.weight"])
    never = torch.ones(2000, dtype=torch.bool)
    never[targeted[targeted != -100]] = False
    assert group.size == int(never.sum()) > 1000 and group.own.tolist() == (~never).nonzero().squeeze(1).tolist()
    assert w_shared["head.weight"][group.rep].abs().sum() > 0  # the group has trained away from zero as one row


def test_training_with_unseen_smoothing_keeps_the_group_and_its_mass():
    """train.unseen_smoothing through the Engine: the never-targeted rows stay one vector (the sharing stays
    exact), and the model gives them more of its mass than the same steps without smoothing."""
    from kiln.bench import synthetic_batches
    from kiln.config import load_config

    runs = {}
    for eps in (0.0, 0.2):
        cfg = load_config("demo", [*_SMALL_DEMO, "--train.unseen_smoothing", str(eps)])
        # one batch again and again: the plain loss learns that the group's ids never come (its mass 0.13 after
        # 20 steps), the smoothed one keeps eps = 0.2 for them in sight (0.29)
        batches = synthetic_batches(cfg, 1, seed=0) * 20
        losses, weights, model = _train_demo_head(cfg, batches, share=True)
        group = shared_rows(weights["head.weight"])
        targeted = torch.cat([b.targets.flatten() for b in batches])
        assert group.size == 2000 - targeted[targeted != -100].unique().numel()
        with torch.no_grad():  # the group's share of the softmax at the last batch's positions
            p = torch.softmax(model(batches[-1].tokens, batches[-1].doc_ids).float(), -1)
        runs[eps] = losses, float(p[..., group.column == group.own.numel()].sum(-1).mean())
    (plain_losses, plain_mass), (smooth_losses, smooth_mass) = runs[0.0], runs[0.2]
    assert plain_losses[0] == smooth_losses[0]  # the first loss is the same model's plain cross-entropy
    assert smooth_mass > plain_mass + 0.1
