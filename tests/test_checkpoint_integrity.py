"""Checkpoint integrity: sizes and checksums in meta.json, verified before every load; damaged
checkpoints refused (inference, export, post-training sources, init_from) or set aside (resume);
a really full disk is one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import xxhash

from conftest import run_kiln
from kiln.config import load_config
from kiln.errors import CheckpointError
from kiln.model import Transformer, build_model
from kiln.train import checkpoint as ckpt_io
from kiln.train import storage
from kiln.train.metrics import read_metrics
from kiln.train.trainer import train
from test_cli import assert_user_error, tree_digest
from test_train import small_overrides

SHARD = "dcp/__0_0.distcp"


def kiln(*args: str) -> subprocess.CompletedProcess:
    # the in-process references use this thread count: the same keeps CPU reductions bit-identical
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return run_kiln(*args, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny run with checkpoints step_2 and step_4 (weights, AdamW moments, RNG, data position)."""
    tmp = tmp_path_factory.mktemp("integrity")
    over = small_overrides(tmp, **{"train.max_steps": 4, "train.save_every": 2})
    train(load_config("tiny", over), quiet=True)
    return tmp, over


def copy_run(trained: tuple[Path, list[str]], dest: Path) -> tuple[Path, list[str]]:
    """A copy of the trained run and the overrides that resume it (same corpus, so the same data position)."""
    tmp, over = trained
    shutil.copytree(tmp / "run", dest)
    out = list(over)
    out[out.index("--run.out_dir") + 1] = str(dest)
    return dest, out


def truncate(ckpt: Path) -> str:
    f = ckpt / SHARD
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "truncated"


def overwrite_middle(ckpt: Path) -> str:
    f = ckpt / SHARD
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(255 - b for b in data[mid:mid + 16])  # 16 bytes flipped, same size
    f.write_bytes(bytes(data))
    return "checksum mismatch"


def delete_file(ckpt: Path) -> str:
    (ckpt / "state" / "common.pt").unlink()
    return "missing"


def garble_marker(ckpt: Path) -> str:
    (ckpt / "meta.json").write_text((ckpt / "meta.json").read_text()[:40])  # a torn write
    return "garbled"


def edit_marker(ckpt: Path) -> str:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][SHARD]["size"] += 1  # valid JSON, wrong content
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return "garbled"


def edit_marker_step(ckpt: Path) -> str:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["step"] += 9  # valid JSON, its files intact: the number resume, keep_best and logs trust
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return "garbled"


def delete_marker(ckpt: Path) -> str:
    (ckpt / "meta.json").unlink()
    return "not a complete checkpoint"


DAMAGE = [truncate, overwrite_middle, delete_file, garble_marker, edit_marker, edit_marker_step, delete_marker]


# ---- what is written ----------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_the_marker_lists_every_file_hashed_as_written(tmp_path, monkeypatch, asynchronous):
    """meta.json holds each file's size and XXH3-128 (recomputed here from the bytes on disk); the
    shards are hashed while DCP writes them, not read back (only the small files are), and the
    writers' sums files are gone."""
    read_back: list[str] = []
    real = storage._hash_mapped
    monkeypatch.setattr(storage, "_hash_mapped", lambda p: read_back.append(Path(p).name) or real(p))
    over = small_overrides(tmp_path, **{"train.max_steps": 2, "train.save_every": 2,
                                        "train.async_checkpoint": asynchronous})
    train(load_config("tiny", over), quiet=True)
    ckpt = ckpt_io.list_checkpoints(tmp_path / "run")[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "meta.json")
    assert sorted(meta["files"]) == on_disk
    assert {"config.yaml", SHARD, "dcp/.metadata", "state/common.pt", "state/rank_0.pt"} <= set(on_disk)
    for rel, entry in meta["files"].items():
        data = (ckpt / rel).read_bytes()
        assert entry == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}, rel
    assert meta["checksum"] == "xxh3_128" and "__0_0.distcp" not in read_back and ".metadata" in read_back
    assert storage.verify(ckpt) is True


