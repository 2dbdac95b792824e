"""Config loading: presets, overrides, and one clear error per mistake (dotted key + file)."""

from __future__ import annotations

import pytest

from kiln.config import Config, list_presets, load_config, parse_overrides, to_dict
from kiln.errors import ConfigError


def test_every_preset_loads_and_validates():
    names = list_presets()
    for required in ["tiny", "dense-180m", "deepone-162m", "smol-160m", "smol-600m", "llama2-437m",
                     "small", "medium", "large", "xl", "llama-30m", "llama-124m", "llama-1b", "llama-3b",
                     "mix-smollm", "mix-smol-web-code-math"]:
        assert required in names
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        assert cfg.run.name == name and cfg.run.out_dir.endswith(name)


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny", ["--train.max_steps", "7", "--optim.lr=1e-3", "--model.qk_norm", "true",
                               "--optim.betas", "[0.8, 0.9]"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3 and cfg.model.qk_norm is True
    assert cfg.optim.betas == (0.8, 0.9)
    assert parse_overrides(["--a.b.c", "x"]) == {"a": {"b": {"c": "x"}}}


@pytest.mark.parametrize("overrides, match", [
    (["--model.n_layrs", "3"], r"unknown key 'model.n_layrs'.*model.n_layers"),
    (["--nosection.x", "3"], r"unknown key 'nosection'"),
    (["--model.n_layers", "abc"], r"model.n_layers: expected an integer, got 'abc'"),
    (["--model.n_layers", "2.5"], r"model.n_layers: expected an integer"),
    (["--model.qk_norm", "maybe"], r"model.qk_norm: expected true or false"),
    (["--model.attention", "fast"], r"model.attention: expected one of 'eager', 'sdpa', 'flex', 'flash'"),
    (["--model.n_kv_heads", "3"], r"model.n_heads \(4\) must be divisible by model.n_kv_heads \(3\)"),
    (["--model.d_model", "130"], r"model.d_model \(130\) must be divisible by model.n_heads"),
    (["--train.seq_len", "4096"], r"train.seq_len \(4096\) exceeds model.max_seq_len"),
    (["--train.global_batch_size", "12"], r"multiple of train.micro_batch_size"),
    (["--optim.lr", "-1"], r"optim.lr: must be a positive number"),
    (["--model.residual", "deepnorm"], r"deepnorm needs model.init=deepnet"),
    (["--train.max_steps"], r"missing value"),
    (["--train.time_budget", "--optim.warmup_steps", "5"],  # was: "unexpected argument '5'", the flag unnamed
     r"^--train.time_budget: missing value before --optim.warmup_steps \(an empty one: "
     r"--train.time_budget ''\)$"),
    (["--train.unseen_smoothing", "1"], r"train.unseen_smoothing: must be within \[0, 1\)"),
    (["--posttrain.temperature", "inf"], r"posttrain.temperature: must be a finite number, got inf"),
    (["--posttrain.kl_coef", "nan"], r"posttrain.kl_coef: must be a finite number, got nan"),  # passed ">= 0"
    (["--train.grad_clip", "-1"], r"train.grad_clip: must be >= 0, got -1"),
    (["--model.rope_theta", "0"], r"model.rope_theta: must be positive, got 0"),  # RoPE's tables were nan
    (["--model.norm_eps", "-1e-5"], r"model.norm_eps: must be positive, got -1e-05"),
    (["--train.keep_best", "-1"], r"train.keep_best: must be >= 0, got -1"),  # silently 0
    (["--run.cost_per_hour", "-2"], r"run.cost_per_hour: must be >= 0, got -2"),  # silently no cost
    (["--optim.eps", "-1"], r"optim.eps: must be positive, got -1"),  # a torch traceback (adamw), used as is (muon)
    (["--optim.eps", "0"], r"optim.eps: must be positive, got 0"),
    (["--optim.weight_decay", "nan"], r"optim.weight_decay: must be a finite number, got nan"),  # "diverged" later
    (["--optim.muon_lr_ratio", "nan"], r"optim.muon_lr_ratio: must be positive, got nan"),
    (["--optim.embed_lr_ratio", "inf"], r"optim.embed_lr_ratio: must be a finite number, got inf"),
    (["--optim.adafactor_clip", "nan"], r"optim.adafactor_clip: must be positive, got nan"),
    (["--optim.adafactor_eps", "[0, 0.001]"], r"optim.adafactor_eps\[0\]: must be positive, got 0"),
    (["--optim.min_cooldown_tokens", "nan"], r"optim.min_cooldown_tokens: must be a finite number, got nan"),
    (["--train.divergence_threshold", "-1"], r"train.divergence_threshold: must be >= 0, got -1"),  # silently off
    (["--train.spike_z", "nan"], r"train.spike_z: must be a finite number, got nan"),
    (["--train.sample_every", "-2"], r"train.sample_every: must be >= 0, got -2"),
    (["--train.sample_tokens", "1024"], r"train.sample_tokens \(1024\) must be below model.max_seq_len \(1024\)"),
    (["--train.target_metric", "eval/bogus"],  # accepted without a word, and nothing stopped at it
     r"train.target_metric eval/bogus has no effect without train.target_loss"),
    (["--data.train", '[{"path": "a.jsonl", "weight": 1e400}]'], r"weight must be a positive finite number, got inf"),
    (["--data.train", '[{"path": "a.jsonl", "weight": .nan}]'], r"weight must be a positive finite number, got nan"),
    (["--data.train", '[{"path": "a.jsonl", "weight": 0.7}, '], r"^--data.train: not valid JSON/YAML \("),  # a glob
    (["stray"], r"unexpected argument 'stray'"),
])
def test_bad_overrides_fail_with_the_dotted_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", overrides)


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path):
    # the file is fine and the override breaks it: the command line, not the preset, is named
    with pytest.raises(ConfigError, match=r"^command line: model.d_model: must be positive"):
        load_config("tiny", ["--model.d_model", "-5"])
    # the file itself is bad: the file is named, with or without unrelated overrides
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nmodel:\n  d_model: -5\n")
    for overrides in ([], ["--train.seq_len", "128"]):
        with pytest.raises(ConfigError, match=rf"^{bad}: model.d_model: must be positive"):
            load_config(str(bad), overrides)
    # ... unless the command line repairs it
    assert load_config(str(bad), ["--model.d_model", "64"]).model.d_model == 64


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: [1,\n")
    with pytest.raises(ConfigError, match=rf"{bad}.*malformed YAML"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: tiny\nmodel:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=rf"{typo}: unknown key 'model.d_modle'"):
        load_config(str(typo))
    based = tmp_path / "based.yaml"  # a misspelt preset: the file that names it, not "tmp/tinyy: cannot read"
    based.write_text("base: tinyy\n")
    with pytest.raises(ConfigError, match=rf"{based}: base: 'tinyy' is neither a preset nor a file beside it"):
        load_config(str(based))
    with pytest.raises(ConfigError, match=r"train.save_every_minutes: must be >= 0, got -1"):
        load_config("tiny", ["--train.save_every_minutes", "-1"])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  seq_len: long\n")
    with pytest.raises(ConfigError, match=rf"{wrong}: train.seq_len: expected an integer"):
        load_config(str(wrong))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    dup = tmp_path / "dup.yaml"  # PyYAML keeps the last `train:`: seq_len 64 was dropped without a word
    dup.write_text("base: tiny\ntrain:\n  seq_len: 64\ntrain:\n  log_every: 1\n")
    with pytest.raises(ConfigError, match=rf"^{dup}: line 4 malformed YAML: 'train' appears twice \(first at line 2\)"):
        load_config(str(dup))
    (tmp_path / "b.yaml").write_text("base: tiny\ntrain:\n  max_step: 5\n")  # the key is b's: it named c
    child = tmp_path / "c.yaml"
    child.write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'b.yaml'}: unknown key 'train.max_step'"):
        load_config(str(child))
    empty = tmp_path / "empty.yaml"  # every key of a section commented out: "expected a mapping, got NoneType"
    empty.write_text("base: tiny\ntrain:\n#  max_steps: 5\n")
    with pytest.raises(ConfigError, match=rf"^{empty}: train: expected a mapping, got nothing \(an empty entry"):
        load_config(str(empty))


