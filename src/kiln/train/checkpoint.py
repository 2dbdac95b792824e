"""Checkpoints: everything needed to resume exactly, on any layout, written atomically, rotated.

Layout of one checkpoint (a folder):
    runs/<name>/checkpoints/step_<N>/
        dcp/             model weights and optimizer state, torch.distributed.checkpoint format:
                         every rank writes its shards; names are the whole model's parameter names, so a
                         checkpoint saved with FSDP on 4 ranks loads on 1 process, with TP, or pipelined
        state/common.pt  counters, detector states and other global state (rank 0)
        state/rank_<R>.pt  per rank: RNG states, its coordinates, and its data position if it reads data
        config.yaml      the resolved config
        meta.json        step, tokens_seen, eval_loss (when saved right after an eval), versions, and
                         every other file's size and checksum (kiln.train.storage); written last, so
                         its presence means the checkpoint is complete
A checkpoint is written to `.step_<N>.tmp`, fsynced, then renamed; a crash mid-save leaves the previous
checkpoints untouched and the temp folder is ignored (and removed on the next save). A full disk is one
line (CheckpointError), the temp folder removed.
Every load verifies the files first: inference, export and post-training sources refuse a damaged
checkpoint; a resume sets a damaged latest one aside as `step_<N>.corrupt` (`latest_intact`).
Retention (`rotate`): the newest `keep_last`, plus the `keep_best` with the lowest eval loss.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kiln import __version__
from kiln.config import Config, config_from_dict
from kiln.device import pick_device
from kiln.errors import CheckpointError, ConfigError
from kiln.model import Transformer, build_model
from kiln.parallel.parallelize import unwrap
from kiln.paths import saved_dict
from kiln.train.control import Requests
from kiln.train.storage import (
    MARKER,
    STEP_RE,
    DamagedCheckpoint,
    check_room,
    checkpoint_step,
    collect_digests,
    marker_digest,
    marker_fields,
    summing_writer,
    verify,
    write_error,
)

CHAT_TEMPLATE = "chat_template.jinja"  # a post-training run's own .jinja (posttrain.chat_template), copied at save


def list_checkpoints(run_or_ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints under a run folder (or its checkpoints/ folder), oldest first."""
    root = Path(run_or_ckpt_dir)
    root = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if STEP_RE.match(p.name) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / MARKER).exists()]


def is_hf_folder(p: Path) -> bool:
    """A Hugging Face model folder (`kiln export`'s output, or a hub download): config.json and weights."""
    weights = any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))
    return (p / "config.json").is_file() and weights


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder meaning its latest checkpoint; verified (DamagedCheckpoint
    when a file differs from its marker: a damaged latest checkpoint is refused, not skipped)."""
    if not str(path).strip():  # Path('') is '.': the folder the command runs in, which the user did not name
        raise CheckpointError("the checkpoint path is empty; pass a checkpoint folder or a run folder")
    p = Path(path).expanduser()  # `--checkpoint=~/run` and '~/run': no shell expanded the ~
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    if not p.is_dir():  # meta.json or a weights file of a checkpoint, a data file given in the wrong place
        inside = next((q for q in p.parents if (q / MARKER).is_file() and STEP_RE.match(q.name)), None)
        raise CheckpointError(f"{p}: a file, not a checkpoint or run folder" + (
            f"; pass the checkpoint folder it is in, {inside}" if inside else ""))
    if not (p / MARKER).exists():
        if STEP_RE.match(p.name) or (p / "dcp").is_dir():  # a checkpoint folder whose save never completed
            raise DamagedCheckpoint(p, MARKER, "missing")
        ckpts = list_checkpoints(p)
        if not ckpts and is_hf_folder(p):
            raise CheckpointError(f"{p}: a Hugging Face model folder, not a kiln checkpoint; convert it with "
                                  f"kiln import --hf {p} --out RUN_DIR, then pass RUN_DIR in its place")
        if not ckpts:
            raise CheckpointError(f"{p}: no complete checkpoint found (expected {p}/checkpoints/step_<N>/{MARKER})")
        p = ckpts[-1]
    verify(p)
    return p


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(ckpt) / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}/{MARKER}: unreadable ({e}); the checkpoint is corrupt") from None


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [*sorted(p for p in path.rglob("*") if p.is_dir()), path]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a failed DCP read raises: its CheckpointException derives from BaseException, not Exception."""
    return (Exception, CheckpointException)


