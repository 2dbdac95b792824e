"""One typed config tree: dataclasses, YAML presets, dotted CLI overrides, validation.

Every user mistake (unknown key, wrong type, impossible combination) raises `ConfigError` naming the file and the
dotted key, at load time, before any model or data work starts."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from kiln import yamlfile
from kiln.choices import ACMode, CompileMode, LossImpl, OnExhausted, PipelineSchedule, Remainder
from kiln.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"

AttentionBackend = Literal["eager", "sdpa", "flex", "flash"]
InitScheme = Literal["normal", "trunc_normal", "deepnet"]
ResidualKind = Literal["prenorm", "deepnorm"]
ScheduleKind = Literal["cosine", "wsd", "constant", "infinite"]
OptimName = Literal["adamw", "adafactor", "muon", "adamw8bit"]
LRScaling = Literal["none", "sqrt"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]
DType = Literal["auto", "fp32", "bf16"]
PrefLoss = Literal["sigmoid", "apo_zero", "apo_down"]


@dataclass
class ModelConfig:
    """Architecture of the decoder. Shapes only; no device, no parallelism."""

    vocab_size: int = 32768
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0 means d_model // n_heads
    ffn_dim: int = 688
    max_seq_len: int = 2048  # longest position RoPE tables are built for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3 style)
    tie_embeddings: bool = True
    nope_every: int = 0  # >0: layers with (i + 1) % nope_every == 0 skip RoPE (hybrid NoPE as in SmolLM3)
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (Gemma-style)
    residual: ResidualKind = "prenorm"  # deepnorm: post-norm with x*alpha residual (DeepNet, Wang et al. 2022)
    attention: AttentionBackend = "sdpa"
    init: InitScheme = "normal"
    init_std: float = 0.02  # used by init=normal
    init_zero_out: bool = False  # with any scheme: wo, w_down and an untied head start at 0 (as in modded-nanogpt)

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def nope_layers(self) -> list[int]:
        """Indices of layers that do not apply RoPE."""
        if self.nope_every <= 0:
            return []
        return [i for i in range(self.n_layers) if (i + 1) % self.nope_every == 0]


@dataclass
class SourceConfig:
    """One text source: a local file/glob/folder, a bundled split, or an HF dataset name."""

    shorthand = "path"  # not a field: a source given as a bare string is that path (--data.train my.jsonl)
    path: str = ""
    name: str = ""  # label used in metrics; defaults to the file stem
    weight: float = 1.0
    text_column: str = "text"
    hf_config: str = ""  # HF dataset config name (e.g. "sample-10BT")
    split: str = "train"
    txt_sample_by: Literal["document", "paragraph", "line"] = "document"
    streaming: bool = False  # read as a stream (HF IterableDataset): no download or Arrow cache first
    skip: int = 0  # documents skipped at the start (hold out a stream's head for validation)
    take: int = 0  # at most this many documents after `skip` (0: all)


@dataclass
class StageConfig:
    """One stage of a staged data mixture (kiln.data.stages): where it starts and what it reads."""

    name: str = ""
    start: float = 0.0  # 0 <= start < 1: that fraction of the run's steps; start >= 1: at that many tokens
    train: list[SourceConfig] = field(default_factory=list)


@dataclass
class DataConfig:
    tokenizer: str = "mistral-v3"  # mistral-v3 | mistral-v1 | bundled-4k | an HF tokenizer folder | tokenizer.json
    train: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(path="bundled:train", name="bundled")])
    val: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(path="bundled:val", name="bundled")])
    shuffle: bool = True
    doc_mask: bool = True  # attention never crosses a document; RoPE positions restart per document
    encode_batch: int = 64  # documents tokenized per batch
    format: Literal["text", "shards"] = "text"  # shards: data.train entries are `kiln data prepare` folders
    shards: str = ""  # shorthand: one prepared folder as the only train source (implies format: shards)
    num_workers: int = 0  # DataLoader worker processes per rank (0: tokenize in the training process)
    shuffle_buffer: int = 10000  # streaming sources: documents per seeded shuffle window
    # rows per seeded shuffle window of each loader shard (kiln.data.rowshuffle); 0, 1 or shuffle=false: rows in
    # stream order.
    # A window must hold far more documents than ~10 batches have rows: 4096 rows of 257 tokens hold ~200 of
    # the bundled corpus's documents (up to 68 rows each), enough for 10 batches of 8 rows to reach ~85% of
    # the distinct documents of random rows (kiln data verify); it is more than the tiny preset's whole run
    # (~2,300 rows) and a small part of a 1B run's millions. Cost per shard: 2 windows of rows in memory
    # (2 x 4096 x (T+1) x 8 bytes: 17 MB at T=256, 134 MB at T=2048) and up to 2 windows re-tokenized on resume.
    row_shuffle: int = 4096
    remainder: Remainder = "carry"  # a document overflowing a row: continue it, or drop the rest
    on_exhausted: OnExhausted = "cycle"  # a source runs dry: next epoch / leave mix / stop
    # staged mixtures (mid-training, annealing mixes): stages replace data.train, each from its start on
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class OptimConfig:
    """Optimizer, LR schedule and LR scaling (kiln.optim).

    `lr` is the peak LR reached after warmup. With lr_scaling=sqrt it is instead the base LR for a global batch of 1
    sequence, and the peak is lr x sqrt(train.global_batch_size) (square-root scaling, as in the forgather guide)."""

    # adamw (fused on CUDA) | adafactor (factored 2nd moment) | muon (2-D weights; AdamW for the rest)
    # | adamw8bit (torchao, `pip install kiln[lowmem]`)
    name: OptimName = "adamw"
    lr: float = 3e-4
    lr_scaling: LRScaling = "none"  # sqrt: lr is the base LR for global batch 1 (see above)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: ScheduleKind = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine and WSD end at lr * min_lr_ratio; infinite anneals to it
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying
    decay_shape: DecayShape = "linear"  # WSD decay shape
    # infinite (InfiniteLR, arXiv 2503.02844): warmup -> cosine cooldown to the constant -> constant -> optional anneal.
    # cooldown steps = max(min_cooldown_tokens / tokens_per_step, cooldown_ratio x total_steps)
    constant_lr_ratio: float = 0.5357  # constant phase at lr x ratio (the forgather guide's 7.5e-6 / 1.4e-5)
    cooldown_ratio: float = 0.7
    min_cooldown_tokens: float = 100e9  # the forgather guide's default, 100B tokens
    anneal_steps: int = 0  # >0: the run's last N steps anneal geometrically to lr x min_lr_ratio
    # Adafactor (Shazeer & Stern 2018); the schedule supplies the step size
    adafactor_beta1: float | None = None  # None: no first moment (the memory-saving default)
    adafactor_decay_rate: float = 0.8  # beta2 at step t = 1 - t^-decay_rate
    adafactor_clip: float = 1.0  # update clipping threshold d on RMS(update)
    adafactor_eps: tuple[float, float] = (1e-30, 1e-3)  # (added to grad^2, floor on RMS(param))
    adafactor_scale_parameter: bool = False  # true: step = lr x max(eps[1], RMS(param)) (HF's scale_parameter)
    # Muon (Jordan 2024): updates scaled by 0.2 x sqrt(max(rows, cols)) to match AdamW's RMS, so
    # the Muon groups share lr and weight_decay with the AdamW groups
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_lr_ratio: float = 1.0  # Muon groups step at lr x ratio
    embed_lr_ratio: float = 1.0  # muon, untied: the input embedding (an AdamW group) steps at lr x ratio
    # bf16 parameters without an fp32 master copy (adafactor, muon): the trainer casts the model to
    # param_dtype; bf16 updates are rounded stochastically (unbiased) unless stochastic_rounding=false
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    stochastic_rounding: bool = True
    sr_seed: int = 0  # seeds the rounding noise generator (saved in the optimizer state)


@dataclass
class TrainConfig:
    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 8  # sequences per optimizer step, across accumulation and data-parallel ranks
    total_tokens: int = 0  # 0: Chinchilla default, 20 x parameters
    max_steps: int = 0  # >0 overrides the token budget
    stop_at_step: int = 0  # >0: save and exit after this step; the schedule still spans the whole run
    # a wall-clock budget ("90s", "10m", "8h", "1h30m") instead of a step or token count: the run times its
    # steps, evals and a checkpoint during the LR warmup, then fixes the steps that fit (saved, so a
    # resume follows the same schedule); evals and checkpoints count against it
    time_budget: str = ""
    target_loss: float = 0.0  # >0: stop once an eval loss (or target_metric) reaches it; report time/tokens/cost to it
    target_metric: str = "eval_loss"  # the eval key target_loss watches, e.g. eval/heldout-next/acc_norm (higher wins)
    ema_decay: float = 0.0  # >0: keep an EMA of the weights (w_ema <- d w_ema + (1 - d) w each step), in checkpoints
    # downstream multiple-choice tasks scored at every eval (eval/<task>/acc, acc_norm): "heldout-next"
    # (bundled: the true next sentence among others), or jsonl files in the HellaSwag / ARC / MMLU layouts
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_limit: int = 200  # items per task: the same first N at every eval
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    dtype: DType = "auto"  # auto: bf16 autocast on CUDA and bf16-capable CPUs, else fp32 (kiln.device)
    log_every: int = 10
    eval_every: int = 200
    eval_tokens: int = 65536  # tokens scored per validation source at each eval
    save_every: int = 200
    keep_last: int = 3  # checkpoints kept (the newest); 0 keeps all
    keep_best: int = 0  # also keep the K checkpoints with the best keep_best_metric (saved right after an eval)
    keep_best_metric: str = "eval_loss"  # lower is better; keys with "acc" or "exact_match" higher (higher_is_better)
    checkpoint_url: str = ""  # also mirror checkpoints to this fsspec URL (s3://..., gs://...); resume from it
    async_checkpoint: bool = False  # write checkpoints in the background (a CPU copy of the state meanwhile)
    save_every_minutes: float = 0.0  # >0: also checkpoint when this much wall time passed since the last save
    step_cadence: float = 1.0  # multiplies log_every, eval_every and save_every (forgather's step cadence)
    divergence_threshold: float = 1.0  # abort when the fast loss EMA exceeds the slow one by this (0: off)
    spike_z: float = 0.0  # >0: flag steps whose loss or grad norm is this many std devs above normal
    skip_spikes: bool = False  # with spike_z: do not apply a flagged step's update
    sample_every: int = 0  # >0: print a sample (train.sample_prompt, sample_tokens) every N steps; one process
    sample_prompt: str = "The"
    sample_tokens: int = 48
    compile: bool = False
    compile_mode: CompileMode = "block"  # torch.compile each Block, or the whole trunk
    # recompute activations in backward: full = whole blocks, selective = all but matmul/attention outputs
    activation_checkpointing: ACMode = "none"
    loss_impl: LossImpl = "auto"  # auto: liger on CUDA if installed, else chunked
    # >0: the gradient gives this share of each target to the ids no batch has targeted yet (label smoothing onto
    # them), so text outside the corpus does not find them at ~0 probability; the logged loss stays plain
    # cross-entropy. It acts where an untied head starts at zero (model.init_zero_out), whose equal rows find
    # those ids, in the chunked loss; elsewhere the run says it does nothing (kiln.train.objective.unseen_smoothing_blocker)
    unseen_smoothing: float = 0.0
    fp8: bool = False  # torchao float8 training for the block linears (Hopper or newer GPUs)


@dataclass
class ParallelConfig:
    """Layout over torchrun's processes: pp x dp_replicate x dp_shard x tp must equal the world size."""

    dp_replicate: int = 1  # data-parallel replicas (DDP alone; HSDP's replicate dim with dp_shard > 1)
    dp_shard: int = 1  # FSDP2 shards
    tp: int = 1  # tensor (+ sequence) parallel degree
    pp: int = 1  # pipeline stages (ranks); interleaved / V schedules put 2 stages on each rank
    pp_schedule: PipelineSchedule = "1F1B"
    pp_microbatches: int = 0  # microbatches per pipeline step; 0 = pp x stages per rank


