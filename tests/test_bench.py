"""`kiln bench` and `kiln estimate`: the command-line contract (one JSON line) on a tiny CPU config."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, needs_inductor_cpu, run_kiln
from kiln.bench import run_bench, synthetic_batches
from kiln.config import load_config, split_preset
from kiln.device import train_precision
from kiln.model import count_params
from kiln.perf import flops_per_token
from kiln.runinfo import git_describe

SMALL = ["--model.vocab_size", "1024", "--model.d_model", "64", "--model.n_layers", "2", "--model.ffn_dim", "128",
         "--train.seq_len", "64", "--train.micro_batch_size", "2", "--train.global_batch_size", "4"]


def test_bench_cli_prints_one_json_line():
    res = run_kiln("bench", "tiny", "--steps", "2", "--warmup", "1", *SMALL,
                   "--train.activation_checkpointing", "selective",
                   capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    cfg = load_config("tiny", SMALL)
    assert out["mfu"] is None and out["device"] == "cpu"  # no honest peak for a CPU
    assert out["tokens_per_sec"] == pytest.approx(4 * 64 / (out["step_ms"] / 1000), rel=0.01)
    assert out["flops_per_token"] == flops_per_token(cfg.model, seq_len=64).total
    # n_params is every parameter; the N of 6N (blocks + the head once) is reported as matmul_params
    assert out["n_params"] == count_params(cfg.model) != out["matmul_params"]
    assert out["matmul_params"] == flops_per_token(cfg.model, seq_len=64).matmul_params
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if head.returncode == 0:  # the commit of this checkout (with +dirty when it has changes), else None
        assert out["git_sha"].split("+")[0] == head.stdout.strip()
    else:
        assert out["git_sha"] is None
    # bf16 on CPUs with bf16 matmul instructions
    assert out["precision"] == train_precision("auto", torch.float32, torch.device("cpu"))
    assert out["accumulation"] == 2 and out["activation_checkpointing"] == "selective"
    assert out["peak_memory_bytes"] > 0 and 0.8 < out["estimate_ratio"] < 1.25
    assert 0 < out["loss_last"] < math.log(1024) + 0.5  # near ln(V) after 3 steps on random tokens


def test_bench_in_process_plain_vs_chunked_loss():
    base = load_config("tiny", [*SMALL, "--train.loss_impl", "plain"])
    fused = load_config("tiny", [*SMALL, "--train.loss_impl", "chunked"])
    a = run_bench(base, steps=1, warmup=0)
    b = run_bench(fused, steps=1, warmup=0)
    assert a["loss_last"] == pytest.approx(b["loss_last"], rel=1e-5)  # same model, same batches, same numbers
    assert b["peak_memory_bytes"] < a["peak_memory_bytes"]  # no full logits


def test_synthetic_batches_are_packed_documents():
    cfg = load_config("tiny", SMALL)
    (batch,) = synthetic_batches(cfg, 1)
    assert batch.tokens.shape == batch.targets.shape == batch.doc_ids.shape == (2, 64)
    assert (batch.doc_ids[:, 1:] >= batch.doc_ids[:, :-1]).all()
    boundaries = batch.doc_ids[:, 1:] != batch.doc_ids[:, :-1]
    assert boundaries.any() and (batch.targets[:, :-1][boundaries] == -100).all()


def test_estimate_cli_and_bad_arguments():
    res = run_kiln("estimate", "dense-180m", "--train.activation_checkpointing", "full",
                   capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    parts = ("params", "grads", "optimizer", "activations", "autocast_copies", "parallel_buffers")
    transient = max(last["loss_buffers"], last["head_grad"] + last["recompute"])
    assert last["total"] == sum(last[k] for k in parts) + transient
    assert last["activation_checkpointing"] == "full" and "selective" in res.stdout
    bad = run_kiln("bench", "tiny", "--train.activation_checkpointing", "most",
                   capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "activation_checkpointing" in bad.stderr and "Traceback" not in bad.stderr
    # flex has no CPU backward; with compile on, the error used to surface as a Dynamo traceback
    flex = run_kiln("bench", "tiny", *SMALL, "--model.attention", "flex", "--train.compile", "true",
                    capture_output=True, text=True, timeout=120)
    assert flex.returncode == 2 and "model.attention=flex" in flex.stderr and "Traceback" not in flex.stderr


def _tiny_training_step():
    """A small model's training step (run once, so optimizer state exists) and its live state tensors."""
    from kiln.eval.loss import token_loss_sum
    from kiln.model import build_model
    from kiln.optim import build_optimizer

    cfg = load_config("tiny", SMALL)
    model = build_model(cfg.model, seed=0)
    opt = build_optimizer(model, cfg.optim, device_type="cpu")
    (batch,) = synthetic_batches(cfg, 1)

    def step():
        token_loss_sum(model, batch, doc_mask=True).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    existing = [*model.parameters(), *model.buffers(), *(t for s in opt.state.values() for t in s.values()
                                                         if torch.is_tensor(t))]
    return step, model, opt, existing


