"""argparse types the `kiln` commands share (their own options; `--section.key` overrides go through kiln.config)."""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Iterable


def int_at_least(low: int):
    """An argparse `type`: an integer >= low, and below 2**63 (what torch's int64 seeds and counts hold)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value < 2**63:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}" + (" below 2**63" if value > 0 else "")
                                             + f", got {value}")
        return value
    return parse


def user_path(text: str) -> str:
    """An argparse `type` for a path option: `~` expanded where no shell did (`--out=~/x`, `--out '~/x'`), rather
    than a folder named `~` made in the working folder."""
    return os.path.expanduser(text)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"; did you mean X?" for the choice nearest a mistyped `word` (difflib), or ""."""
    near = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {near[0]}?" if near else ""


def unknown_command(prog: str, word: str, commands: Iterable[str]) -> str:
    """The one error line for `prog WORD` when WORD is none of `commands`, with the nearest as a suggestion."""
    return f"{prog}: error: unknown command '{word}'{did_you_mean(word, commands)} ({prog} --help lists them)"


def parse_with_overrides(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """p.parse_known_args(argv) for a command that also takes `--section.key VALUE` overrides: a leftover option
    without a dot that is near one of p's own (`--fersh`) is refused with that suggestion; anything else is left
    to the config loader."""
    args, overrides = p.parse_known_args(argv)
    own = [s for a in p._actions for s in a.option_strings if s.startswith("--")]
    for word in overrides:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and "." not in flag and (hint := did_you_mean(flag, own)):
            p.error(f"unrecognized argument {flag}{hint}")  # usage, then the one line; exit 2
    return args, overrides


def parse_with_sources(p: argparse.ArgumentParser, argv: list[str], option: str = "--source") -> argparse.Namespace:
    """p.parse_args(argv), except that words after `option`'s value (an unquoted glob the shell expanded:
    `--source web/*.jsonl` arrives as `--source web/a.jsonl web/b.jsonl`) are said as such, not as argparse's
    "unrecognized arguments"."""
    args, extra = p.parse_known_args(argv)
    if extra:
        for i, word in enumerate(argv[:-2]):
            if word == option and argv[i + 2] == extra[0] and not extra[0].startswith("-"):
                p.error(f"argument {option}: one value each, but {extra[0]} follows {argv[i + 1]} (a glob the shell "
                        f"expanded?): quote it, {option} 'web/*.jsonl', so kiln expands it, or repeat {option}")
        p.error("unrecognized arguments: " + " ".join(extra))
    return args


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --device, as every command that loads a checkpoint takes them."""
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when a GPU is visible, else cpu (default auto)")


def add_sampling_flags(p: argparse.ArgumentParser, *, temperature: float, top_k: int) -> None:
    """kiln generate's and kiln chat's sampling flags, with the command's defaults (kiln.generate.check_flags
    checks their values before a model loads)."""
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 means greedy (default {temperature:g})")
    p.add_argument("--top-k", type=int_at_least(0), default=top_k,
                   help="0 disables it " + (f"(default {top_k})" if top_k else "(the default)"))
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables it (the default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="1 disables it (CTRL-style penalty; the default)")