@dataclass
class RunConfig:
    name: str = ""
    out_dir: str = ""  # default runs/<name>
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    init_from: str = ""  # checkpoint or run folder whose weights start a new run (not its optimizer or data)
    cost_per_hour: float = 0.0  # $ per hour for all devices of the run: logs cost_usd and tokens_per_usd
    wandb: bool = False  # also log to Weights & Biases (pip install wandb); a wandb_project turns it on too
    wandb_project: str = ""  # default: $WANDB_PROJECT, else "kiln"
    wandb_entity: str = ""  # W&B team or user; default: wandb's own default
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: wandb reads WANDB_MODE


@dataclass
class PostTrainConfig:
    """SFT / DPO / RLVR (kiln.posttrain). Pretraining ignores this section. Batch sizes are train.*:
    rows of train.seq_len tokens for SFT, preference pairs for DPO, prompts for RLVR."""

    data: str = ""  # jsonl file (or HF dataset name) of the stage; `kiln sft|dpo|rlvr --data` sets it
    val_data: str = ""  # held-out file of the same format; empty: no eval records
    split: str = "train"  # split, when data is an HF dataset name (NAME or NAME:CONFIG)
    val_split: str = "test"  # split of val_data, when it is an HF dataset name
    chat_template: str = "auto"  # auto: the tokenizer's own, else kiln's default | kiln | PATH to a .jinja file
    epochs: float = 1.0  # passes over the data when train.max_steps and train.total_tokens are 0
    pack: bool = True  # SFT: several conversations per row, attention kept within each (document masks)
    beta: float = 0.1  # DPO/APO: scale of the implicit reward beta * log(pi / pi_ref)
    loss: PrefLoss = "sigmoid"  # DPO (Rafailov et al. 2023) | APO-zero / APO-down (D'Oosterlinck et al. 2024)
    ref: Literal["copy", "precomputed"] = "copy"  # DPO reference: frozen copy, or log-probs computed once
    group_size: int = 8  # RLVR: completions sampled per prompt (GRPO group)
    kl_coef: float = 0.04  # RLVR: weight of KL(policy || reference), k3 estimator
    rewards: list[str] = field(default_factory=lambda: ["numeric"])  # RLVR verifiers, summed; see kiln.posttrain.rewards
    max_new_tokens: int = 64  # RLVR completion length limit
    temperature: float = 1.0  # RLVR sampling
    top_k: int = 0
    top_p: float = 1.0
    # peak LR of the pretraining run this model descends from; kiln sft|dpo|rlvr record it and derive
    # their default optim.lr from it (kiln.posttrain.lr). 0: the source is a pretraining run (its optim.lr)
    pretrain_lr: float = 0.0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks and dotted-key errors.


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and getattr(tp, "shorthand", None):  # a source given by its path alone
            value = {tp.shorthand: value}
        if not isinstance(value, dict):  # `train:` with every key under it commented out is null: said as such
            got = "nothing (an empty entry: remove it or give it keys)" if value is None else type(value).__name__
            raise ConfigError(f"{where}: {key}: expected a mapping, got {got}")
        return build(tp, value, where=where, prefix=key)
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str) and item_tp is str:  # --train.eval_tasks a,b on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif (isinstance(value, str) and getattr(item_tp, "shorthand", None)) or \
                (isinstance(value, dict) and dataclasses.is_dataclass(item_tp)):  # one entry, written without its list
            value = [value]  # --data.train my.jsonl
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}: {key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
            value = int(value)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: {key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # YAML reads `--train.time_budget 300` (seconds) or `--run.name 7` as a number
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} at {key}")


# Keys that moved: a config naming the old key gets a one-line error that names the new one; a config
# saved in an older checkpoint is read with the old key moved (config_from_dict).
RENAMED = {"parallel.compile": "train.compile", "parallel.activation_checkpointing": "train.activation_checkpointing"}


def _migrate(tree: dict[str, Any]) -> dict[str, Any]:
    """A saved config tree with RENAMED keys moved to their new place (the new key wins when both are set)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for old, new in RENAMED.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        section = tree.get(osec)
        if isinstance(section, dict) and okey in section:
            value = section.pop(okey)
            target = tree.setdefault(nsec, {})
            if isinstance(target, dict) and target.get(nkey) in (None, False, "none"):
                target[nkey] = value
    return tree


# names other trainers give these keys (HF TrainingArguments, nanoGPT, litgpt)
SYNONYMS = {"learning_rate": "lr", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
            "gradient_accumulation_steps": "global_batch_size", "steps": "max_steps", "max_iters": "max_steps",
            "warmup": "warmup_steps", "max_grad_norm": "grad_clip", "block_size": "seq_len",
            "n_embd": "d_model", "hidden_size": "d_model", "n_layer": "n_layers", "n_head": "n_heads",
            "output_dir": "out_dir"}


def _suggest(key: str, names: set[str], prefix: str) -> str | None:
    """The key meant by a misspelt or foreign one: a synonym or the closest spelling in its own section, else
    the section that has it (train.lr -> optim.lr). Deterministic."""
    import difflib

    name = SYNONYMS.get(key, key)
    close = [name] if name in names else difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    if close:
        return f"{prefix + '.' if prefix else ''}{close[0]}"
    hints = typing.get_type_hints(Config)
    return next((f"{f.name}.{name}" for f in dataclasses.fields(Config) if f.name != prefix and
                 dataclasses.is_dataclass(hints[f.name]) and name in {g.name for g in dataclasses.fields(hints[f.name])}),
                None)


def build(cls: type, data: dict[str, Any], *, where: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            if key in RENAMED:
                raise ConfigError(f"{where}: '{key}' is now '{RENAMED[key]}'; use --{RENAMED[key]} (or rename the key)")
            meant = _suggest(str(k), names, prefix)
            hint = f" (did you mean {meant}?)" if meant else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        kwargs[k] = _coerce(v, hints[k], key, where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain-data view of a config (lists for tuples) for YAML and checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (configs/<name>.yaml) or a path to a YAML file. A folder of the preset's name in the working
    directory (a run or an export called `demo`) does not hide the preset."""
    p = Path(name_or_path)
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if p.is_dir() and p.suffix not in (".yaml", ".yml") and preset.is_file():
        return preset
    if p.suffix in (".yaml", ".yml") or p.exists():
        if p.is_dir():
            raise ConfigError(f"{name_or_path}: a folder, not a config file; pass a YAML file or one of the presets: "
                              f"{', '.join(list_presets())}")
        if not p.is_file():
            raise ConfigError(f"{name_or_path}: no such config file; presets are: {', '.join(list_presets())}")
        return p
    if not preset.is_file():
        raise ConfigError(f"unknown preset '{name_or_path}'; presets are: {', '.join(list_presets())}")
    return preset


def load_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, following `base: <preset or path>` (single inheritance)."""
    data = yamlfile.read(path)
    base_path = _base_of(path, data.pop("base", None))
    build(Config, data, where=str(path))  # an unknown key or a bad type is this file's, not the one built on it
    if base_path is None:
        return data
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: base: inheritance cycle through {base_path}")
    return _merge(load_yaml_tree(base_path, (*seen, path.resolve())), data)


def _base_of(path: Path, base: Any) -> Path | None:
    """The file a config's `base:` names: a preset, or a path beside it."""
    if base is None:
        return None
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a preset name or a path")
    base_path = resolve_preset(base) if (PRESET_DIR / f"{base}.yaml").exists() else path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: '{base}' is neither a preset nor a file beside it ({base_path}); presets "
                          f"are: {', '.join(list_presets())}")
    return base_path


