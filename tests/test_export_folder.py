"""`kiln export` into a folder: what it writes there, with which file modes, and what it leaves alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_kiln
from kiln.config import Config, ModelConfig, TrainConfig
from kiln.model import build_model
from kiln.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder with one tiny checkpoint on the shipped 4k tokenizer (a small export, quick to write)."""
    root = tmp_path_factory.mktemp("export") / "run"
    model = ModelConfig(vocab_size=4096, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)
    cfg = Config(model=model, train=TrainConfig(seq_len=64))
    cfg.data.tokenizer = "bundled-4k"
    save_checkpoint(root / "checkpoints", 1, model=build_model(model, seed=0), cfg=cfg, train_state={}, meta={})
    return root


def export(run: Path, out: Path, *args: str, umask: int = 0o022) -> None:
    res = run_kiln("export", "--checkpoint", str(run), "--out", str(out), *args, capture_output=True,
                   text=True, timeout=300, preexec_fn=lambda: os.umask(umask))
    assert res.returncode == 0, res.stderr[-2000:]


def test_reexport_replaces_only_what_kiln_wrote(run, tmp_path):
    """Exporting again over an earlier export keeps what the user added there (a model card, eval results)
    and removes the files the earlier export listed that this one no longer writes."""
    out = tmp_path / "hf"
    export(run, out)
    (out / "README.md").write_text("# my model card\n")
    (out / "eval_results").mkdir()
    (out / "eval_results" / "hellaswag.json").write_text("{}")
    marker = json.loads((out / "kiln_export.json").read_text())
    marker.setdefault("files", []).append("stale.bin")  # as if an older kiln had written one more file
    (out / "kiln_export.json").write_text(json.dumps(marker))
    (out / "stale.bin").write_bytes(b"old")
    size = (out / "model.safetensors").stat().st_size

    export(run, out, "--dtype", "bfloat16")
    assert (out / "README.md").read_text() == "# my model card\n"
    assert (out / "eval_results" / "hellaswag.json").read_text() == "{}"
    assert not (out / "stale.bin").exists() and not (tmp_path / ".hf.tmp").exists()
    marker = json.loads((out / "kiln_export.json").read_text())
    assert marker["dtype"] == "bfloat16" and {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
    assert (out / "model.safetensors").stat().st_size < size


def test_exported_files_follow_the_umask(run, tmp_path):
    """model.safetensors is readable like the other files (safetensors' save_file makes it 0600), so a
    copied folder loads for another user or in a container."""
    out = tmp_path / "hf"
    export(run, out, umask=0o002)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o664 and set(modes.values()) == {0o664}, modes