def test_weights_only_checkpoints_carry_checksums_too(tmp_path):
    cfg = load_config("tiny", ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
                               "--model.n_kv_heads", "1", "--model.ffn_dim", "64", "--model.vocab_size", "512"])
    path = ckpt_io.save_checkpoint(tmp_path / "checkpoints", 0, model=Transformer(cfg.model), cfg=cfg)
    assert SHARD in ckpt_io.read_meta(path)["files"] and storage.verify(path) is True


# ---- every loader refuses every kind of damage --------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_every_loader_refuses_a_damaged_checkpoint_and_touches_nothing(trained, tmp_path, damage):
    run_dir, _ = copy_run(trained, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "step_4"
    problem = damage(ckpt)
    before = tree_digest(run_dir)
    with torch.device("meta"):
        model = Transformer(ckpt_io.read_config(run_dir / "checkpoints" / "step_2").model)
    target = {"model": {k: torch.empty(v.shape) for k, v in model.state_dict().items() if k != "head.weight"}}
    loaders = {
        "resolve_checkpoint": lambda: ckpt_io.resolve_checkpoint(ckpt),
        "load_for_inference": lambda: ckpt_io.load_for_inference(ckpt),
        "read_model_state": lambda: ckpt_io.read_model_state(ckpt),
        "load_training": lambda: ckpt_io.load_training(ckpt, state=target),
        "load_model_weights": lambda: ckpt_io.load_model_weights(build_model(model.cfg), ckpt),
    }
    if damage is not delete_marker:  # a run folder means its latest checkpoint: refused, not skipped
        loaders["run folder"] = lambda: ckpt_io.load_for_inference(run_dir)
    for name, load in loaders.items():
        with pytest.raises(CheckpointError) as e:
            load()
        line = str(e.value)
        assert "\n" not in line and problem in line and "step_4" in line, (name, line)
        assert f"one, such as {run_dir / 'checkpoints' / 'step_2'}" in line, (name, line)  # the fix names one
    assert tree_digest(run_dir) == before
    if damage is delete_marker:  # an incomplete folder is no checkpoint: the run folder means step_2
        assert ckpt_io.resolve_checkpoint(run_dir).name == "step_2"


def test_a_file_this_user_cannot_read_is_no_damage(trained, tmp_path, monkeypatch):
    """A permission problem (a checkpoint written by another user; chmod) was reported as damage, and a resume set
    the checkpoint aside as step_N.corrupt. (The suite runs as root, whom chmod does not stop: the read is made to
    fail as it does for another user.)"""
    run_dir, _ = copy_run(trained, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "step_4"
    real = storage._hash_read

    def denied(path):
        if path.name == "common.pt":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(storage, "_hash_read", denied)
    with pytest.raises(CheckpointError) as e:
        storage.verify(ckpt)
    assert not isinstance(e.value, storage.DamagedCheckpoint)
    assert str(e.value) == (f"{ckpt / 'state' / 'common.pt'}: not readable by this user (permission denied); fix "
                            "its permissions (chmod / chown) and run the same command again")


def test_verification_is_remembered_until_a_file_changes(trained, tmp_path, monkeypatch):
    run_dir, _ = copy_run(trained, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "step_4"
    calls: list[str] = []
    real = storage._hash_read
    monkeypatch.setattr(storage, "_hash_read", lambda p: calls.append(Path(p).name) or real(p))
    ckpt_io.load_for_inference(ckpt)  # resolve, then load: hashed once
    assert calls.count("__0_0.distcp") == 1
    overwrite_middle(ckpt)
    with pytest.raises(storage.DamagedCheckpoint, match="checksum mismatch"):
        ckpt_io.read_model_state(ckpt)


def test_checkpoints_written_before_checksums_load_with_one_note(trained, tmp_path, capsys):
    run_dir, _ = copy_run(trained, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "step_4"
    meta = json.loads((ckpt / "meta.json").read_text())
    for key in ("checksum", "files", "files_checksum", "meta_checksum"):
        meta.pop(key)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    want = ckpt_io.read_model_state(trained[0] / "run" / "checkpoints" / "step_4")
    got = ckpt_io.read_model_state(ckpt)
    ckpt_io.load_for_inference(ckpt)
    assert all(torch.equal(want[k], got[k]) for k in want)
    err = capsys.readouterr().err
    assert err.count("cannot be verified") == 1 and str(ckpt.name) in err
    (ckpt / "meta.json").write_text("{}")  # overwritten with an empty object: no older checkpoint, a damaged one
    with pytest.raises(storage.DamagedCheckpoint, match=r"meta.json.*garbled \(no list of files, and no kiln_version"):
        ckpt_io.load_for_inference(ckpt)


# ---- resume: set aside, fall back ----------------------------------------------------------------


def test_latest_intact_sets_damaged_checkpoints_aside(trained, tmp_path, capsys):
    run_dir, _ = copy_run(trained, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "step_4", ckpts / "step_6")  # a third, damaged two ways
    truncate(ckpts / "step_6")
    overwrite_middle(ckpts / "step_4")
    damaged = {name: tree_digest(ckpts / name) for name in ("step_4", "step_6")}
    assert ckpt_io.latest_intact(run_dir, is_main=False) is None and (ckpts / "step_6").is_dir()  # rank > 0
    assert ckpt_io.latest_intact(run_dir, is_main=True) == ckpts / "step_2"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "step_6 (dcp/__0_0.distcp: truncated" in lines[0], lines
    assert "step_4 (dcp/__0_0.distcp: checksum mismatch" in lines[0] and lines[0].endswith("resuming from step_2")
    for name, digest in damaged.items():  # renamed, never deleted or changed
        assert tree_digest(ckpts / f"{name}.corrupt") == digest
    assert [p.name for p in ckpt_io.list_checkpoints(run_dir)] == ["step_2"]
    ckpt_io.rotate(ckpts, keep_last=1)
    assert (ckpts / "step_4.corrupt").is_dir()  # rotation leaves set-aside folders alone
    shutil.copytree(ckpts / "step_2", ckpts / "step_4")
    delete_file(ckpts / "step_4")
    delete_file(ckpts / "step_2")
    with pytest.raises(CheckpointError, match=r"every checkpoint is damaged.*step_4.corrupt2.*step_2.corrupt"):
        ckpt_io.latest_intact(run_dir, is_main=True)
    assert ckpt_io.list_checkpoints(run_dir) == []


@pytest.mark.slow
def test_resume_sets_a_damaged_latest_checkpoint_aside_and_matches_an_uninterrupted_run(trained, tmp_path):
    """`kiln train` finds step_4 damaged (bytes changed, same size): it renames it step_4.corrupt, says
    so in one line, resumes from step_2, and ends exactly where a run resumed from an intact step_2
    without the damaged one ends (weights bitwise, every step's loss)."""
    run_dir, out = copy_run(trained, tmp_path / "run")
    ref_dir, ref = copy_run(trained, tmp_path / "ref")
    shutil.rmtree(ref_dir / "checkpoints" / "step_4")
    train(load_config("tiny", [*ref, "--train.max_steps", "6"]), quiet=True)
    overwrite_middle(run_dir / "checkpoints" / "step_4")
    damaged = tree_digest(run_dir / "checkpoints" / "step_4")
    res = kiln("train", "tiny", *out, "--train.max_steps", "6", "--quiet")
    assert res.returncode == 0, res.stderr
    notes = [ln for ln in res.stderr.splitlines() if "set aside" in ln]
    assert len(notes) == 1 and "step_4 (dcp/__0_0.distcp: checksum mismatch" in notes[0], res.stderr
    assert notes[0].endswith("as step_4.corrupt; resuming from step_2"), notes
    assert tree_digest(run_dir / "checkpoints" / "step_4.corrupt") == damaged
    assert ckpt_io.resolve_checkpoint(run_dir).name == "step_6"
    want, got = ckpt_io.read_model_state(ref_dir), ckpt_io.read_model_state(run_dir)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    def last_loss(d: Path) -> dict[int, float]:  # a step trained twice: its last record
        return {r["step"]: r["loss"] for r in read_metrics(d) if r["kind"] == "train"}

    assert last_loss(run_dir) == last_loss(ref_dir) and sorted(last_loss(run_dir)) == list(range(1, 7))


# ---- the command line: one line, nothing changed -------------------------------------------------


ENTRY_POINTS = {  # command -> the damage it meets (together: every kind) and what it is given
    "generate": (truncate, "run folder"),
    "chat": (delete_file, "checkpoint"),
    "eval": (overwrite_middle, "checkpoint"),
    "export": (delete_file, "checkpoint"),
    "sft": (garble_marker, "checkpoint"),
    "dpo": (edit_marker, "run folder"),
    "train --run.init_from": (delete_marker, "checkpoint"),
}


def entry_point_args(command: str, source: Path, data: Path, out: list[str], tmp_path: Path) -> list[str]:
    chats, pairs = tmp_path / "chat.jsonl", tmp_path / "pairs.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    pairs.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    fresh = list(out)
    fresh[fresh.index("--run.out_dir") + 1] = str(tmp_path / "new")
    return {"generate": ["generate", "--checkpoint", str(source), "--prompt", "x"],
            "chat": ["chat", "--checkpoint", str(source)],
            "eval": ["eval", "--checkpoint", str(source), "--data", str(data / "val.jsonl")],
            "export": ["export", "--checkpoint", str(source), "--out", str(tmp_path / "new")],
            "sft": ["sft", "--checkpoint", str(source), "--data", str(chats), "--run.out_dir", str(tmp_path / "new")],
            "dpo": ["dpo", "--checkpoint", str(source), "--data", str(pairs), "--run.out_dir", str(tmp_path / "new")],
            "train --run.init_from": ["train", "tiny", *fresh, "--run.init_from", str(source)]}[command]


@pytest.mark.parametrize("command", list(ENTRY_POINTS))
def test_the_cli_refuses_a_damaged_checkpoint_in_one_line(trained, tmp_path, command):
    """One line naming the file and the problem, exit 2, no traceback; nothing changed, nothing made."""
    run_dir, out = copy_run(trained, tmp_path / "run")
    damage, given = ENTRY_POINTS[command]
    problem = damage(run_dir / "checkpoints" / "step_4")
    before = tree_digest(run_dir)
    source = run_dir if given == "run folder" else run_dir / "checkpoints" / "step_4"
    res = kiln(*entry_point_args(command, source, trained[0], out, tmp_path))
    assert_user_error(res, problem, "step_4", "step_2")
    assert tree_digest(run_dir) == before
    assert not (tmp_path / "new").exists()


# ---- a really full disk ------------------------------------------------------------------------------


def test_write_error_recognises_a_full_disk(tmp_path, monkeypatch):
    """ENOSPC as raised, inside torch.save's RuntimeError (its zip writer; the OSError is only the
    context) and inside DCP's per-rank CheckpointException; failing that, the free space decides."""
    import contextlib

    from torch.distributed.checkpoint.api import CheckpointException

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (every write fails with ENOSPC)")
    full = open("/dev/full", "wb")  # noqa: SIM115 (closing it raises ENOSPC again)
    try:
        torch.save(torch.zeros(1000), full)
    except RuntimeError as e:
        zip_writer = e
    finally:
        with contextlib.suppress(OSError):
            full.close()
    assert "unexpected pos" in str(zip_writer) and isinstance(zip_writer.__context__, OSError)
    for e in (OSError(errno.ENOSPC, "full"), zip_writer, CheckpointException("save", {0: (zip_writer, None)})):
        err = storage.write_error(e, tmp_path)
        assert err is not None and "(the disk is full)" in str(err) and "\n" not in str(err), e
    bare = RuntimeError("unexpected pos 704 vs 598")  # no OSError left in the chain: ask the file system
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1 << 40)
    assert storage.write_error(bare, tmp_path) is None
    monkeypatch.setattr(storage, "free_bytes", lambda path: 4096)
    assert "(the disk is full)" in str(storage.write_error(bare, tmp_path))
    assert storage.write_error(KeyboardInterrupt(), tmp_path) is None
    assert "Permission denied" in str(storage.write_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path))


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs: a tiny run's first checkpoint (~13 MB) fits, a second one does not."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_really_full_disk_is_one_line_and_the_earlier_checkpoint_loads(tmp_path, small_disk, asynchronous):
    over = small_overrides(tmp_path, **{"run.out_dir": small_disk / "run", "train.max_steps": 6, "train.save_every": 2,
                                        "train.keep_last": 1, "train.async_checkpoint": asynchronous})
    res = kiln("train", "tiny", *over, "--quiet")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("kiln: error: ") and "cannot write the checkpoint (the disk is full" in last, res.stderr
    assert "earlier checkpoints are untouched" in last and "run the same command to resume" in last
    ckpts = small_disk / "run" / "checkpoints"
    assert [p.name for p in ckpt_io.list_checkpoints(small_disk / "run")] == ["step_2"]
    assert not list(ckpts.glob(".step_*")), list(ckpts.iterdir())
    gen = kiln("generate", "--checkpoint", str(small_disk / "run"), "--prompt", "the", "--max-new-tokens", "4")
    assert gen.returncode == 0 and "Traceback" not in gen.stderr, gen.stderr


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_write_that_fills_the_disk_midway_is_one_line(small_disk, monkeypatch, asynchronous):
    """The write itself failing on a really full disk (torch.save's zip writer inside DCP's writer,
    in the background when asynchronous): the advance check is bypassed, as when something else fills
    the disk during the save. One-line error, temp folder gone, the earlier checkpoint intact."""
    cfg = load_config("tiny", [])
    root = small_disk / "checkpoints"
    small = {"model": {"w": torch.randn(250_000)}}  # 1 MB: fits
    first = ckpt_io.save_training(root, 1, state=small, rank=0, is_main=True, cfg=cfg, common={}, rank_state={},
                                  meta={})
    before = tree_digest(first)
    big = {"model": {"w": torch.randn(8_000_000)}}  # 32 MB on a 20 MB disk
    with pytest.raises(CheckpointError, match=r"needs 30.5 MiB, \d+\.\d MiB free"):
        ckpt_io.save_training(root, 2, state=big, rank=0, is_main=True, cfg=cfg, common={}, rank_state={}, meta={})
    monkeypatch.setattr(ckpt_io, "check_room", lambda where, state: None)
    with pytest.raises(CheckpointError) as e:
        if asynchronous:
            saver = ckpt_io.Checkpointer(root, rank=0, is_main=True, asynchronous=True)
            saver.save(2, state=big, cfg=cfg, common={}, rank_state={}, meta={}, wait=True)
        else:
            ckpt_io.save_training(root, 2, state=big, rank=0, is_main=True, cfg=cfg, common={}, rank_state={}, meta={})
    assert "cannot write the checkpoint (the disk is full)" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == ["step_1"] and tree_digest(first) == before
    assert storage.free_bytes(small_disk) > 15 << 20  # the partial write was removed
    assert storage.verify(first) is True


def test_the_earlier_checkpoint_named_for_a_set_aside_one_is_older(tmp_path):
    """A damaged checkpoint set aside as step_40.corrupt and opened anyway: the hint names step_10, the newest
    before it, not step_45 (a set-aside name once counted as no step at all)."""
    from kiln.train.storage import MARKER, _earlier

    for name in ("step_10", "step_40.corrupt", "step_45"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MARKER).write_text("{}")
    assert _earlier(tmp_path / "step_40.corrupt") == f", such as {tmp_path / 'step_10'},"
    assert _earlier(tmp_path / "step_45") == f", such as {tmp_path / 'step_10'},"  # step_N.corrupt is no candidate


def test_an_exported_hf_folder_is_named_as_one_with_the_import_that_converts_it(trained, tmp_path):
    """`--checkpoint` given `kiln export`'s folder (config.json + model.safetensors) says what it is and how to
    convert it, rather than that no checkpoint was found. (`kiln import` itself: tests/test_hf_import.py.)"""
    hf = tmp_path / "hf"
    assert kiln("export", "--checkpoint", str(trained[0] / "run"), "--out", str(hf)).returncode == 0
    res = kiln("generate", "--checkpoint", str(hf), "--prompt", "x")
    assert_user_error(res, f"{hf}: a Hugging Face model folder, not a kiln checkpoint; convert it with kiln import "
                           f"--hf {hf} --out RUN_DIR, then pass RUN_DIR in its place")
