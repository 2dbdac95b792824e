"""`kiln` command line: thin. Parses, builds the config, hands off; user errors become one line + exit 2."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import time
from pathlib import Path

from kiln.cliargs import (
    add_checkpoint_flags,
    add_sampling_flags,
    int_at_least,
    parse_with_overrides,
    unknown_command,
    user_path,
)
from kiln.errors import KilnError, first_line

STARTED = time.time()  # the command's start: a time budget counts the imports and setup before step 1 too

USAGE = """kiln <command> [options]

commands:
  train [PRESET] [--fresh] [--dry-run] [--section.key VALUE ...]
      pretrain (resumes from the latest checkpoint)
  generate --checkpoint CKPT --prompt TEXT [...]
      sample from a checkpoint (KV cache)
  chat --checkpoint CKPT
      chat in the terminal (the model's chat template)
  eval --checkpoint CKPT --data FILE_OR_DATASET [--task mc|gsm8k]
      loss / ppl / bpb, or a benchmark (last line JSON)
  sft --checkpoint CKPT --data FILE [--section.key VALUE ...]
      supervised fine-tuning, jsonl {"messages": [...]}
  dpo --checkpoint CKPT --data FILE [...]
      DPO / APO, jsonl {"prompt", "chosen", "rejected"}
  rlvr --checkpoint CKPT --data FILE [...]
      RL with verifiable rewards, jsonl {"prompt", "answer"}
  import --hf DIR --out RUN_DIR
      HF Llama / Qwen3 / SmolLM3 folder -> kiln checkpoint
  export --checkpoint CKPT --out DIR [--format hf|gguf]
      HF folder, or a GGUF file for llama.cpp
  average CKPT CKPT ... --out DIR [--ema D] [--last K]
      one checkpoint from several (uniform or EMA)
  average CKPT --weights ema --out DIR
      a run's moving average (train.ema_decay)
  presets
      list presets with parameter counts
  control list|save|stop|abort [JOB]
      steer running training jobs on this machine
  logs summary|plot|compare RUN_DIR [...] [--out PNG]
      run tables, PNG curves, runs overlaid
  doctor [PRESET] [--out-dir DIR]
      sanity checks (exit 1 on any FAIL)
  bench PRESET [--steps N] [--warmup N] [--section.key VALUE ...]
      time training steps: one JSON line
  estimate PRESET [--device cuda|cpu] [--section.key VALUE ...]
      peak training memory per device (last line JSON)
  data prepare|inspect|verify ...
      pre-tokenized shards; data checks (kiln data -h)
  tokenizer train|stats ...
      train a BPE tokenizer; bytes/token (kiln tokenizer -h)

kiln COMMAND -h shows a command's options and their defaults.
"""


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="kiln train", description="Pretrain a model (resumes automatically).",
        usage="kiln train [PRESET] [--fresh] [--quiet] [--dry-run]\n                  [--section.key VALUE ...]",
        epilog="Any config key is an override: --section.key VALUE (e.g. --train.max_steps 200 --optim.lr 3e-4 "
               "--train.time_budget 10m --run.out_dir runs/x); `kiln presets` lists the presets; every key "
               "with its value is printed by `kiln train PRESET --dry-run`.", allow_abbrev=False)
    p.add_argument("preset", nargs="?", default="tiny", help="preset name or YAML path (default: tiny)")
    p.add_argument("--fresh", action="store_true", help="start over; an existing run folder is moved aside")
    from kiln.config import split_preset

    preset, rest = split_preset(argv)
    if preset is None and not {"-h", "--help"} & set(argv):
        argv = ["tiny", *rest]  # no preset given: the value of the first override is not a preset name
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, size, budget, LR schedule and a memory estimate, then exit")
    args, overrides = parse_with_overrides(p, argv)  # `--fersh`: did you mean --fresh?
    from kiln.config import load_config

    cfg = load_config(args.preset, overrides)  # a bad key or value is refused before torch loads (~2 s)
    if not any(o.split("=")[0] == "--run.out_dir" for o in overrides):
        _follow_run_folder(Path(args.preset), cfg)
    from kiln.train.trainer import exit_code, train

    return exit_code(train(cfg, fresh=args.fresh, quiet=args.quiet, dry=args.dry_run, started=STARTED))


def _follow_run_folder(path: Path, cfg) -> None:
    """`kiln train RUN/config.yaml` trains in RUN, where that file is: its run.out_dir still names where the run
    was before `--fresh` moved it aside (or `mv`), and the command resumed the run that is there now. Not so for
    the folder `kiln import` writes: its config starts a new run (run.out_dir RUN-train) from RUN's weights-only
    checkpoint (run.init_from), and RUN holds nothing to resume."""
    if path.name != "config.yaml" or not path.is_file():
        return
    folder = path.resolve().parent
    if not ((folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file()):
        return
    if cfg.run.init_from and folder in Path(cfg.run.init_from).expanduser().resolve().parents:
        return  # it starts from a checkpoint in this folder: it trains elsewhere, in its run.out_dir
    from kiln.train.checkpoint import list_checkpoints, weights_only

    ckpts = list_checkpoints(folder)
    try:  # the newest, which a run would resume
        imported = bool(ckpts) and weights_only(ckpts[-1])
    except KilnError:  # damaged: the run sets it aside and resumes the one before, in this folder
        imported = False
    if imported:
        return  # nothing here to resume (kiln import / average): its run.out_dir starts from these weights
    if Path(cfg.run.out_dir).resolve() != folder:
        print(f"note: {path} is the config of the run in {folder}: it trains there (its run.out_dir, "
              f"{cfg.run.out_dir}, is where the run was before it moved; --run.out_dir trains elsewhere)",
              file=sys.stderr)
        cfg.run.out_dir = str(folder)


def _generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln generate", description="Generate text from a checkpoint.",
                                allow_abbrev=False)
    add_checkpoint_flags(p)
    p.add_argument("--prompt", required=True, help="the text to continue; - reads it from standard input; '' "
                   "samples from nothing (after an end of text)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64, help="default 64")
    add_sampling_flags(p, temperature=0.8, top_k=0)
    p.add_argument("--seed", type=int_at_least(0), default=0, help="default 0")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    args = p.parse_args(argv)
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
        if not args.prompt:
            raise KilnError("--prompt -: standard input was empty; pipe the prompt in, or pass --prompt TEXT "
                            "(--prompt '' samples from nothing)")
    if "" in args.stop:  # it was ignored: the whole output printed
        raise KilnError("--stop '': an empty stop string matches nowhere; pass the text to stop at")
    from kiln.data.tokenizer import load_tokenizer
    from kiln.device import pick_device
    from kiln.generate import check_flags, generate_text
    from kiln.train.checkpoint import load_for_inference

    check_flags(args)  # as typed (--top-p), before the checkpoint loads
    pick_device(args.device, option="--device")  # a missing GPU is said before the checkpoint loads
    model, cfg, _ = load_for_inference(args.checkpoint, device=args.device)
    tok = load_tokenizer(cfg.data.tokenizer)
    trained = cfg.train.seq_len  # a run from scratch never saw positions past its rows (bench/RESULTS.md, ninth sitting)
    if not cfg.run.init_from and trained < cfg.model.max_seq_len and \
            len(tok.encode(args.prompt)) + args.max_new_tokens > trained:
        print(f"note: this run trained on {trained}-token sequences; text past {trained} tokens is at positions it "
              f"never saw (model.max_seq_len {cfg.model.max_seq_len})", file=sys.stderr)
    stream = sys.stdout.isatty()
    if stream:
        print(args.prompt, end="", flush=True)
    text = generate_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=stream,
                         repetition_penalty=args.repetition_penalty, stop=args.stop)
    print("" if stream else args.prompt + text)
    return 0


def _chat(argv: list[str]) -> int:
    from kiln.posttrain.commands import chat

    return chat(argv)


def _import(argv: list[str]) -> int:
    from kiln.convert.hf_import import import_hf

    return import_hf(argv)


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln eval", description="Loss, perplexity and bits per byte on a text source.",
                                allow_abbrev=False)
    add_checkpoint_flags(p)
    p.add_argument("--data", required=True, help="txt/jsonl/parquet file, glob, folder, bundled:val, or HF dataset")
    p.add_argument("--text-column", default=None, help="loss: the column holding the text (default: text)")
    p.add_argument("--max-tokens", type=int_at_least(1), default=None,
                   help="loss: score about this many tokens, in whole --seq-len rows, at least one (default: 1000000)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, metavar="N",
                   help="sequences per forward pass (default 8)")
    p.add_argument("--seq-len", type=int_at_least(1), default=None, help="loss: default the checkpoint's train.seq_len")
    p.add_argument("--task", default="loss", choices=["loss", "mc", "gsm8k"],
                   help="loss: loss/ppl/bpb; mc: multiple choice by log-likelihood; gsm8k: generate + answer match")
    p.add_argument("--limit", type=int_at_least(0), default=None,
                   help="mc / gsm8k: score the first N items (0: all; default all, and for heldout-next the "
                        "checkpoint's train.eval_tasks_limit, as its run scored it)")
    p.add_argument("--split", default="", help="split when --data is an HF dataset name (loss: default train; "
                   "mc / gsm8k: default test)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None, help="gsm8k (default: 256)")
    p.add_argument("--chat", action="store_true", default=None, help="gsm8k: ask through the chat template")
    p.add_argument("--num-fewshot", type=int_at_least(0), default=None,
                   help="gsm8k: worked examples from --fewshot-data")
    p.add_argument("--fewshot-data", default=None, help="gsm8k: jsonl of {question, answer} worked examples")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16"],
                   help="precision (default: the checkpoint's train.dtype; auto is bf16 autocast where the device "
                        "multiplies bf16 in hardware); fp32 compares exactly with an fp32 transformers run")
    args = p.parse_args(argv)
    # an option the chosen task does not read is a mistake worth one line, not a silent no-op
    only = {"--text-column": ("text_column", "loss"), "--max-tokens": ("max_tokens", "loss"),
            "--seq-len": ("seq_len", "loss"), "--limit": ("limit", "mc gsm8k"),
            "--max-new-tokens": ("max_new_tokens", "gsm8k"), "--chat": ("chat", "gsm8k"),
            "--num-fewshot": ("num_fewshot", "gsm8k"), "--fewshot-data": ("fewshot_data", "gsm8k")}
    for flag, (attr, tasks) in only.items():
        if getattr(args, attr) is not None and args.task not in tasks.split():
            raise KilnError(f"{flag} applies to --task {' or '.join(tasks.split())}, not --task {args.task}; drop it")
    from kiln.device import pick_device

    pick_device(args.device, option="--device")  # a missing GPU is said before the checkpoint loads
    if args.task != "loss":
        from kiln.eval.run import evaluate_task

        result = evaluate_task(args.checkpoint, args.data, task=args.task, limit=args.limit, split=args.split,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens or 256,
                               chat=bool(args.chat), num_fewshot=args.num_fewshot or 0,
                               fewshot_data=args.fewshot_data or "", device=args.device, dtype=args.dtype)
        print(json.dumps(result))
        return 0
    from kiln.eval.run import evaluate_source

    result = evaluate_source(args.checkpoint, args.data, text_column=args.text_column or "text",
                             max_tokens=args.max_tokens or 1_000_000, batch_size=args.batch_size,
                             seq_len=args.seq_len or 0, device=args.device, split=args.split, dtype=args.dtype)
    print(json.dumps(result))
    return 0


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln export", description="Write a Hugging Face model folder or a GGUF file.",
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, type=user_path, metavar="PATH",
                   help="hf: a new folder (or a previous kiln export to replace); gguf: the .gguf file to "
                        "write")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"], help="hf: a transformers folder; gguf: llama.cpp")
    p.add_argument("--dtype", default=None,
                   help="hf: float32 | bfloat16 | float16; gguf: f32 | f16 | bf16 | q8_0 (both take either spelling)")
    args = p.parse_args(argv)
    if args.format == "gguf":
        from kiln.convert.gguf import export_gguf

        out = export_gguf(args.checkpoint, args.out, dtype=args.dtype or "f32")
        print(f"exported to {out}: llama-cli -m {out}")
        return 0
    if args.dtype is None:
        args.dtype = "float32"
    from kiln.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported to {out}: transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0


def _posttrain(stage: str):
    def run(argv: list[str]) -> int:
        from kiln.posttrain import commands

        return getattr(commands, stage)(argv, started=STARTED)  # a time budget's clock starts with the command

    return run


def _presets(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="kiln presets", description="The presets (kiln train PRESET): parameters and "
                            "shape; kiln train PRESET --dry-run shows one in full.",
                            allow_abbrev=False).parse_args(argv)
    from kiln.config import list_presets, load_config
    from kiln.model import count_params

    names = list_presets()
    w = max(len(n) for n in names) + 2
    print(f"{'preset':<{w}}{'params':>10}{'layers':>8}{'d':>6}{'heads':>8}{'ffn':>7}{'vocab':>8}  notes")
    for name in names:
        m = load_config(name).model
        notes = ", ".join(x for x in ["tied" if m.tie_embeddings else "untied", "qk-norm" if m.qk_norm else "",
                                      f"nope/{m.nope_every}" if m.nope_every else "", m.residual] if x)
        print(f"{name:<{w}}{count_params(m) / 1e6:>9.1f}M{m.n_layers:>8}{m.d_model:>6}{f'{m.n_heads}/{m.n_kv_heads}':>8}"
              f"{m.ffn_dim:>7}{m.vocab_size:>8}  {notes}")
    return 0


def _elsewhere(module: str):
    """A command whose parser and work live in `module` (its main(argv)), imported only when it runs."""
    def run(argv: list[str]) -> int:
        return importlib.import_module(module).main(argv)

    return run


COMMANDS = {"train": _train, "generate": _generate, "chat": _chat, "eval": _eval, "export": _export,
            "presets": _presets, "sft": _posttrain("sft"), "dpo": _posttrain("dpo"),
            "rlvr": _posttrain("rlvr"), "import": _import, "logs": _elsewhere("kiln.logs"),
            "doctor": _elsewhere("kiln.doctor"), "data": _elsewhere("kiln.data.commands"),
            "control": _elsewhere("kiln.train.control"), "bench": _elsewhere("kiln.bench"),
            "estimate": _elsewhere("kiln.estimate"), "average": _elsewhere("kiln.average"),
            "tokenizer": _elsewhere("kiln.data.tokenizer_train")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # no command: a mistake, so the usage goes to stderr with exit 2
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        try:
            print(USAGE)
            sys.stdout.flush()
        except BrokenPipeError:  # `kiln --help | head -1`: the reader has gone; not a traceback
            _to_devnull(sys.stdout)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(unknown_command("kiln", cmd, COMMANDS), file=sys.stderr)  # `kiln trian`: did you mean train?
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(sys.stdin, "reconfigure"):  # a prompt or chat line with bytes that are not UTF-8: U+FFFD, not a
        sys.stdin.reconfigure(errors="replace")  # lone surrogate the tokenizer refuses with a TypeError traceback
    training = cmd in TRAINING
    saved = sys.stdout, sys.stderr
    if training:  # `kiln train | head`: the run goes on when the reader leaves, its output to os.devnull
        sys.stdout, sys.stderr = ReaderGone(sys.stdout), ReaderGone(sys.stderr)
    try:
        code = COMMANDS[cmd](rest) or 0
        sys.stdout.flush()  # a reader that has gone (`| head`) is met here, not in the exit's flush
        return code
    except KilnError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0, not one per process
            print(f"kiln: error: {e}", file=sys.stderr)
        else:  # the agent stops every worker when one exits: give rank 0 time to print its line
            time.sleep(5)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kiln presets | head`: the reader has gone; not a traceback
        _to_devnull(sys.stdout)  # the exit's flush writes nowhere
        if training:  # not reached while ReaderGone guards the streams; a run that stopped early is no success
            _to_devnull(sys.stderr)
            return 1
        return 0
    except OSError as e:  # a full disk met outside a checkpoint (metrics, job-control status): one line too
        if e.errno != errno.ENOSPC:
            raise
        print(f"kiln: error: {e.filename or 'a file'}: the disk is full ({e.strerror}); checkpoints already written are "
              "intact: free space and run the same command to resume", file=sys.stderr)
        return 2
    except RuntimeError as e:  # under torchrun, a peer process that died mid-collective: one line, not 80 per rank
        reason = _peer_gone(e) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        if reason is None:
            raise
        print(f"kiln: error: rank {os.environ.get('RANK', '?')}: another process of this torchrun job ended "
              f"({reason}); its own error, if any, is above. Checkpoints already written are intact: run the same "
              "command to resume", file=sys.stderr)
        return 1
    finally:
        if training:
            sys.stdout, sys.stderr = saved


TRAINING = {"train", "sft", "dpo", "rlvr"}


def _to_devnull(stream) -> None:
    """Point the file descriptor under `stream` at os.devnull (what is buffered and written later goes nowhere)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, stream.fileno())
        os.close(fd)
    except (OSError, ValueError):  # no descriptor (a test's captured stream): nothing to redirect
        pass


class ReaderGone:
    """A training command's stdout or stderr: when the reader of its pipe leaves (`kiln train | head -3`), the rest
    of the output goes to os.devnull and the run trains on to its checkpoint (Python docs, "Note on SIGPIPE"),
    instead of a BrokenPipeError ending it unsaved."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def _gone(self) -> None:
        _to_devnull(self._stream)
        try:
            self._stream.flush()  # what was buffered for the reader drains into os.devnull
        except (BrokenPipeError, ValueError):
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _peer_gone(e: BaseException) -> str | None:
    """What a collective said when it failed because another rank's process is gone (killed, crashed, out of
    memory), or None for any other error."""
    text = str(e)
    found = next((s for s in ("Connection closed by peer", "Connection reset by peer", "remote process exited",
                              "NCCL communicator was aborted") if s in text), None)
    return found or (first_line(e)[:100] if type(e).__name__ == "DistBackendError" else None)


if __name__ == "__main__":
    raise SystemExit(main())
