"""One typed config tree: dataclasses, YAML presets, dotted CLI overrides, validation.

Every user mistake (unknown key, wrong type, impossible combination) raises `ConfigError`
naming the file and the dotted key, at load time, before any model or data work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from kiln.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"

AttentionBackend = Literal["eager", "sdpa", "flex", "flash"]
InitScheme = Literal["normal", "trunc_normal", "deepnet"]
ResidualKind = Literal["prenorm", "deepnorm"]
ScheduleKind = Literal["cosine", "wsd", "constant"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]
DType = Literal["auto", "fp32", "bf16"]


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
    nope_every: int = 0  # >0: layers with (i + 1) % nope_every == 0 skip RoPE (hybrid NoPE, seed 002)
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (seed 002)
    residual: ResidualKind = "prenorm"  # deepnorm: post-norm with x*alpha residual (DeepNet, seed 001)
    attention: AttentionBackend = "sdpa"
    init: InitScheme = "normal"
    init_std: float = 0.02  # used by init=normal

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

    path: str = ""
    name: str = ""  # label used in metrics; defaults to the file stem
    weight: float = 1.0
    text_column: str = "text"
    hf_config: str = ""  # HF dataset config name (e.g. "sample-10BT")
    split: str = "train"
    txt_sample_by: Literal["document", "paragraph", "line"] = "document"


@dataclass
class DataConfig:
    tokenizer: str = "mistral-v3"  # mistral-v3 | mistral-v1 | path to an HF tokenizer folder or tokenizer.json
    train: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(path="bundled:train", name="bundled")])
    val: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(path="bundled:val", name="bundled")])
    shuffle: bool = True
    doc_mask: bool = True  # attention never crosses a document; RoPE positions restart per document
    encode_batch: int = 64  # documents tokenized per batch


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: ScheduleKind = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine and WSD end at lr * min_lr_ratio
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying
    decay_shape: DecayShape = "linear"  # WSD decay shape


@dataclass
class TrainConfig:
    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 8  # sequences per optimizer step, across accumulation and data-parallel ranks
    total_tokens: int = 0  # 0: Chinchilla default, 20 x parameters
    max_steps: int = 0  # >0 overrides the token budget
    stop_at_step: int = 0  # >0: save and exit after this step; the schedule still spans the whole run
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    dtype: DType = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    log_every: int = 10
    eval_every: int = 200
    eval_tokens: int = 65536  # tokens scored per validation source at each eval
    save_every: int = 200
    keep_last: int = 3  # checkpoints kept (the newest); 0 keeps all
    sample_every: int = 0  # >0: print a generated sample every N steps
    sample_prompt: str = "The"
    sample_tokens: int = 48
    compile: bool = False


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"


@dataclass
class RunConfig:
    name: str = ""
    out_dir: str = ""  # default runs/<name>
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    init_from: str = ""  # checkpoint or run folder whose weights start a new run (not its optimizer or data)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


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
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, where=where, prefix=key)
    if origin is list:
        (item_tp,) = get_args(tp)
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
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} at {key}")


def build(cls: type, data: dict[str, Any], *, where: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = [n for n in names if n.startswith(str(k)[:3])]
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
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
    """A preset name (configs/<name>.yaml) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{name_or_path}: no such config file; presets are: {', '.join(list_presets())}")
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown preset '{name_or_path}'; presets are: {', '.join(list_presets())}")
    return preset


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{at} malformed YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run, model, data, optim, train, parallel)")
    return data


def load_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, following `base: <preset or path>` (single inheritance)."""
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a preset name or a path")
    base_path = resolve_preset(base) if (PRESET_DIR / f"{base}.yaml").exists() else path.parent / base
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: base: inheritance cycle through {base_path}")
    return _merge(load_yaml_tree(base_path, (*seen, path.resolve())), data)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--section.key VALUE` pairs (or `--section.key=VALUE`) into a nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --train.max_steps 50")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: missing value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(preset: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Preset name or YAML path, plus `--a.b value` overrides -> validated Config."""
    path = resolve_preset(preset)
    tree = load_yaml_tree(path)
    cfg = build(Config, tree, where=str(path))
    if overrides:
        over = parse_overrides(overrides)
        cfg = build(Config, _merge(to_dict(cfg), over), where="command line")
    if not cfg.run.name:
        cfg.run.name = path.stem
    if not cfg.run.out_dir:
        cfg.run.out_dir = str(Path("runs") / cfg.run.name)
    validate(cfg, where=str(path))
    return cfg


def config_from_dict(tree: dict[str, Any], *, where: str) -> Config:
    """Rebuild a Config saved in a checkpoint or run directory."""
    cfg = build(Config, tree, where=where)
    validate(cfg, where=where)
    return cfg


def validate(cfg: Config, *, where: str) -> None:
    """Cross-field checks that a type system cannot express."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads, "model.ffn_dim": m.ffn_dim,
        "model.max_seq_len": m.max_seq_len, "train.seq_len": t.seq_len,
        "train.micro_batch_size": t.micro_batch_size, "train.global_batch_size": t.global_batch_size,
        "train.log_every": t.log_every, "train.eval_every": t.eval_every, "train.save_every": t.save_every,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{where}: {key}: must be positive, got {v}")
    for key, v in {"train.total_tokens": t.total_tokens, "train.max_steps": t.max_steps,
                   "model.head_dim": m.head_dim, "model.nope_every": m.nope_every,
                   "optim.warmup_steps": o.warmup_steps, "train.keep_last": t.keep_last,
                   "train.stop_at_step": t.stop_at_step}.items():
        if v < 0:
            raise ConfigError(f"{where}: {key}: must be >= 0, got {v}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"{where}: model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"{where}: model.d_model ({m.d_model}) must be divisible by model.n_heads "
                          f"({m.n_heads}), or set model.head_dim")
    if m.hd % 2:
        raise ConfigError(f"{where}: model.head_dim ({m.hd}) must be even for RoPE")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"{where}: train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"{where}: train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({t.micro_batch_size})")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"{where}: optim.lr: must be a positive number, got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"{where}: optim.min_lr_ratio: must be within [0, 1], got {o.min_lr_ratio}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"{where}: optim.decay_fraction: must be within (0, 1], got {o.decay_fraction}")
    if m.residual == "deepnorm" and m.init != "deepnet":
        raise ConfigError(f"{where}: model.residual=deepnorm needs model.init=deepnet (DeepNet's beta init)")
    if not cfg.data.train:
        raise ConfigError(f"{where}: data.train: at least one source is needed")
    for i, s in enumerate([*cfg.data.train, *cfg.data.val]):
        if not s.path:
            raise ConfigError(f"{where}: data source {i}: path is empty")
        if s.weight <= 0:
            raise ConfigError(f"{where}: data source {s.path}: weight must be positive")
    p = cfg.parallel
    for key, v in {"parallel.dp_replicate": p.dp_replicate, "parallel.dp_shard": p.dp_shard,
                   "parallel.tp": p.tp, "parallel.pp": p.pp}.items():
        if v < 1:
            raise ConfigError(f"{where}: {key}: must be >= 1, got {v}")