def test_base_inheritance_and_roundtrip(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny\nmodel:\n  n_layers: 2\nrun:\n  name: exp1\n")
    cfg = load_config(str(child))
    assert cfg.model.n_layers == 2 and cfg.model.d_model == load_config("tiny").model.d_model
    assert cfg.run.name == "exp1"
    tree = to_dict(cfg)
    from kiln.config import config_from_dict

    assert config_from_dict(tree, where="x") == cfg


def test_compile_and_activation_checkpointing_have_one_name_and_the_old_one_says_the_new():
    cfg = load_config("tiny", ["--train.compile", "true", "--train.activation_checkpointing", "full"])
    assert (cfg.train.compile, cfg.train.activation_checkpointing) == (True, "full")
    for old, new in (("parallel.compile", "train.compile"),
                     ("parallel.activation_checkpointing", "train.activation_checkpointing")):
        with pytest.raises(ConfigError, match=f"'{old}' is now '{new}'; use --{new}") as e:
            load_config("tiny", [f"--{old}", "full" if "activation" in old else "true"])
        assert "\n" not in str(e.value)
    # a config saved by an older kiln (in a checkpoint) still loads, with the old key moved
    from kiln.config import config_from_dict

    tree = to_dict(load_config("tiny"))
    tree["parallel"]["activation_checkpointing"] = "selective"
    tree["parallel"]["compile"] = True
    old = config_from_dict(tree, where="old checkpoint")
    assert (old.train.activation_checkpointing, old.train.compile) == ("selective", True)


@pytest.mark.parametrize("overrides, blocker", [
    ([], ""),
    (["--model.tie_embeddings", "true"], "the head is tied to the embedding"),
    (["--model.init_zero_out", "false"], "the head does not start at zero"),
    (["--train.loss_impl", "plain"], "train.loss_impl plain"),
    (["--parallel.tp", "2"], "tensor and pipeline parallelism"),
])
def test_unseen_smoothing_acts_only_where_the_head_has_its_group(overrides, blocker):
    """demo's train.unseen_smoothing with another key changed that leaves no group of equal head rows: the run
    trains without it (and says so) instead of failing over a key the user did not set."""
    from kiln.train.objective import RunSettings, unseen_smoothing_blocker

    cfg = load_config("demo", overrides)
    assert cfg.train.unseen_smoothing == 0.03
    assert unseen_smoothing_blocker(cfg).startswith(blocker)
    assert RunSettings.of(cfg).unseen_smoothing == (0.0 if blocker else 0.03)


def test_one_data_source_may_be_given_without_its_list():
    """`--data.train my.jsonl` (a path) and `--data.train '{"path": ..., "weight": 2}'` (one mapping) are
    one-source lists, and a source in a list may be its path alone; a path is never split at commas."""
    cfg = load_config("tiny", ["--data.train", "my/*.jsonl", "--data.val", '{"path": "v.jsonl", "name": "v"}'])
    assert [s.path for s in cfg.data.train] == ["my/*.jsonl"] and cfg.data.train[0].weight == 1.0
    assert [(s.path, s.name) for s in cfg.data.val] == [("v.jsonl", "v")]
    cfg = load_config("tiny", ["--data.train", '["a,1.jsonl", {"path": "b.jsonl", "weight": 3}]'])
    assert [(s.path, s.weight) for s in cfg.data.train] == [("a,1.jsonl", 1.0), ("b.jsonl", 3.0)]
    with pytest.raises(ConfigError, match=r"data.train\[0\]: expected a mapping"):
        load_config("tiny", ["--data.train", "[3]"])


def test_a_bad_value_of_a_base_file_is_blamed_on_that_file(tmp_path):
    """Range checks run on the merged config; a value the base file sets (and a file built on it keeps) is the
    base's to fix, while one that only the child's or the command line's values break stays theirs."""
    (tmp_path / "base.yaml").write_text("base: tiny\ntrain:\n  eval_every: -3\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  lr: 0.001\n")
    (tmp_path / "grand.yaml").write_text("base: child.yaml\nrun:\n  seed: 3\n")
    for name in ("child.yaml", "grand.yaml"):
        with pytest.raises(ConfigError) as e:
            load_config(str(tmp_path / name))
        assert str(e.value) == f"{tmp_path / 'base.yaml'}: train.eval_every: must be positive, got -3"
    assert load_config(str(tmp_path / "grand.yaml"), ["--train.eval_every", "5"]).train.eval_every == 5
    (tmp_path / "short.yaml").write_text("base: tiny\ntrain:\n  seq_len: 64\n")  # fine alone
    (tmp_path / "small.yaml").write_text("base: short.yaml\nmodel:\n  max_seq_len: 32\n")  # the child breaks it
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'small.yaml'}: train.seq_len \(64\) exceeds"):
        load_config(str(tmp_path / "small.yaml"))
    with pytest.raises(ConfigError, match=r"^command line: train.eval_every: must be positive, got 0"):
        load_config(str(tmp_path / "short.yaml"), ["--train.eval_every", "0"])
