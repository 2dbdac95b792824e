"""The one place the trainer gets its data from: a config -> the training batch source and the
validation sets. (kiln.train.objective.Objective.train_data / val_data call these.)

Checkpointing the training source (`state_dict()` is plain python data):
  * text sources (data.format=text): every data-parallel rank has its own position. Save every
    rank's state (a list indexed by dp rank) or each rank's own; `load_state_dict` takes either.
    Resuming needs the same dp size and data.num_workers (a DataError says so otherwise).
  * prepared shards (data.format=shards): the state is the global position, identical on every rank;
    saving rank 0's is enough, and it loads under any dp size, micro-batch size or num_workers
    (`load_state_dict(any rank's state)`, or `load_resharded_state(all ranks' states)`, which also
    checks that they agree). With the same train.global_batch_size every optimizer step after the
    resume sees exactly the samples it would have seen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from kiln.config import DataConfig, SourceConfig
from kiln.data.diversity import BATCHES, Diversity, shard_diversity, text_diversity
from kiln.data.loader import PackedLoader, validation_batches
from kiln.data.packing import Batch
from kiln.data.shards import PLAN, ShardLoader, check_manifest_tokenizer, read_manifest, shard_validation_sets
from kiln.data.sources import is_prepared, source_name
from kiln.data.stages import StagedLoader
from kiln.data.tokenizer import Tokenizer
from kiln.errors import DataError


@dataclass(frozen=True)
class Batching:
    """How a loader cuts and orders rows: train.seq_len, train.micro_batch_size and run.seed."""

    seq_len: int
    batch_size: int
    seed: int


def train_sources(d: DataConfig) -> list[SourceConfig]:
    """data.train, or the single prepared folder named by data.shards (then data.train is left at its default:
    kiln.config refuses both)."""
    if not d.shards:
        return list(d.train)
    return [SourceConfig(path=d.shards, name="shards")]


def uses_shards(d: DataConfig) -> bool:
    return d.format == "shards" or bool(d.shards)


def check_prepared_sources(d: DataConfig, tokenizer: Tokenizer | None = None) -> None:
    """With data.format=shards (or data.shards), every training source (each stage's too) must be a finished
    `kiln data prepare` folder, and, given the run's tokenizer, prepared with it: one line each, from the
    manifests alone (the loader opens the shards; `--dry-run` checks this much)."""
    if not uses_shards(d):
        return
    for s in [src for st in d.stages for src in st.train] if d.stages else train_sources(d):
        if s.path.startswith("bundled:"):
            raise DataError(f"{s.path}: data.format=shards needs folders written by `kiln data prepare`, and "
                            f"data.train is the bundled corpus; run `kiln data prepare --source {s.path} --out "
                            "DIR` and train with --data.shards DIR (or set data.format=text)")
        path = Path(s.path).expanduser()
        if path.exists() and not is_prepared(s.path) and not (path / PLAN).is_file():  # PLAN: unfinished, said below
            prepare = (f"--source {s.path} --out DIR` and pass DIR" if path.is_file() else
                       f"--source ... --out {s.path}`")
            raise DataError(f"{s.path}: data.format=shards needs folders written by `kiln data prepare` "
                            f"(no manifest.json here); run `kiln data prepare {prepare} or set data.format=text")
        manifest = read_manifest(s.path)  # a missing folder, an unfinished prepare, another format
        if tokenizer is not None:
            check_manifest_tokenizer(s.path, manifest, tokenizer)


def build_train_source(d: DataConfig, tokenizer: Tokenizer, b: Batching, *, dp_rank: int = 0, dp_world: int = 1
                       ) -> PackedLoader | ShardLoader | StagedLoader:
    """The training batch source of data-parallel rank `dp_rank` of `dp_world` (tensor/pipeline peers
    pass the same dp rank and get identical batches); with data.stages, one loader per stage in turn
    (kiln.data.stages; the trainer gives it the stages' first steps)."""
    if d.stages:
        return StagedLoader(d, lambda stage, offset: build_train_source(
            stage, tokenizer, dataclasses.replace(b, seed=b.seed + offset), dp_rank=dp_rank, dp_world=dp_world))
    sources = train_sources(d)
    if uses_shards(d):
        check_prepared_sources(d)
        return ShardLoader(sources, tokenizer, seq_len=b.seq_len, batch_size=b.batch_size, seed=b.seed,
                           shuffle=d.shuffle, rank=dp_rank, world_size=dp_world, num_workers=d.num_workers)
    for s in sources:
        if is_prepared(s.path):
            raise DataError(f"{s.path}: a prepared (pre-tokenized) folder; train from it with "
                            f"--data.format shards (or --data.shards {s.path})")
    return PackedLoader(sources, tokenizer, seq_len=b.seq_len, batch_size=b.batch_size, seed=b.seed,
                        shuffle=d.shuffle, rank=dp_rank, world_size=dp_world, encode_batch=d.encode_batch,
                        num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, row_shuffle=d.row_shuffle,
                        remainder=d.remainder, on_exhausted=d.on_exhausted)


def measure_diversity(d: DataConfig, tokenizer: Tokenizer, b: Batching, *, sources: list[SourceConfig] | None = None,
                      batches: int = BATCHES) -> Diversity:
    """The training batches' diversity (kiln.data.diversity) under these data settings and batching, over
    `sources` (default: the training sources)."""
    sources = train_sources(d) if sources is None else sources
    if uses_shards(d):
        return shard_diversity([s.path for s in sources], seq_len=b.seq_len, batch_size=b.batch_size,
                               seed=b.seed, shuffle=d.shuffle, weights=[s.weight for s in sources],
                               batches=batches)
    return text_diversity(sources, tokenizer, seq_len=b.seq_len, batch_size=b.batch_size, seed=b.seed,
                          batches=batches, shuffle=d.shuffle, encode_batch=d.encode_batch,
                          shuffle_buffer=d.shuffle_buffer, row_shuffle=d.row_shuffle, remainder=d.remainder,
                          on_exhausted=d.on_exhausted)


def build_val_sets(d: DataConfig, tokenizer: Tokenizer, b: Batching, *, max_tokens: int) -> dict[str, list[Batch]]:
    """Fixed evaluation batches per validation source, at most `max_tokens` each (a prepared folder gives
    one set per source it was prepared from). Names are unique: eval_loss/<name> and eval_ppl/<name>. Files of one
    name in different folders (a/val.jsonl, b/val.jsonl) are told apart by their folder (a-val, b-val)."""
    out: dict[str, list[Batch]] = {}
    names = [source_name(s) for s in d.val]
    folders = {n: {Path(s.path).parent for s, m in zip(d.val, names) if m == n} for n in names}

    def put(name: str, batches: list[Batch]) -> None:
        key, i = name, 2
        while key in out:
            key, i = f"{name}-{i}", i + 1
        out[key] = batches

    for s in d.val:
        if is_prepared(s.path):
            for name, batches in shard_validation_sets(s, tokenizer, seq_len=b.seq_len, batch_size=b.batch_size,
                                                       max_tokens=max_tokens).items():
                put(name, batches)
        else:
            name = source_name(s)
            if not s.name and len(folders[name]) > 1:
                name = f"{Path(s.path).parent.name}-{name}"
            put(name, validation_batches(s, tokenizer, seq_len=b.seq_len, batch_size=b.batch_size,
                                         max_tokens=max_tokens))
    return out