def test_peak_tensor_memory_agrees_with_memtracker():
    """kiln's CPU peak counter (it handles gradient accumulation) against torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from kiln.bench import PeakTensorMemory

    step, model, opt, existing = _tiny_training_step()
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    reference = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    with PeakTensorMemory(existing) as ours:
        step()
    assert ours.peak == reference


def test_profiler_peak_agrees_with_the_dispatch_mode_count():
    """Compiled blocks refuse a TorchDispatchMode, so `kiln bench` counts their peak from the profiler's
    allocator events instead. On the same eager step the two agree to 0.04% here, not exactly: the
    profiler sees the allocator (kernels' scratch buffers, 4-byte scalars made inside composite ops),
    the dispatch mode sees op outputs' storages."""
    from kiln.bench import PeakTensorMemory, profiled_peak_bytes

    step, _, _, existing = _tiny_training_step()
    with PeakTensorMemory(existing) as ours:
        step()
    assert profiled_peak_bytes(existing, step) == pytest.approx(ours.peak, rel=0.005)


@needs_inductor_cpu
def test_bench_compiled_on_cpu_measures_its_peak():
    """`kiln bench --train.compile true` on CPU (inductor, a few seconds): it used to die in the memory count."""
    res = run_bench(load_config("tiny", [*SMALL, "--train.compile", "true"]), steps=1, warmup=1)
    assert res["compile"] is True and res["peak_memory_source"].startswith("profiler")
    assert 0.8 < res["estimate_ratio"] < 1.25


def test_preset_is_only_the_first_word(capsys):
    """`kiln bench --train.seq_len 512` is tiny at T=512, not preset "512" (bench, estimate and doctor)."""
    assert split_preset(["--train.seq_len", "512"]) == (None, ["--train.seq_len", "512"])
    assert split_preset(["dense-180m", "--steps", "2"]) == ("dense-180m", ["--steps", "2"])
    assert split_preset([]) == (None, [])
    from kiln import bench, estimate

    assert estimate.main(["--device", "cpu", "--train.seq_len", "128"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["preset"] == "tiny" and last["tokens_per_micro_batch"] == 8 * 128
    assert bench.main(["--steps", "1", "--warmup", "0", *SMALL[:-6], "--train.seq_len", "32",
                       "--train.micro_batch_size", "1", "--train.global_batch_size", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["preset"] == "tiny" and out["seq_len"] == 32


def _bench_script(name: str):
    """Import a bench/ script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    path, modules = list(sys.path), set(sys.modules)
    try:
        spec.loader.exec_module(mod)
    finally:  # the scripts put src/ and bench/ on sys.path: keep that out of other tests
        sys.path[:] = path
        for extra in {"report"} & (set(sys.modules) - modules):
            del sys.modules[extra]
    return mod


def test_results_blocks_are_replaced_in_place(tmp_path):
    """report.write_block: the one writer of RESULTS.md's marker blocks (vs_hf.py uses it with a heading)."""
    report = _bench_script("report")
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## kiln vs HF\n\ntext\n\n## Data\n\nkeep me\n")
    report.write_block("vs_hf:cpu", "table 1", heading="## kiln vs HF", path=md)
    report.write_block("gpu", "gpu table", path=md)
    report.write_block("vs_hf:cpu", "table 2", heading="## kiln vs HF", path=md)
    text = md.read_text()
    assert text.count("vs_hf:cpu:begin") == 1 and "table 2" in text and "table 1" not in text
    assert text.index("## kiln vs HF") < text.index("table 2") < text.index("## Data") < text.index("gpu table")
    assert "keep me" in text and "text" in text


def test_report_median_keeps_each_configurations_median_run():
    report = _bench_script("report")
    base = {"preset": "tiny", "attention": "sdpa", "loss_impl": "auto", "micro_batch_size": 8, "seq_len": 256,
            "accumulation": 1, "device_name": "cpu", "git_sha": "abc"}
    runs = [{**base, "tokens_per_sec": t, "tag": t} for t in (30, 10, 20)]
    runs += [{**base, "compile": True, "compile_mode": "block", "tokens_per_sec": t, "tag": t} for t in (5, 7)]
    runs.append({"bench": "vs_hf", "rows": []})
    kept = report.median_runs(runs)
    assert [r.get("tag") for r in kept] == [20, 7, None]


def test_vs_hf_labels_the_loss_it_ran(monkeypatch):
    """The "kiln" variant runs loss_impl=auto's choice explicitly and is named after it (Liger on CUDA when
    it imports, chunked otherwise), so a GPU table never calls Liger's kernel "chunked"."""
    import kiln.model.loss as loss

    vs_hf = _bench_script("vs_hf")
    monkeypatch.setattr(loss, "_LIGER", [object])  # "Liger imports"
    assert vs_hf.resolved_loss_impl(torch.device("cuda")) == "liger"
    assert vs_hf.resolved_loss_impl(torch.device("cpu")) == "chunked"
    monkeypatch.setattr(loss, "_LIGER", [None])  # not installed
    assert vs_hf.resolved_loss_impl(torch.device("cuda")) == "chunked"
    args = vs_hf.parse_args(["--layers", "1", "--d-model", "32", "--heads", "2", "--kv-heads", "1", "--ffn", "64",
                             "--vocab", "128", "--batch", "2", "--seq", "16", "--steps", "3", "--warmup", "0",
                             "--threads", "1", "--variants", "hf,kiln", "--no-write"])
    threads = torch.get_num_threads()
    try:
        res = vs_hf.run(args)
    finally:
        torch.set_num_threads(threads)
    assert [r["variant"] for r in res["rows"]] == ["HF LlamaForCausalLM", "kiln (chunked loss)"]
    hf, kiln = res["rows"]
    assert hf["vs_hf"] == 1.0  # paired per round, then the median over rounds
    paired = sorted(a / b for a, b in zip(hf["step_ms_all"], kiln["step_ms_all"]))
    assert kiln["vs_hf"] == pytest.approx(paired[1], rel=1e-3)
    assert res["commit"] == git_describe(ROOT)


def test_gpu_suite_uses_private_scratch_files(tmp_path):
    """bench/gpu_suite.sh with stub python and nvidia-smi: each `kiln bench` writes to mktemp files (two
    suites on one machine never clobber each other), failures are logged with their last stderr line,
    and the scratch files are removed at exit."""
    stubs, scratch = tmp_path / "bin", tmp_path / "scratch"
    stubs.mkdir()
    scratch.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'Stub GPU, 1.0, 80 GiB'\n")
    (stubs / "py").write_text(f"""#!/bin/bash
if [ "$1 $2 $3" = "-m kiln bench" ]; then
  readlink /proc/$$/fd/1 >> {tmp_path}/stdout_targets
  case "$*" in *"--train.loss_impl plain"*) echo "CUDA out of memory" >&2; exit 1;; esac
  echo '{{"preset": "stub"}}'
fi
exit 0
""")
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PY": str(stubs / "py"), "TMPDIR": str(scratch),
           "OUT": str(tmp_path / "out.jsonl")}
    res = subprocess.run(["bash", "bench/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    runs = res.stderr.count("== kiln bench")
    assert runs > 10 and res.stderr.count("FAILED: CUDA out of memory") == 1
    assert (tmp_path / "out.jsonl").read_text().splitlines() == ['{"preset": "stub"}'] * (runs - 1)
    targets = set((tmp_path / "stdout_targets").read_text().split())
    assert len(targets) == 1 and targets.pop().startswith(str(scratch) + "/kiln_bench_line.")
    assert list(scratch.iterdir()) == []  # removed at exit
    # one part per call (a machine with a per-command time limit), appending to the same OUT
    part = subprocess.run(["bash", "bench/gpu_suite.sh", "llama"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert part.returncode == 0 and part.stderr.count("== kiln bench llama-1b") == 4, part.stderr
    assert "dense-180m" not in part.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == runs - 1 + 4
    bad = subprocess.run(["bash", "bench/gpu_suite.sh", "dense", "tiny"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown part 'tiny'" in bad.stderr and "== kiln bench" not in bad.stderr
    # a lent machine's OUT is a folder: the lines go to gpu.jsonl in it, with a copy of RESULTS.md
    folder = tmp_path / "device_out"
    folder.mkdir()
    dev = subprocess.run(["bash", "bench/gpu_suite.sh", "llama"], cwd=ROOT, env={**env, "OUT": str(folder)},
                         capture_output=True, text=True, timeout=120)
    assert dev.returncode == 0, dev.stderr
    assert (folder / "gpu.jsonl").read_text().splitlines() == ['{"preset": "stub"}'] * 4
    assert (folder / "RESULTS.md").read_text() == (ROOT / "bench" / "RESULTS.md").read_text()