def _quiet(fn, *args: Any, **kwargs: Any) -> Any:
    """DCP warns that it runs without a process group; in one process that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        return fn(*args, **kwargs)


def _finish(tmp: Path, final: Path, *, cfg: Config, meta: dict[str, Any]) -> None:
    """Rank 0: config, every file's size and checksum, meta (last), fsync, atomic rename over any
    same-step folder."""
    (tmp / "config.yaml").write_text(yaml.safe_dump(saved_dict(cfg), sort_keys=False))
    template = Path(cfg.posttrain.chat_template).expanduser()
    if cfg.posttrain.chat_template not in ("auto", "kiln") and template.is_file():  # a user's .jinja: kept with the
        shutil.copyfile(template, tmp / CHAT_TEMPLATE)  # weights, so export and chat need not find it (read_config)
    info = {"kiln_version": __version__, "torch_version": torch.__version__, **meta,
            **marker_fields(collect_digests(tmp))}
    info["meta_checksum"] = marker_digest(info)
    (tmp / MARKER).write_text(json.dumps(info, indent=2))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. a final save right after a periodic one)
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_tree_dir(final.parent)


def _fsync_tree_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_training(ckpt_root: Path, step: int, *, state: dict[str, Any], rank: int, is_main: bool, cfg: Config,
                  common: dict[str, Any], rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write step_<step> from every rank (a collective when distributed) and return its path.

    state: {"model": ..., "optim": ...} from Engine.state_dict(); common: rank 0's global state;
    rank_state: this rank's RNG / data position.
    """
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".step_{step}.tmp"
    check_room(ckpt_root, state)
    try:
        if is_main:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "state").mkdir(parents=True)
        _barrier()
        _quiet(dcp.save, state, storage_writer=summing_writer(tmp / "dcp"))
        torch.save(rank_state, tmp / "state" / f"rank_{rank}.pt")
        _barrier()
        if is_main:
            torch.save(common, tmp / "state" / "common.pt")
            _finish(tmp, final, cfg=cfg, meta={"step": step, **meta})
        _barrier()
    except BaseException as e:
        err = write_error(e, ckpt_root)  # before the temp folder goes: its files may be what filled the disk
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if err is not None:
            raise err from None
        raise
    return final


def probe_save(root: Path, step: int, *, state: dict[str, Any], cfg: Config, common: dict[str, Any],
               rank_state: dict[str, Any], meta: dict[str, Any], rank: int, is_main: bool) -> None:
    """Write a real checkpoint to the scratch folder `root` and delete it (every rank): what one costs."""
    try:
        save_training(root, step, state=state, rank=rank, is_main=is_main, cfg=cfg, common=common,
                      rank_state=rank_state, meta=meta)
    finally:
        _barrier()
        if is_main:
            shutil.rmtree(root, ignore_errors=True)


