"""The data factory as the trainer uses it: config -> train source and per-domain validation sets, and
a training run from prepared shards that resumes bitwise with another number of loader workers."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.config import SourceConfig, load_config
from kiln.data.loader import PackedLoader
from kiln.data.prepare import prepare
from kiln.data.shards import ShardLoader
from kiln.data.tokenizer import load_tokenizer, train_bpe
from kiln.errors import DataError
from kiln.train.metrics import read_metrics
from kiln.train.objective import Objective, RunSettings
from kiln.train.trainer import train
from test_train import losses, small_overrides, write_corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 300-id BPE trained on the toy corpus (a small vocabulary keeps the model fast), and train / val
    folders prepared with it (val: two sources, two domains)."""
    d = tmp_path_factory.mktemp("prepared")
    train_file = write_corpus(d / "train.jsonl", seed=0)
    text = d / "corpus.txt"
    text.write_text("\n".join(json.loads(line)["text"] for line in open(train_file)))
    train_bpe([text], vocab_size=300, out_dir=d / "tok")
    tok = str(d / "tok")
    prepare([SourceConfig(path=str(train_file))], d / "train", tokenizer=tok, workers=1, shard_docs=50, quiet=True)
    val_a, val_b = write_corpus(d / "prose.jsonl", n_docs=10, seed=1), write_corpus(d / "notes.jsonl", n_docs=10, seed=2)
    prepare([SourceConfig(path=str(val_a)), SourceConfig(path=str(val_b))], d / "val", tokenizer=tok, workers=1,
            quiet=True)
    return d


def overrides(tmp_path, prepared, **extra):
    over = small_overrides(tmp_path, **{"data.tokenizer": str(prepared / "tok"), "model.vocab_size": 320, **extra})
    if "data.shards" in extra:  # data.shards replaces data.train, which must then stay unset
        i = over.index("--data.train")
        del over[i:i + 2]
    return over


def configured(cfg) -> Objective:
    """Pretraining as the trainer configures it for `cfg`."""
    obj = Objective()
    obj.configure(RunSettings.of(cfg))
    return obj


def test_objective_builds_the_configured_sources(prepared, tmp_path):
    tok = load_tokenizer(str(prepared / "tok"))
    over = overrides(tmp_path, prepared, **{"data.shards": str(prepared / "train"), "data.num_workers": 2,
                                        "data.val": json.dumps([{"path": str(prepared / "val")},
                                                                {"path": str(tmp_path / "val.jsonl"), "name": "toy"}])})
    cfg = load_config("tiny", over)
    obj = configured(cfg)
    src = obj.train_data(tok, rank=1, world_size=2)
    assert isinstance(src, ShardLoader) and (src.rank, src.world_size, src.num_workers) == (1, 2, 2)
    assert src.next_batch().tokens.shape == (2, 32)
    state = src.state_dict()
    second = src.next_batch()
    src.close()
    again = obj.train_data(tok, rank=0, world_size=1)  # another dp size, and a list of all ranks' states
    again.load_state_dict([state, state])
    both = again.next_batch()  # 1 rank reads global positions c, c+1; of 2 ranks, rank 1 read c+1 and c+3
    assert torch.equal(both.tokens[1], second.tokens[0])
    again.close()
    val = obj.val_data(tok)
    assert list(val) == ["prose", "notes", "toy"]  # one set per domain: eval_loss/<name>
    text_cfg = load_config("tiny", overrides(tmp_path, prepared, **{"data.num_workers": 1}))
    assert isinstance(configured(text_cfg).train_data(tok), PackedLoader)
    bad = overrides(tmp_path, prepared, **{"data.format": "shards"})
    with pytest.raises(DataError, match="needs folders written by `kiln data prepare`"):
        configured(load_config("tiny", bad)).train_data(tok)
    wrong = overrides(tmp_path, prepared, **{"data.train": json.dumps([{"path": str(prepared / "train")}])})
    with pytest.raises(DataError, match="--data.format shards"):
        configured(load_config("tiny", wrong)).train_data(tok)


