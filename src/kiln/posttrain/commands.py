"""`kiln sft | dpo | rlvr | chat`: parse, build the stage's config from the source checkpoint, hand off.

A post-training run's config is the source checkpoint's resolved config, then the stage's defaults
(below), then the user's `--section.key value` overrides; run.init_from is the source checkpoint and
run.out_dir defaults to runs/<source>-<stage>, <source> the source's run folder name (runs/exp1 and
runs/exp1/checkpoints/step_20 both give runs/exp1-sft). A run folder holds one stage's run: another
stage's run (or a pretraining run) is refused, as is the source's own folder. Without --optim.lr the
stage's LR is derived from the source checkpoint (its pretraining peak LR and width, kiln.posttrain.lr);
the run prints which LR it chose and why. It trains through kiln.train.trainer.train with the stage's
Objective, so schedule, accumulation, clipping, checkpoints, resume and metrics are the
pretraining loop's. When none of train.max_steps, train.total_tokens and train.time_budget is given
(the source's are not inherited), the run lasts posttrain.epochs passes over the data (rows for SFT,
pairs for DPO, prompts for RLVR).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

from kiln.cliargs import add_checkpoint_flags, add_sampling_flags, int_at_least, parse_with_overrides
from kiln.config import Config, ParallelConfig, PostTrainConfig, merge_config, parse_overrides
from kiln.data.cursor import DataId
from kiln.errors import ConfigError

# optim.lr is derived per checkpoint (kiln.posttrain.lr); lr_scaling none: it is the peak itself
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"optim": {"warmup_steps": 10, "weight_decay": 0.0, "schedule": "cosine", "lr_scaling": "none"}},
    "dpo": {"optim": {"warmup_steps": 10, "weight_decay": 0.0, "schedule": "cosine", "lr_scaling": "none"}},
    "rlvr": {"optim": {"warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant", "lr_scaling": "none"}},
}
# posttrain keys that one stage alone reads: on another stage's command line they would do nothing
STAGE_ONLY_KEYS: dict[str, str] = {
    "pack": "sft", "beta": "dpo", "loss": "dpo", "ref": "dpo", **dict.fromkeys(
        ["group_size", "kl_coef", "rewards", "max_new_tokens", "temperature", "top_k", "top_p"], "rlvr")}
# the "kind" of a post-training loader's saved data position (kiln.data.cursor.CursorLoader) -> its stage
STAGE_OF_KIND = {"sft": "sft", "pairs": "dpo", "prompts": "rlvr"}


def _stage_parser(stage: str, what: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"kiln {stage}", description=what,
                                epilog="Any config key can follow as --section.key VALUE (e.g. --optim.lr 1e-5 "
                                       "--train.max_steps 200 --posttrain.beta 0.1).", allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="source checkpoint or run folder (kiln train / import)")
    p.add_argument("--data", help="jsonl file (or HF dataset name); same as --posttrain.data")
    p.add_argument("--val-data", help="held-out jsonl of the same format (or HF dataset, split "
                   "posttrain.val_split); same as --posttrain.val_data")
    p.add_argument("--fresh", action="store_true", help="start over; an existing run folder is moved aside")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def stage_config(stage: str, args: argparse.Namespace, overrides: list[str]) -> tuple[Config, Path, dict]:
    """(config, source checkpoint, the user's override tree) for a post-training stage.

    The source checkpoint is also DPO's and RLVR's reference. On a resume (the run folder already
    holds checkpoints and no --fresh) it is the one the run started from (its saved run.init_from),
    not what --checkpoint resolves to now: a source run folder that gained or rotated checkpoints
    would otherwise change the reference mid-run. A --checkpoint naming another checkpoint is an error.
    """
    from kiln.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint).resolve()
    cfg, user, why = _stage_tree(stage, ckpt, args, overrides)
    out = Path(cfg.run.out_dir).resolve()
    if out == ckpt or out in ckpt.parents:  # --fresh would move the source aside
        raise ConfigError(f"run.out_dir {cfg.run.out_dir} holds the source checkpoint {ckpt}; a {stage} run writes "
                          f"a folder of its own: pass another --run.out_dir (default runs/<source>-{stage})")
    saved = _resumed_source(stage, cfg, ckpt, args)
    if saved is not None and saved != ckpt:
        print(f"note: resuming {cfg.run.out_dir}: its source and reference stay {saved} "
              f"({args.checkpoint} now means {ckpt})", file=sys.stderr)
        ckpt = saved
        cfg, user, why = _stage_tree(stage, ckpt, args, overrides)
    if not cfg.posttrain.data:
        raise ConfigError(f"kiln {stage}: no training data; pass --data FILE.jsonl")
    print(f"kiln {stage}: optim.lr {cfg.optim.lr:.3g}: {why}")
    return cfg, ckpt, user


def _stage_lr(stage: str, *, cfg: Config, base: Config, user: dict, ckpt: Path) -> str:
    """Set cfg.optim.lr (unless the user gave it) and posttrain.pretrain_lr from the source `base`;
    returns the one-line reason."""
    from kiln.posttrain.lr import pretrain_peak, stage_lr

    given = user.get("posttrain", {}).get("pretrain_lr")
    if given:
        choice = stage_lr(stage, base, peak=float(given), peak_from="--posttrain.pretrain_lr")
    else:
        from kiln.train.checkpoint import read_meta

        peak, key = pretrain_peak(base)
        choice = stage_lr(stage, base, peak=peak, peak_from=f"{key} of {ckpt}")
        imported = read_meta(ckpt).get("imported_from") if base.posttrain.pretrain_lr <= 0 else None
        if imported and "lr" not in user.get("optim", {}):  # its config's optim.lr is kiln's default, not its peak
            print(f"note: {ckpt} was imported from {imported}, whose pretraining peak LR kiln cannot know: "
                  f"{peak:g} (kiln's default optim.lr) stands in for it; pass --posttrain.pretrain_lr PEAK (the "
                  "model's own, from its paper or card) or --optim.lr", file=sys.stderr)
    cfg.posttrain.pretrain_lr = choice.peak  # the next stage derives from the same pretraining peak
    rule = choice.describe(stage, d_model=base.model.d_model)
    if "lr" in user.get("optim", {}):
        return f"--optim.lr (the derived default would be {choice.lr:.3g} = {rule})"
    cfg.optim.lr = choice.lr
    return f"{rule} (kiln.posttrain.lr; --optim.lr overrides)"


def _stage_tree(stage: str, ckpt: Path, args: argparse.Namespace, overrides: list[str]) -> tuple[Config, dict, str]:
    from kiln.train.checkpoint import read_config

    base = read_config(ckpt)
    user = parse_overrides(overrides)
    given = user.setdefault("posttrain", {})
    for key in given:
        if STAGE_ONLY_KEYS.get(key, stage) != stage:
            raise ConfigError(f"--posttrain.{key} is read by kiln {STAGE_ONLY_KEYS[key]} only; kiln {stage} would "
                              "ignore it: drop it")
    for flag, key in (("--data", "data"), ("--val-data", "val_data")):
        value = getattr(args, key)
        if value and key in given and given[key] != value:  # one of them would be dropped without a word
            raise ConfigError(f"{flag} {value} and --posttrain.{key} {given[key]} name two files; pass one of them")
        if value:
            given[key] = value
    # the source run's folder name (not its run.name: two runs of one preset in other folders share that)
    source = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else (base.run.name or ckpt.name)
    name = f"{source}-{stage}"
    tree: dict[str, Any] = {
        "run": {"name": name, "out_dir": str(Path("runs") / name), "init_from": str(ckpt)},
        # the source's length, stopping rule and best-checkpoint metric (demo's time budget, a target loss, a
        # keep_best on its validation loss) are not this stage's
        "train": {"max_steps": 0, "total_tokens": 0, "time_budget": "", "target_loss": 0.0, "keep_best": 0,
                  "stop_at_step": 0, "sample_tokens": 0},
        # the source stage's data is not this stage's; nor are its verifiers (a python: one is code to run, and
        # is run only when this command names it; its .py path would resolve from another folder too)
        "posttrain": {"data": "", "val_data": "", "rewards": PostTrainConfig().rewards},
        # the source's layout was its torchrun's (a pp 2 run's checkpoint loads in one process); this
        # command's comes from its own flags and process count
        "parallel": dataclasses.asdict(ParallelConfig()),
        **{k: dict(v) for k, v in STAGE_DEFAULTS[stage].items()},
    }
    if stage == "rlvr":  # a DPO source's precomputed reference is not RLVR's: it scores new samples (a copy)
        tree["posttrain"]["ref"] = "copy"
    cfg = merge_config(base, tree, where=f"{stage} defaults")
    cfg = merge_config(cfg, user, where="command line")
    if "name" in user.get("run", {}) and "out_dir" not in user.get("run", {}):
        cfg.run.out_dir = str(Path("runs") / cfg.run.name)
    return cfg, user, _stage_lr(stage, cfg=cfg, base=base, user=user, ckpt=ckpt)


def _resumed_source(stage: str, cfg: Config, ckpt: Path, args: argparse.Namespace) -> Path | None:
    """The source checkpoint of the run this command resumes, or None when it starts one. A run folder
    holding another stage's run (or a pretraining run) is an error, before anything is written."""
    from kiln.train.checkpoint import list_checkpoints, read_config

    existing = [] if args.fresh else list_checkpoints(Path(cfg.run.out_dir))
    if not existing:
        return None
    held = _saved_stage(existing[-1])
    if held is not None and held != stage:
        raise ConfigError(f"{cfg.run.out_dir} holds a {held} run, not {stage}: pass another --run.out_dir, or "
                          "--fresh to start over (the old run is moved aside)")
    saved_from = read_config(existing[-1]).run.init_from
    if not saved_from:
        return None
    saved = Path(saved_from).resolve()
    if saved == ckpt:
        return saved
    given = Path(args.checkpoint).resolve()
    if given == ckpt or saved.parent.parent != given:  # a checkpoint folder, or another run folder
        raise ConfigError(f"{cfg.run.out_dir}: resumes a {stage} run that started from {saved}, but --checkpoint "
                          f"is {ckpt}; pass --checkpoint {saved} to resume it, another --run.out_dir for a new run, "
                          "or --fresh to start over (the old run is moved aside)")
    if not (saved / "meta.json").exists():
        raise ConfigError(f"{cfg.run.out_dir}: resumes a {stage} run whose source checkpoint {saved} (its "
                          "reference) no longer exists; restore it, pass another --run.out_dir for a new run, or "
                          "--fresh to start over (the old run is moved aside)")
    return saved


def _saved_stage(ckpt: Path) -> str | None:
    """The stage of the run that saved `ckpt`: sft, dpo or rlvr (by the kind of its saved data position),
    "pretraining" (another kind, or no data position and no source: a model's first checkpoint, as
    kiln import writes), or None when unknown (no data position in a post-training run's checkpoint)."""
    import torch

    from kiln.train.checkpoint import read_config

    for f in sorted((ckpt / "state").glob("rank_*.pt")):
        try:
            loader = torch.load(f, map_location="cpu", weights_only=False).get("loader")
        except Exception:  # damaged: the trainer sets the checkpoint aside or names the file
            return None
        if isinstance(loader, dict):
            return STAGE_OF_KIND.get(loader.get("kind"), "pretraining")
    saved = read_config(ckpt)
    return None if saved.run.init_from or saved.posttrain.data else "pretraining"


def _train_records(pt: PostTrainConfig) -> tuple[list[tuple[str, dict]], DataId]:
    """The stage's training records (posttrain.data, split posttrain.split) and their DataId: a resume on
    other data, even with as many records, is refused (kiln.data.cursor.CursorLoader)."""
    from kiln.data.records import load_records

    records = load_records(pt.data, split=pt.split)
    return records, DataId.of(pt.data, records)


def _set_steps(cfg: Config, user: dict, units: int, what: str) -> None:
    """train.max_steps from posttrain.epochs when the user set no length (steps, tokens or a time budget), said
    in one line: the plan's "from train.max_steps" would hide where the count came from."""
    t = user.get("train", {})
    if "max_steps" in t or "total_tokens" in t or t.get("time_budget"):
        return
    pt, batch = cfg.posttrain, cfg.train.global_batch_size
    cfg.train.max_steps = max(1, math.ceil(pt.epochs * units / batch))
    seen = cfg.train.max_steps * batch / max(units, 1)  # whole steps: 0.5 epoch of 1 row in batches of 2 is 2
    rounded = f" (rounded up to whole steps: {seen:.3g} epochs)" if abs(seen - pt.epochs) > 0.01 * pt.epochs else ""
    print(f"train.max_steps {cfg.train.max_steps} = {pt.epochs:g} epoch(s) (posttrain.epochs) x {units} {what} / "
          f"global batch {batch}{rounded}; --train.max_steps N sets it")


def _chat_format(cfg: Config):
    from kiln.data.tokenizer import load_tokenizer
    from kiln.posttrain.chat import ChatFormat

    tok = load_tokenizer(cfg.data.tokenizer)
    return tok, ChatFormat.for_config(tok, chat_template=cfg.posttrain.chat_template, tokenizer_spec=cfg.data.tokenizer)


def _finish(summary: dict) -> int:
    from kiln.train.trainer import exit_code

    return exit_code(summary)


def sft(argv: list[str], *, started: float | None = None) -> int:
    """`kiln sft --checkpoint CKPT --data FILE [overrides]`: jsonl {"messages": [{"role", "content"}, ...]}.
    `started`: the command's start (kiln.cli passes it), where a train.time_budget's clock starts."""
    parser = _stage_parser("sft", "Supervised fine-tuning on chat data (loss on assistant tokens).")
    args, overrides = parse_with_overrides(parser, argv)  # `--fersh`: did you mean --fresh?
    from kiln.posttrain.sft import SFTObjective, encode_conversations, load_sft_data, rows_per_epoch
    from kiln.train.trainer import train

    cfg, _, user = stage_config("sft", args, overrides)
    tok, fmt = _chat_format(cfg)
    pt, T = cfg.posttrain, cfg.train.seq_len
    records, data = _train_records(pt)
    convs = encode_conversations(records, fmt, max_len=T)
    val = load_sft_data(pt.val_data, fmt, max_len=T, split=pt.val_split, what="posttrain.val_data") if pt.val_data else None
    _set_steps(cfg, user, rows_per_epoch(convs, seq_len=T, pack=pt.pack), "rows" if pt.pack else "conversations")
    print(f"kiln sft: {len(convs)} conversations, chat template '{fmt.name}', from {cfg.run.init_from}")
    return _finish(train(cfg, objective=SFTObjective(convs, val, pack=pt.pack, data=data), fresh=args.fresh,
                         quiet=args.quiet, started=started))


def dpo(argv: list[str], *, started: float | None = None) -> int:
    """`kiln dpo --checkpoint CKPT --data FILE [overrides]`: jsonl {"prompt", "chosen", "rejected"}.
    `started`: the command's start (kiln.cli passes it), where a train.time_budget's clock starts."""
    parser = _stage_parser("dpo", "Preference optimisation: DPO (sigmoid) or APO-zero / APO-down.")
    args, overrides = parse_with_overrides(parser, argv)  # `--fersh`: did you mean --fresh?
    from kiln.posttrain.dpo import DPOObjective, encode_pairs, load_pairs
    from kiln.train.trainer import train

    cfg, ckpt, user = stage_config("dpo", args, overrides)
    tok, fmt = _chat_format(cfg)
    pt, L = cfg.posttrain, cfg.train.seq_len + 1
    records, data = _train_records(pt)
    pairs = encode_pairs(records, fmt, max_len=L)
    val = load_pairs(pt.val_data, fmt, max_len=L, split=pt.val_split, what="posttrain.val_data") if pt.val_data else None
    _set_steps(cfg, user, len(pairs), "pairs")
    print(f"kiln dpo: {len(pairs)} pairs, loss {pt.loss}, beta {pt.beta}, reference {ckpt} ({pt.ref})")
    obj = DPOObjective(pairs, val, reference=ckpt, beta=pt.beta, kind=pt.loss, precompute=pt.ref == "precomputed",
                       batch_size=cfg.train.micro_batch_size, data=data)
    return _finish(train(cfg, objective=obj, fresh=args.fresh, quiet=args.quiet, started=started))


def rlvr(argv: list[str], *, started: float | None = None) -> int:
    """`kiln rlvr --checkpoint CKPT --data FILE [overrides]`: jsonl {"prompt", "answer"}.
    `started`: the command's start (kiln.cli passes it), where a train.time_budget's clock starts."""
    parser = _stage_parser("rlvr", "RL with verifiable rewards (GRPO-style groups, KL to the reference).")
    args, overrides = parse_with_overrides(parser, argv)  # `--fersh`: did you mean --fresh?
    from kiln.generate import prompt_room
    from kiln.posttrain.rewards import build_reward
    from kiln.posttrain.rlvr import RLVRObjective, encode_tasks, load_tasks
    from kiln.train.trainer import train

    cfg, ckpt, user = stage_config("rlvr", args, overrides)
    pt = cfg.posttrain
    if pt.group_size < 2:
        raise ConfigError("posttrain.group_size: RLVR compares completions within a group; use 2 or more")
    if pt.temperature == 0:  # greedy: every completion of a group alike, equal rewards, no advantage to learn from
        raise ConfigError("posttrain.temperature 0 samples one completion per prompt G times, so a group's rewards "
                          "are equal and nothing trains; use > 0 (default 1.0)")
    # said as the setting it is, not as each prompt's length
    room = prompt_room(pt.max_new_tokens, cfg.model.max_seq_len, setting="posttrain.max_new_tokens",
                       suggest=cfg.model.max_seq_len // 4)
    reward = build_reward(pt.rewards)
    tok, fmt = _chat_format(cfg)
    records, data = _train_records(pt)
    tasks = encode_tasks(records, fmt, max_prompt_len=room)
    val = load_tasks(pt.val_data, fmt, max_prompt_len=room, split=pt.val_split,
                     what="posttrain.val_data") if pt.val_data else None
    _set_steps(cfg, user, len(tasks), "prompts")
    print(f"kiln rlvr: {len(tasks)} prompts x {pt.group_size} samples, rewards {pt.rewards}, kl {pt.kl_coef}")
    obj = RLVRObjective(tasks, val, reference=ckpt, reward=reward, tokenizer=tok, group_size=pt.group_size,
                        kl_coef=pt.kl_coef, max_new_tokens=pt.max_new_tokens, temperature=pt.temperature,
                        top_k=pt.top_k, top_p=pt.top_p, data=data)
    return _finish(train(cfg, objective=obj, fresh=args.fresh, quiet=args.quiet, started=started))


def chat(argv: list[str]) -> int:
    """`kiln chat --checkpoint CKPT`: a conversation in the terminal with the model's chat template."""
    p = argparse.ArgumentParser(prog="kiln chat", description="Chat with a model (empty line, /quit or Ctrl-D "
                                "quits; /reset forgets the conversation).", allow_abbrev=False)
    add_checkpoint_flags(p)
    p.add_argument("--system", default="", help="system message")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                   help="tokens per reply, at least 1 (default: min(256, half the model's context)); a value that "
                        "leaves no room for a prompt within the context (>= model.max_seq_len) is refused")
    add_sampling_flags(p, temperature=0.7, top_k=50)
    p.add_argument("--seed", type=int_at_least(0), default=0, help="default 0; each reply takes the next seed")
    p.add_argument("--raw", action="store_true", help="no chat template: the model continues your text")
    args = p.parse_args(argv)
    from kiln.device import pick_device
    from kiln.generate import GenerationError, check_flags, generate_from_ids, generate_text, prompt_room
    from kiln.train.checkpoint import load_for_inference

    if args.raw and args.system:  # raw continuation has no place for it: said, not dropped
        raise GenerationError("--system needs the chat template, which --raw turns off; leave out one of them "
                              "(with --raw, begin your text with what the system message would say)")
    pick_device(args.device, option="--device")  # a missing GPU is said as the flag the user typed
    check_flags(args)  # before the model loads and anyone types
    model, cfg, ckpt = load_for_inference(args.checkpoint, device=args.device)
    context = cfg.model.max_seq_len
    if args.max_new_tokens is None:  # demo's context is 256 tokens: its replies get 128, its prompts the rest
        args.max_new_tokens = min(256, context // 2)
    else:  # before anyone types: no prompt would fit
        prompt_room(args.max_new_tokens, context, setting="--max-new-tokens", of=f" of {ckpt}", suggest=context // 2)
    tok, fmt = _chat_format(cfg)
    interactive = sys.stdin.isatty()
    mode = "raw continuation" if args.raw else f"chat template '{fmt.name}'"
    print(f"kiln chat: {ckpt} ({mode}; empty line quits, /reset starts over)", file=sys.stderr)
    if not args.raw and fmt.name == "kiln" and not cfg.posttrain.data:  # a pretrained model, never shown a template
        print("note: this checkpoint was not post-trained (kiln sft) and its tokenizer has no chat template of its "
              "own, so it has never seen this one: expect it to continue text rather than reply (--raw continues "
              "your text; kiln sft teaches it the template)", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    seed = args.seed
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
               top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip() or line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = []
            continue
        if args.raw:
            generate_text(model, tok, line, seed=seed, stream=True, **gen)
        else:
            history.append({"role": "user", "content": line})
            ids = fmt.prompt_ids(system + history)
            forgot = 0
            while len(ids) + args.max_new_tokens > cfg.model.max_seq_len and len(history) > 2:
                history, forgot = history[2:], forgot + 1  # forget the oldest exchange
                ids = fmt.prompt_ids(system + history)
            if len(ids) + args.max_new_tokens > cfg.model.max_seq_len:  # this message alone: cutting it from the
                history.pop()  # left would cut the template's control tokens too
                print(f"(note: that message is {len(ids):,} tokens with the template; with --max-new-tokens "
                      f"{args.max_new_tokens} it does not fit the model's {cfg.model.max_seq_len}-token context: "
                      "send a shorter one)", file=sys.stderr)
                continue
            if forgot:  # said, as generate says a prompt it truncates
                print(f"(note: the conversation outgrew the model's {cfg.model.max_seq_len}-token context with "
                      f"--max-new-tokens {args.max_new_tokens}: the oldest {forgot} exchange(s) are forgotten)",
                      file=sys.stderr)
            reply = generate_from_ids(model, tok, ids, seed=seed, stream=True, **gen)
            history.append({"role": "assistant", "content": reply.strip()})
        print(flush=True)
        seed += 1
    return 0