class Checkpointer:
    """Writes training checkpoints, synchronously or (`train.async_checkpoint`) in the background.

    Asynchronous: the step's weights and optimizer state are copied to CPU memory (DCP's default
    stager; training may change the live tensors right after), the small per-rank and global state
    files are written at once, and DCP writes the shards from a background thread over a separate
    gloo group (so its collectives never interleave with training's), checksumming them as it goes.
    The checkpoint appears (`.step_<N>.tmp` renamed to `step_<N>`, then rotation and mirroring) once
    the write is done: rank 0 checks after every step (`poll`, no collectives), and every rank waits
    for the write before the next save, a divergence verdict and the end of the run (`wait`), where a
    failed write surfaces as the synchronous path's one-line error. A crash or kill before that
    leaves only the temp folder, which is ignored, so the previous checkpoints stay what resumes.
    """

    def __init__(self, ckpt_root: Path, *, rank: int, is_main: bool, asynchronous: bool, on_saved: Any = None,
                 save_every: int = 0, save_every_minutes: float = 0.0, keep_best: int = 0, total_steps: int = 0,
                 saved_at: int = -1) -> None:
        self.root, self.rank, self.is_main, self.asynchronous = ckpt_root, rank, is_main, asynchronous
        self.on_saved = on_saved or (lambda path: None)  # rank 0, once a checkpoint is complete: rotate, mirror
        self.save_every, self.save_every_minutes = save_every, save_every_minutes
        self.keep_best, self.total_steps = keep_best, total_steps
        self.saved_at, self._last_save = saved_at, time.time()  # the step of the newest checkpoint; when saved
        self._pending: dict[str, Any] | None = None
        self._group = None
        if asynchronous and dist.is_initialized():  # every rank creates it, in the same order
            self._group = dist.new_group(backend="gloo")
        elif asynchronous:  # DCP's writer thread says it assumes one process: exactly the intent
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

    # ---- cadence: the checkpointer decides when a save is due ----------------------------------

    def clock_due(self) -> bool:
        """train.save_every_minutes has passed since the last save (read on rank 0, agreed by the step's
        all-reduce as Requests.clock_save)."""
        m = self.save_every_minutes
        return self.is_main and m > 0 and time.time() - self._last_save >= 60 * m

    def due(self, step: int, *, score: float | None, scores: list[float], requests: Requests) -> bool:
        """Whether to checkpoint after `step`: every save_every steps (the last step is saved at the end of
        the run), right after an eval whose keep-best score (lower is better) is among the keep_best
        lowest so far (`scores` ends with this one), on request, or by the clock."""
        periodic = self.save_every > 0 and step % self.save_every == 0 and step != self.total_steps
        best = (score is not None and self.keep_best > 0
                and len([b for b in scores[:-1] if b <= score]) < self.keep_best)
        return periodic or best or requests.save or requests.clock_save

    # ---- writing ------------------------------------------------------------------------------

    def save(self, step: int, *, state: dict[str, Any], cfg: Config, common: dict[str, Any],
             rank_state: dict[str, Any], meta: dict[str, Any], wait: bool = False) -> Path:
        """Checkpoint `step`; returns its final path (complete on return unless asynchronous and not `wait`)."""
        self.wait()
        self.saved_at, self._last_save = step, time.time()
        if not self.asynchronous:
            path = save_training(self.root, step, state=state, rank=self.rank, is_main=self.is_main, cfg=cfg,
                                 common=common, rank_state=rank_state, meta=meta)
            if self.is_main:
                self.on_saved(path)
            return path
        final, tmp = self.root / f"step_{step}", self.root / f".step_{step}.tmp"
        check_room(self.root, state)
        try:
            if self.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "state").mkdir(parents=True)
            _barrier()
            torch.save(rank_state, tmp / "state" / f"rank_{self.rank}.pt")
            if self.is_main:
                torch.save(common, tmp / "state" / "common.pt")
            future = dcp.async_save(state, storage_writer=summing_writer(tmp / "dcp"), process_group=self._group,
                                    no_dist=not dist.is_initialized())
        except BaseException as e:
            self._fail(e, tmp)
        self._pending = {"future": future, "tmp": tmp, "final": final, "cfg": cfg, "meta": {"step": step, **meta}}
        if wait:
            self.wait()
        return final

    def poll(self) -> Path | None:
        """Rank 0: complete a finished background write (rename, rotate, mirror); the path, or None."""
        p = self._pending
        if not self.is_main or p is None or p.get("done") or not p["future"].done():
            return None
        if p["future"].exception() is not None:
            return None  # raised by wait() on every rank
        return self._complete(p)

    def wait(self) -> None:
        """Every rank: wait for the background write, complete it, and raise its error if it failed."""
        p, self._pending = self._pending, None
        if p is None:
            return
        try:
            p["future"].result()
        except BaseException as e:
            self._fail(e, p["tmp"])
        if self.is_main and not p.get("done"):
            self._complete(p)
        _barrier()

    def close(self) -> None:
        """On an error exit: let a background write finish and complete it (no collectives, errors
        swallowed: the run is failing for another reason already)."""
        p, self._pending = self._pending, None
        if p is None:
            return
        try:
            p["future"].result()
            if self.is_main and not p.get("done"):
                self._complete(p)
        except BaseException:
            self._abandon(p["tmp"])

    def _complete(self, p: dict[str, Any]) -> Path:
        try:
            _finish(p["tmp"], p["final"], cfg=p["cfg"], meta=p["meta"])
        except Exception as e:
            self._fail(e, p["tmp"])
        p["done"] = True
        self.on_saved(p["final"])
        return p["final"]

    def _fail(self, e: BaseException, tmp: Path) -> NoReturn:
        """Raise the one-line error for a failed write (or `e` itself), the temp folder removed."""
        err = write_error(e, self.root)  # first: the temp folder's files may be what filled the disk
        self._abandon(tmp)
        if err is not None:
            raise err from None
        raise e

    def _abandon(self, tmp: Path) -> None:
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def load_training(ckpt: Path, *, state: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load the checkpoint's model/optimizer into `state` in place (resharding to this layout) and
    return (common state, every rank's saved rank state). Verified first (DamagedCheckpoint)."""
    verify(ckpt)
    try:
        _quiet(dcp.load, state, checkpoint_id=str(ckpt / "dcp"))
    except _load_errors() as e:  # DCP raises several types for truncated or mismatched files
        raise _corrupt(ckpt / "dcp", e) from None
    common = _torch_load(ckpt / "state" / "common.pt", ckpt)
    ranks = [_torch_load(f, ckpt) for f in sorted((ckpt / "state").glob("rank_*.pt"),
                                                    key=lambda p: int(p.stem.split("_")[1]))]
    return common, ranks


def _torch_load(f: Path, ckpt: Path) -> Any:
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or garbled pickles
        raise _corrupt(f, e) from None


def _corrupt(f: Path, e: BaseException) -> CheckpointError:
    """f is <ckpt>/dcp or <ckpt>/state/<file>; its checksums passed (or it has none), yet it does not load."""
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    ckpt = f.parent if f.name == "dcp" else f.parent.parent
    return CheckpointError(f"{f}: corrupt or unreadable ({msg}); pass an earlier checkpoint, or move this one aside "
                           f"(mv {ckpt} {ckpt}.corrupt) so that `kiln train` resumes from the one before, or pass --fresh")


def latest_intact(run_dir: Path, *, is_main: bool) -> Path | None:
    """Rank 0: the newest complete checkpoint of a run whose files verify, or None when the run has
    none (other ranks: None; the trainer broadcasts rank 0's answer). Damaged ones newer than it are
    set aside as `step_<N>.corrupt` (renamed, never deleted; rotation ignores them), said in one line
    on stderr. When every checkpoint is damaged: all set aside, and a CheckpointError."""
    if not is_main:
        return None
    aside: list[str] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify(ckpt)
        except DamagedCheckpoint as e:
            aside.append(f"{ckpt.name} ({e.short()}) as {_set_aside(ckpt).name}")
            continue
        if aside:
            print(f"warning: set aside damaged checkpoint {', '.join(aside)}; resuming from {ckpt.name}",
                  file=sys.stderr)
        return ckpt
    if aside:
        raise CheckpointError(f"{run_dir}: every checkpoint is damaged; set aside {', '.join(aside)}. Restore one "
                              "from a copy, or run the same command again to start the run over")
    return None


def _set_aside(ckpt: Path) -> Path:
    target, n = ckpt.with_name(f"{ckpt.name}.corrupt"), 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}.corrupt{n}")
    ckpt.rename(target)
    return target


def rotate(ckpt_root: Path, *, keep_last: int, keep_best: int = 0) -> list[Path]:
    """Delete checkpoints outside the newest `keep_last` (0 keeps all) and the `keep_best` lowest
    eval losses. Returns the deleted paths. Stale temp folders are removed too."""
    ckpts = list_checkpoints(ckpt_root)
    scores = [best_score(read_meta(p)) if keep_best > 0 else None for p in ckpts]
    keep = retained(scores, keep_last=keep_last, keep_best=keep_best)
    doomed = [p for i, p in enumerate(ckpts) if i not in keep]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    for stale in ckpt_root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return doomed


def retained(scores: list[Any], *, keep_last: int, keep_best: int = 0) -> set[int]:
    """Retention over checkpoints oldest first, given each one's keep-best score (a float, else none): the
    indices of the newest `keep_last` (0: all) and of the `keep_best` lowest scores."""
    n = len(scores)
    keep = set(range(max(0, n - keep_last), n)) if keep_last > 0 else set(range(n))
    if keep_best > 0:
        scored = sorted((s, i) for i, s in enumerate(scores) if isinstance(s, float))
        keep |= {i for _, i in scored[:keep_best]}
    return keep


def best_score(meta: dict[str, Any]) -> float | None:
    """A checkpoint's keep-best score (lower is better): train.keep_best_metric's, else its eval loss."""
    return meta.get("best_score", meta.get("eval_loss"))


def read_config(ckpt: Path) -> Config:
    try:
        tree = yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{ckpt}/config.yaml: unreadable ({e}); the checkpoint is corrupt") from None
    train = tree.get("train") if isinstance(tree, dict) else None
    if isinstance(train, dict) and train.get("time_budget") and train.get("max_steps"):
        # kiln sft/dpo/rlvr once kept the source run's time budget beside the stage's own max_steps, which is
        # what those runs followed: read such a checkpoint as the run it was
        train["time_budget"] = ""
    try:
        cfg = config_from_dict(tree, where=f"{ckpt}/config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{e} (checkpoint written by another kiln version?)") from None
    if (Path(ckpt) / CHAT_TEMPLATE).is_file():  # the template the run trained with, not the file its path now holds
        cfg.posttrain.chat_template = str((Path(ckpt) / CHAT_TEMPLATE).absolute())  # saved on: any folder
    return cfg


# ---- plain (single-device) models: inference, export, import, tests ---------------------------


def _model_keys(model: Transformer) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("head.weight", None)
    return sd


def load_model_weights(model: Transformer, ckpt: Path) -> None:
    """Copy the checkpoint's weights into a plain `model` (verified first); a shape or key mismatch is a
    clear error."""
    verify(ckpt)
    target = {k: torch.empty_like(v, device="cpu") for k, v in _model_keys(model).items()}
    try:
        _quiet(dcp.load, {"model": target}, checkpoint_id=str(ckpt / "dcp"))
    except _load_errors() as e:
        text = str(e)
        if "size mismatch" in text.lower() or "missing key" in text.lower() or "shape" in text.lower():
            raise CheckpointError(f"{ckpt}: does not fit this model's architecture ({text.strip().splitlines()[0][:160]});"
                                  " use a matching config or --fresh") from None
        raise _corrupt(ckpt / "dcp", e) from None
    with torch.no_grad():
        own = _model_keys(model)
        for k, v in target.items():
            own[k].copy_(v)


def save_checkpoint(ckpt_root: Path, step: int, *, model: Transformer, cfg: Config,
                    train_state: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> Path:
    """A weights-only checkpoint of a plain model (import, fixtures); `kiln train --run.init_from`,
    generate, eval and export read it. Written atomically like a training checkpoint."""
    state = {"model": {k: v.detach().to("cpu", torch.float32) for k, v in _model_keys(model).items()}}
    return save_training(Path(ckpt_root), step, state=state, rank=0, is_main=True, cfg=cfg,
                         common=dict(train_state or {}), rank_state={}, meta={**(meta or {}), "weights_only": True})


def weights_only(ckpt: Path) -> bool:
    """Whether a checkpoint holds weights alone (kiln average, kiln import): no optimizer or data state to resume.
    (Averages written before the marker are known by their source list.)"""
    meta = read_meta(ckpt)
    return bool(meta.get("weights_only") or meta.get("averaged_from"))


def holds_average(ckpt: Path) -> bool:
    """Whether a checkpoint holds the weights' moving average (train.ema_decay) beside them."""
    return bool(read_meta(ckpt).get("ema_decay"))


def read_model_state(ckpt: str | Path, *, weights: str = "model") -> dict[str, torch.Tensor]:
    """The checkpoint's weights as full fp32 CPU tensors (tied head not repeated); verified. `weights`: "model",
    or "ema" for the moving average a run with train.ema_decay keeps beside them."""
    ckpt = resolve_checkpoint(ckpt)
    if weights == "ema" and not holds_average(ckpt):
        raise CheckpointError(f"{ckpt}: holds no moving average of the weights; train with --train.ema_decay D "
                              "(e.g. 0.999) to keep one, or average its weights (without --weights ema)")
    with torch.device("meta"):
        model = Transformer(read_config(ckpt).model)
    target = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in _model_keys(model).items()}
    try:
        _quiet(dcp.load, {weights: target}, checkpoint_id=str(ckpt / "dcp"))
    except _load_errors() as e:
        raise _corrupt(ckpt / "dcp", e) from None
    return target


def check_tokenizer_digest(ckpt: Path, cfg: Config, tokenizer: Any = None) -> None:
    """The tokenizer `cfg.data.tokenizer` names now (`tokenizer`, when the caller has loaded it) must be the
    one the checkpoint was trained with, by the digest its meta.json records (kiln.data.tokenizer.
    tokenizer_digest; checkpoints from before it was recorded are taken on trust). A tokenizer folder
    retrained or edited in place after training would otherwise feed the model other ids, silently."""
    from kiln.data.tokenizer import load_tokenizer, tokenizer_digest

    want = read_meta(ckpt).get("tokenizer_digest")
    if not want:
        return
    spec = cfg.data.tokenizer
    have = tokenizer_digest(tokenizer if tokenizer is not None else load_tokenizer(spec))
    if have != want:
        raise CheckpointError(f"{ckpt}: trained with tokenizer '{spec}' of digest {want[:12]}, but '{spec}' now "
                              f"has digest {have[:12]} (retrained or edited since); restore the tokenizer it was "
                              "trained with")


def load_for_inference(path: str | Path, *, device: str | torch.device = "auto") -> tuple[Transformer, Config, Path]:
    """(model in eval mode, its config, the checkpoint folder) from a checkpoint or run folder; `device` is a
    torch.device or a `run.device` choice (auto | cpu | cuda). A damaged checkpoint is refused
    (DamagedCheckpoint), never loaded; so is one whose tokenizer changed since (check_tokenizer_digest)."""
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    check_tokenizer_digest(ckpt, cfg)
    model = build_model(cfg.model, device=pick_device(device) if isinstance(device, str) else device, seed=0)
    load_model_weights(model, ckpt)
    model.eval()
    return model, cfg, ckpt


# ---- a layout's training state under the whole model's names (DCP) -----------------------------
#
# Every layout saves its weights and optimizer state under the plain model's parameter names, so a
# checkpoint moves between layouts. The one rename: a pipeline's last stage holds a copy of a tied
# embedding as `head.weight`; it is stored (and read back) as `tok_emb.weight`, the same tensor a plain
# model saves.


def _alias(part: nn.Module, *, tie_embeddings: bool) -> dict[str, str]:
    m = unwrap(part)
    if tie_embeddings and m.tok_emb is None and getattr(m, "head", None) is not None:
        return {"head.weight": "tok_emb.weight"}
    return {}


def _rename(sd: dict[str, Any], alias: dict[str, str]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        for old, new in alias.items():
            if k == old or k.endswith("." + old) or f".{old}." in k or k.startswith(old + "."):
                k = k.replace(old, new)
        out[k] = v
    return out


def part_weights(part: nn.Module, *, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """A model part's weights under whole-model names: views of its parameters (DTensors where sharded)."""
    model_sd = get_model_state_dict(part)
    if tie_embeddings and "tok_emb.weight" in model_sd:
        model_sd.pop("head.weight", None)  # the tensor-parallel head shares the embedding Parameter
    return _rename(model_sd, _alias(part, tie_embeddings=tie_embeddings))


def _part_state(part: nn.Module, optim: torch.optim.Optimizer, *, tie_embeddings: bool
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    optim_sd = get_optimizer_state_dict(part, optim, options=StateDictOptions(flatten_optimizer_state_dict=True))
    alias = _alias(part, tie_embeddings=tie_embeddings)
    return part_weights(part, tie_embeddings=tie_embeddings), _rename(optim_sd, alias)


def layout_state_dict(parts: list[nn.Module], optims: list[torch.optim.Optimizer], *, tie_embeddings: bool,
                      optimizer: bool = True) -> dict[str, Any]:
    """{"model": ..., "optim": ...} of a layout's model parts (pipeline stages, or the one model) keyed by
    whole-model parameter names; values may be sharded DTensors (DCP saves and reshards them)."""
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    for part, optim in zip(parts, optims):
        m, o = _part_state(part, optim, tie_embeddings=tie_embeddings)
        model_sd.update(m)
        optim_sd.update(o)
    return {"model": model_sd, "optim": optim_sd} if optimizer else {"model": model_sd}


def load_layout_state_dict(parts: list[nn.Module], optims: list[torch.optim.Optimizer], state: dict[str, Any], *,
                           tie_embeddings: bool, optimizer: bool = True) -> None:
    """Copy a state that DCP loaded in place into `layout_state_dict`'s structure back into the parts."""
    for part, optim in zip(parts, optims):
        inverse = {v: k for k, v in _alias(part, tie_embeddings=tie_embeddings).items()}
        own_model, own_optim = _part_state(part, optim, tie_embeddings=tie_embeddings)
        model_sd = _rename({k: state["model"][k] for k in own_model}, inverse)
        set_model_state_dict(part, model_sd, options=StateDictOptions(strict=False))
        if optimizer:
            optim_sd = _rename({k: state["optim"][k] for k in own_optim}, inverse)
            # each group's settings (betas, eps, weight_decay, momentum, ...) are this run's config, not the saved
            # one's: a resume that changes optim.weight_decay trains with it (preflight's resume note says so)
            settings = {id(g["params"][0]): {k: v for k, v in g.items() if k != "params"}
                        for g in optim.param_groups if g["params"]}
            set_optimizer_state_dict(part, optim, optim_sd, options=StateDictOptions(flatten_optimizer_state_dict=True))
            for g in optim.param_groups:
                if g["params"]:
                    g.update(settings[id(g["params"][0])])