def test_data_shards_with_an_explicit_data_train_or_the_bundled_corpus_is_a_clear_error(prepared, tmp_path):
    from kiln.errors import ConfigError

    tok = load_tokenizer(str(prepared / "tok"))
    both = small_overrides(tmp_path, **{"data.tokenizer": str(prepared / "tok"), "model.vocab_size": 320,
                                        "data.shards": str(prepared / "train")})  # data.train: toy corpus
    with pytest.raises(ConfigError, match=r"data.shards .* and data.train .* are both set"):
        configured(load_config("tiny", both)).train_data(tok)
    bundled = load_config("tiny", ["--data.format", "shards"])  # the default data.train: bundled:train
    with pytest.raises(DataError) as e:
        configured(bundled).train_data(tok)
    msg = str(e.value)
    assert "kiln data prepare --source bundled:train --out DIR" in msg and "--out bundled" not in msg, msg


def test_training_from_shards_resumes_bitwise_with_another_worker_count(prepared, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    extra = {"data.shards": str(prepared / "train"), "data.val": json.dumps([{"path": str(prepared / "val")}]),
             "train.max_steps": 4, "train.eval_every": 100, "train.save_every": 2}
    train(load_config("tiny", overrides(a, prepared, **extra, **{"data.num_workers": 2})), quiet=True)
    half = load_config("tiny", overrides(b, prepared, **extra, **{"data.num_workers": 2, "train.stop_at_step": 2}))
    assert train(half, quiet=True)["stopped"] == "train.stop_at_step"
    rest = load_config("tiny", overrides(b, prepared, **extra, **{"data.num_workers": 0}))  # other worker count
    assert train(rest, quiet=True)["step"] == 4
    assert losses(a / "run") == losses(b / "run")  # exact, step by step
    ev = [r for r in read_metrics(a / "run") if r.get("kind") == "eval"][-1]
    assert {"eval_loss/prose", "eval_loss/notes", "eval_ppl/prose", "eval_ppl/notes", "eval_loss"} <= ev.keys()
    lo, hi = sorted([ev["eval_loss/prose"], ev["eval_loss/notes"]])
    assert lo <= ev["eval_loss"] <= hi and torch.isfinite(torch.tensor(ev["eval_loss"]))


@pytest.mark.parametrize("overrides_, match", [
    (["--data.num_workers", "-1"], r"data.num_workers: must be >= 0"),
    (["--data.row_shuffle", "-5"], r"data.row_shuffle: must be >= 0"),
    (["--data.remainder", "half"], r"data.remainder: expected one of 'carry', 'drop'"),
    (["--data.on_exhausted", "wrap"], r"data.on_exhausted: expected one of 'cycle', 'drop', 'stop'"),
    (["--data.format", "shards", "--data.remainder", "drop"], r"data.remainder=drop applies to text sources"),
    (["--data.shards", "d", "--data.on_exhausted", "stop"], r"data.on_exhausted=stop applies to text sources; "
                                                            r"prepared shards .* \(use data.on_exhausted=cycle"),
    (["--data.train", '[{"path": "a.jsonl", "skip": -2}]'], r"skip and take must be >= 0"),
    (["--data.train", '[{"path": "a.jsonl", "streming": true}]'], r"unknown key 'data.train\[0\].streming'"),
])
def test_data_config_mistakes_fail_at_load_with_the_key(overrides_, match):
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config("tiny", overrides_)


def test_a_run_whose_data_runs_dry_ends_there_with_its_final_eval_and_checkpoint(tmp_path):
    """data.on_exhausted=stop through the command line: the run trains on every row its data has (a source smaller
    than one data.encode_batch too), then ends as a finished run does: final eval, checkpoint, exit 0, the line
    naming the source. Before, it was an error that lost every step since the last checkpoint. The same command
    again has nothing to train and writes nothing."""
    from conftest import run_kiln

    small = write_corpus(tmp_path / "small.jsonl", n_docs=12, seed=3)
    over = small_overrides(tmp_path, **{"train.max_steps": 500, "train.save_every": 100, "train.eval_every": 100,
                                        "data.on_exhausted": "stop", "train.log_every": 100})
    i = over.index("--data.train")
    over[i + 1] = str(small)
    runs = [run_kiln("train", "tiny", *over, capture_output=True, text=True, timeout=600) for _ in range(2)]
    for res in runs:
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"{small}: ran dry after 1 epoch(s) on loader shard 0 of 1 at step " in res.stdout, res.stdout[-2000:]
    records = read_metrics(tmp_path / "run")
    step = records[-1]["step"]
    assert 1 < step < 500 and [r["kind"] for r in records if r["step"] == step] == ["train", "eval"]
    assert "of 500 (data.on_exhausted=stop)" in runs[0].stdout and f"done: {step} steps" in runs[0].stdout
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [f"step_{step}"]
    assert json.loads((tmp_path / "run" / "control" / "status.json").read_text())["state"] == "data ran dry"
    assert "nothing to train" not in runs[1].stdout and "done earlier" in runs[1].stdout
    summary = run_kiln("logs", "summary", str(tmp_path / "run"), capture_output=True, text=True, timeout=600)
    assert json.loads(summary.stdout.strip().splitlines()[-1])["data_ran_dry"] is True


def test_validation_files_of_one_name_are_told_apart_by_their_folder(tmp_path):
    """data.val [a/val.jsonl, b/val.jsonl] logged eval_loss/val and eval_loss/val-2: which was which? Each is now
    named by its folder too; a name the user gave stays, and one name given twice still gets -2."""
    from kiln.data.factory import Batching, build_val_sets

    tok = load_tokenizer("bundled-4k")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        write_corpus(tmp_path / d / "val.jsonl", n_docs=4, seed=1)
    b = Batching(seq_len=16, batch_size=2, seed=0)

    def names(val):
        cfg = load_config("tiny", ["--data.val", json.dumps(val)])
        return list(build_val_sets(cfg.data, tok, b, max_tokens=64))

    a, b_ = str(tmp_path / "a" / "val.jsonl"), str(tmp_path / "b" / "val.jsonl")
    assert names([{"path": a}, {"path": b_}]) == ["a-val", "b-val"]
    assert names([{"path": a, "name": "x"}, {"path": b_}]) == ["x", "val"]
    assert names([{"path": a, "name": "x"}, {"path": b_, "name": "x"}]) == ["x", "x-2"]


def test_a_run_on_its_own_data_is_told_when_it_still_evaluates_on_the_bundled_text(tmp_path):
    """Training from a prepared folder (or any file) kept the preset's data.val: bundled:val, so the eval loss
    rose while the train loss fell, with no word of why. The run and --dry-run now say it."""
    from conftest import run_kiln

    data = write_corpus(tmp_path / "mine.jsonl", n_docs=20, seed=4)
    needle = "note: data.val is still the preset's bundled:val"
    res = run_kiln("train", "tiny", "--data.train", str(data), "--run.out_dir", str(tmp_path / "r"), "--dry-run",
                   capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and needle in res.stdout, res.stderr[-2000:]
    res = run_kiln("train", "tiny", "--data.train", str(data), "--data.val", str(data), "--run.out_dir",
                   str(tmp_path / "r"), "--dry-run", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and needle not in res.stdout, res.stderr[-2000:]
    res = run_kiln("train", "tiny", "--run.out_dir", str(tmp_path / "r"), "--dry-run", capture_output=True,
                   text=True, timeout=300)  # the bundled corpus itself: its own held-out split
    assert res.returncode == 0 and needle not in res.stdout, res.stderr[-2000:]