def _at_fault(path: Path, err: ConfigError) -> ConfigError:
    """A broken rule is the base's (the deepest such file) when the base alone breaks it the same way."""
    base = _base_of(path, yamlfile.read(path).get("base"))
    if base is None:
        return err
    try:
        validate(build(Config, load_yaml_tree(base), where=str(base)), where=str(base))
    except ConfigError as e:
        if str(e).removeprefix(f"{base}: ") == str(err).removeprefix(f"{path}: "):
            return _at_fault(base, e)
    return err


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--section.key VALUE` pairs (or `--section.key=VALUE`) into a nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            if i >= 2 and "=" not in args[i - 2] and Path(args[i - 1]).exists() and Path(arg).exists():
                raise ConfigError(f"unexpected argument '{arg}' after {args[i - 2]} {args[i - 1]}: a glob the shell "
                                  f"expanded? quote it ({args[i - 2]} 'data/*.jsonl') so kiln expands it")
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --train.max_steps 50")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or re.match(r"--[a-z_]+\.[a-z_]", args[i + 1]):  # the next flag is no value
                raise ConfigError(f"{arg}: missing value" + (f" before {args[i + 1]} (an empty one: {arg} '')"
                                                             if i + 1 < len(args) else ""))
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:  # a bare string stays one; a list or object that does not parse is said
            if raw.lstrip()[:1] in ("[", "{"):
                raise ConfigError(f"--{key}: not valid JSON/YAML ({str(e).splitlines()[0]}): {raw[:60]}") from None
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: conflicts with another override")
        node[parts[-1]] = value
    return out


def split_preset(argv: list[str]) -> tuple[str | None, list[str]]:
    """(PRESET, rest) when argv's first word is a preset name or YAML path, else (None, argv).

    PRESET is only ever the first word: a parser with an optional positional would take an override's value for it
    (`kiln bench --train.seq_len 512` must not mean preset "512")."""
    if argv and not argv[0].startswith("-"):
        return argv[0], list(argv[1:])
    return None, list(argv)


def load_config(preset: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Preset name or YAML path, plus `--a.b value` overrides -> validated Config."""
    path = resolve_preset(preset)
    tree = load_yaml_tree(path)
    cfg = build(Config, tree, where=str(path))
    where = str(path)  # a bad value is the file's (or its base's: _at_fault), unless the file alone passes
    if overrides:
        over = parse_overrides(overrides)
        if over.get("run", {}).get("out_dir") == "":  # "$OUT" unset: runs/<name> would resume another run
            raise ConfigError(f"--run.out_dir is empty; pass a folder, or leave it out for runs/{cfg.run.name or path.stem}")
        with contextlib.suppress(ConfigError):  # else the file is at fault, unless the overrides repair it
            validate(cfg, where=where)
            where = "command line"
        cfg = build(Config, _merge(to_dict(cfg), over), where="command line")
    if not cfg.run.name:
        cfg.run.name = path.stem
    if not cfg.run.out_dir:
        cfg.run.out_dir = str(Path("runs") / cfg.run.name)
    try:
        validate(cfg, where=where)
    except ConfigError as e:
        raise (_at_fault(path, e) if where == str(path) else e) from None
    return cfg


def config_from_dict(tree: dict[str, Any], *, where: str) -> Config:
    """Rebuild a Config saved in a checkpoint or run directory (keys renamed since are moved)."""
    cfg = build(Config, _migrate(tree), where=where)
    validate(cfg, where=where)
    return cfg


def _validate_optim(o: OptimConfig, *, where: str, parallel: ParallelConfig | None = None) -> None:
    """Ranges of the optimizer and schedule knobs (kiln.optim), and optimizers a layout cannot run."""
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"{where}: optim.lr: must be a positive number, got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"{where}: optim.min_lr_ratio: must be within [0, 1], got {o.min_lr_ratio}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"{where}: optim.decay_fraction: must be within (0, 1], got {o.decay_fraction}")
    ranges = {"optim.constant_lr_ratio": (o.constant_lr_ratio, 0.0, 1.0),
              "optim.cooldown_ratio": (o.cooldown_ratio, 0.0, 1.0),
              "optim.muon_momentum": (o.muon_momentum, 0.0, 0.999999),
              "optim.betas[0]": (o.betas[0], 0.0, 0.999999), "optim.betas[1]": (o.betas[1], 0.0, 0.999999)}
    if o.adafactor_beta1 is not None:
        ranges["optim.adafactor_beta1"] = (o.adafactor_beta1, 0.0, 0.999999)
    for key, (v, lo, hi) in ranges.items():
        if not lo <= v <= hi:
            raise ConfigError(f"{where}: {key}: must be within [{lo:g}, {hi:g}], got {v}")
    _check(where, {"optim.min_cooldown_tokens": (o.min_cooldown_tokens, ">= 0"), "optim.eps": (o.eps, "> 0"),
                   "optim.anneal_steps": (o.anneal_steps, ">= 0"), "optim.weight_decay": (o.weight_decay, ">= 0"),
                   **{f"optim.adafactor_eps[{i}]": (e, "> 0") for i, e in enumerate(o.adafactor_eps)},
                   **{f"optim.{k}": (getattr(o, k), "> 0") for k in ("adafactor_clip", "adafactor_decay_rate",
                                                                     "muon_ns_steps", "muon_lr_ratio", "embed_lr_ratio")}})
    if o.schedule == "infinite" and o.anneal_steps and o.min_lr_ratio <= 0:
        raise ConfigError(f"{where}: optim.min_lr_ratio: the infinite schedule's anneal is geometric and needs "
                          "a ratio > 0 (e.g. 0.1), or set optim.anneal_steps 0")
    if o.schedule == "infinite" and o.anneal_steps and o.min_lr_ratio > o.constant_lr_ratio:
        raise ConfigError(f"{where}: optim.min_lr_ratio ({o.min_lr_ratio:g}) is above optim.constant_lr_ratio "
                          f"({o.constant_lr_ratio:g}): the anneal would raise the LR; lower min_lr_ratio")
    if o.name == "adafactor" and parallel is not None and (parallel.dp_shard > 1 or parallel.tp > 1):
        raise ConfigError(f"{where}: optim.name=adafactor cannot run on sharded parameters (parallel.dp_shard "
                          f"{parallel.dp_shard}, parallel.tp {parallel.tp}); use optim.name=muon or adamw")
    if o.param_dtype == "bf16" and o.name not in ("adafactor", "muon"):
        raise ConfigError(f"{where}: optim.param_dtype=bf16 needs optim.name=adafactor or muon (they round bf16 "
                          f"updates stochastically); {o.name} would stall, so use fp32 parameters with it")


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str, *, key: str = "train.time_budget", where: str = "<config>") -> float:
    """"90s", "10m", "8h", "1h30m", "45" (seconds) -> seconds; anything else is a ConfigError."""
    m = _DURATION.match(str(text).strip().lower())
    if not str(text).strip() or m is None or not any(m.groups()):
        raise ConfigError(f"{where}: {key}: expected a duration like 90s, 10m, 8h or 1h30m, got {text!r}")
    t = str(text).strip().lower()
    if m.group(3) and (m.group(1) or m.group(2)) and not t.endswith("s"):  # "1h30": minutes or seconds?
        raise ConfigError(f"{where}: {key}: {text!r} is ambiguous; write {t}m or {t}s (a unit on every part)")
    h, mins, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = 3600 * h + 60 * mins + s
    if seconds <= 0:
        raise ConfigError(f"{where}: {key}: must be longer than 0 s, got {text!r}")
    return seconds


def higher_is_better(metric: str) -> bool:
    """Accuracies improve upwards, losses and perplexities downwards."""
    return "acc" in metric or "exact_match" in metric


def validate_source(s: SourceConfig, i: int, *, where: str) -> None:
    """The checks every data source gets (config files, overrides, `kiln data prepare --source`)."""
    if not s.path:
        raise ConfigError(f"{where}: data source {i}: path is empty")
    if not (s.weight > 0 and math.isfinite(s.weight)):  # inf took every document from the other sources; nan failed late
        raise ConfigError(f"{where}: data source {s.path}: weight must be a positive finite number, got {s.weight}")
    if s.skip < 0 or s.take < 0:
        raise ConfigError(f"{where}: data source {s.path}: skip and take must be >= 0")


def _check(where: str, checks: dict[str, tuple[float, str]]) -> None:
    """{key: (value, rule)} with rule "> 0" or ">= 0": the first value breaking its rule is a ConfigError."""
    for key, (v, rule) in checks.items():
        if (rule == "> 0" and not v > 0) or (rule == ">= 0" and v < 0):
            raise ConfigError(f"{where}: {key}: must be {'positive' if rule == '> 0' else '>= 0'}, got {v}")
        if not math.isfinite(v):  # nan passed ">= 0", and inf is no setting (rlvr sampled every token alike)
            raise ConfigError(f"{where}: {key}: must be a finite number, got {v}")


def validate(cfg: Config, *, where: str) -> None:
    """Cross-field checks that a type system cannot express, section by section."""
    _validate_model(cfg.model, where=where)
    _check(where, {"run.cost_per_hour": (cfg.run.cost_per_hour, ">= 0")})
    _validate_train(cfg.train, cfg.optim, cfg.model, where=where)
    _validate_optim(cfg.optim, where=where, parallel=cfg.parallel)
    _validate_data(cfg.data, where=where)
    _validate_parallel(cfg.parallel, where=where)
    _validate_posttrain(cfg.posttrain, where=where)


def _validate_model(m: ModelConfig, *, where: str) -> None:
    _check(where, {"model.vocab_size": (m.vocab_size, "> 0"), "model.d_model": (m.d_model, "> 0"),
                   "model.n_layers": (m.n_layers, "> 0"), "model.n_heads": (m.n_heads, "> 0"),
                   "model.n_kv_heads": (m.n_kv_heads, "> 0"), "model.ffn_dim": (m.ffn_dim, "> 0"),
                   "model.max_seq_len": (m.max_seq_len, "> 0"), "model.head_dim": (m.head_dim, ">= 0"),
                   "model.nope_every": (m.nope_every, ">= 0"), "model.rope_theta": (m.rope_theta, "> 0"),
                   "model.norm_eps": (m.norm_eps, "> 0")})
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"{where}: model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"{where}: model.d_model ({m.d_model}) must be divisible by model.n_heads "
                          f"({m.n_heads}), or set model.head_dim")
    if m.hd % 2:
        raise ConfigError(f"{where}: model.head_dim ({m.hd}) must be even for RoPE")
    if m.residual == "deepnorm" and m.init != "deepnet":
        raise ConfigError(f"{where}: model.residual=deepnorm needs model.init=deepnet (DeepNet's beta init)")


def _validate_train(t: TrainConfig, o: OptimConfig, m: ModelConfig, *, where: str) -> None:
    _check(where, {"train.seq_len": (t.seq_len, "> 0"), "train.micro_batch_size": (t.micro_batch_size, "> 0"),
                   "train.global_batch_size": (t.global_batch_size, "> 0"), "train.log_every": (t.log_every, "> 0"),
                   "train.eval_every": (t.eval_every, "> 0"), "train.save_every": (t.save_every, "> 0"),
                   "train.total_tokens": (t.total_tokens, ">= 0"), "train.max_steps": (t.max_steps, ">= 0"),
                   "optim.warmup_steps": (o.warmup_steps, ">= 0"), "train.keep_last": (t.keep_last, ">= 0"), "train.keep_best": (t.keep_best, ">= 0"),
                   "train.stop_at_step": (t.stop_at_step, ">= 0"), "train.target_loss": (t.target_loss, ">= 0"),
                   "train.eval_tasks_limit": (t.eval_tasks_limit, "> 0"), "train.sample_every": (t.sample_every, ">= 0"),
                   "train.save_every_minutes": (t.save_every_minutes, ">= 0"), "train.grad_clip": (t.grad_clip, ">= 0"),
                   "train.divergence_threshold": (t.divergence_threshold, ">= 0"), "train.spike_z": (t.spike_z, ">= 0")})
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"{where}: train.ema_decay: must be within [0, 1) (0: off; 0.999 averages about the last "
                          f"1000 steps), got {t.ema_decay}")
    if not 0 <= t.unseen_smoothing < 1:
        raise ConfigError(f"{where}: train.unseen_smoothing: must be within [0, 1) (0: off), got {t.unseen_smoothing}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"{where}: train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if t.sample_tokens >= m.max_seq_len:  # the sample's prompt needs a token of the context too
        raise ConfigError(f"{where}: train.sample_tokens ({t.sample_tokens}) must be below model.max_seq_len ({m.max_seq_len}); 0: none")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"{where}: train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({t.micro_batch_size})")
    if t.time_budget:
        parse_duration(t.time_budget, where=where)
        if t.max_steps > 0:
            raise ConfigError(f"{where}: train.time_budget ({t.time_budget}) and train.max_steps ({t.max_steps}) both "
                              "set the run's length; set one of them (the budget replaces train.total_tokens; "
                              "--train.time_budget '' turns a preset's budget off)")
        if o.warmup_steps < 3 and o.schedule != "constant":
            raise ConfigError(f"{where}: train.time_budget times the steps of the LR warmup (whose LR does not depend "
                              f"on the run's length) before fixing it; set optim.warmup_steps >= 3 (got {o.warmup_steps})")
    if t.target_metric != "eval_loss" and not t.target_loss:  # it said nothing, and nothing stopped at it
        raise ConfigError(f"{where}: train.target_metric {t.target_metric} has no effect without train.target_loss; "
                          "set train.target_loss X to stop when it reaches X, or drop it")
    if t.target_loss > 1 and higher_is_better(t.target_metric):
        raise ConfigError(f"{where}: train.target_loss {t.target_loss:g} on {t.target_metric} can never be reached: "
                          "accuracies lie in [0, 1] (e.g. 0.6 stops at 60% accuracy)")
    for key, metric in (("train.target_metric", t.target_metric), ("train.keep_best_metric", t.keep_best_metric)):
        if metric != "eval_loss" and not metric.startswith(("eval_loss/", "eval/")):
            raise ConfigError(f"{where}: {key}: expected eval_loss, eval_loss/<source> or eval/<task>/<metric> "
                              f"(an eval record key), got {metric!r}")


def _validate_data(d: DataConfig, *, where: str) -> None:
    if not d.train:
        raise ConfigError(f"{where}: data.train: at least one source is needed")
    for i, s in enumerate([*d.train, *d.val]):
        validate_source(s, i, where=where)
    _check(where, {"data.num_workers": (d.num_workers, ">= 0"), "data.shuffle_buffer": (d.shuffle_buffer, ">= 0"),
                   "data.row_shuffle": (d.row_shuffle, ">= 0"), "data.encode_batch": (d.encode_batch, "> 0")})
    if d.stages:
        _validate_stages(d, where=where)
    elif d.shards and d.train != DataConfig().train:  # said at load, so --dry-run and doctor say it too
        raise ConfigError(f"{where}: data.shards ({d.shards}) and data.train ({', '.join(s.path for s in d.train)}) "
                          "are both set; data.shards replaces data.train: drop one, or list the prepared folders in "
                          "data.train with data.format=shards")
    for key, value, default in (("remainder", d.remainder, "carry"), ("on_exhausted", d.on_exhausted, "cycle")):
        if (d.format == "shards" or d.shards) and value != default:
            raise ConfigError(f"{where}: data.{key}={value} applies to text sources; prepared shards are cut into "
                              f"fixed blocks and repeat them (use data.{key}={default}, or data.format=text)")


def _validate_stages(d: DataConfig, *, where: str) -> None:
    if d.train != DataConfig().train or d.shards:
        raise ConfigError(f"{where}: data.stages replaces data.train (and data.shards): list each stage's sources "
                          "under its own train key and leave data.train unset")
    starts = [s.start for s in d.stages]
    if starts[0] != 0:
        raise ConfigError(f"{where}: data.stages[0].start: the first stage starts at 0, got {starts[0]:g}")
    for i, s in enumerate(d.stages):
        if s.start < 0:
            raise ConfigError(f"{where}: data.stages[{i}].start: must be >= 0, got {s.start:g}")
        if not s.train:
            raise ConfigError(f"{where}: data.stages[{i}].train: a stage needs at least one source")
        for j, src in enumerate(s.train):
            validate_source(src, j, where=f"{where}: data.stages[{i}]")
    kinds = {s.start < 1 for s in d.stages[1:]}
    if len(kinds) > 1:
        raise ConfigError(f"{where}: data.stages: give every start as a fraction of the run (0 <= start < 1) or "
                          "every start as a token count (>= 1), not both")
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ConfigError(f"{where}: data.stages: starts must increase, got {', '.join(f'{x:g}' for x in starts)}")


def _validate_parallel(p: ParallelConfig, *, where: str) -> None:
    for key, v in {"parallel.dp_replicate": p.dp_replicate, "parallel.dp_shard": p.dp_shard,
                   "parallel.tp": p.tp, "parallel.pp": p.pp}.items():
        if v < 1:
            raise ConfigError(f"{where}: {key}: must be >= 1, got {v}")
    _check(where, {"parallel.pp_microbatches": (p.pp_microbatches, ">= 0")})


def _validate_posttrain(pt: PostTrainConfig, *, where: str) -> None:
    _check(where, {"posttrain.beta": (pt.beta, "> 0"), "posttrain.epochs": (pt.epochs, "> 0"),
                   "posttrain.group_size": (pt.group_size, "> 0"), "posttrain.max_new_tokens": (pt.max_new_tokens, "> 0"),
                   "posttrain.top_p": (pt.top_p, "> 0"), "posttrain.kl_coef": (pt.kl_coef, ">= 0"),
                   "posttrain.temperature": (pt.temperature, ">= 0"), "posttrain.top_k": (pt.top_k, ">= 0"),
                   "posttrain.pretrain_lr": (pt.pretrain_lr, ">= 0")})
    if pt.top_p > 1:
        raise ConfigError(f"{where}: posttrain.top_p: must be within (0, 1], got {pt.top_p}")


def merge_config(cfg: Config, tree: dict[str, Any], *, where: str) -> Config:
    """`cfg` with the nested dict `tree` merged over it (e.g. from parse_overrides), validated."""
    out = build(Config, _merge(to_dict(cfg), tree), where=where)
    validate(out, where=where)
    return out
