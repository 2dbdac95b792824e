"""Verifiable rewards for RLVR: each verifier maps (prompt, completion, answer) -> float.

A reward spec (posttrain.rewards is a list of them; the reward is their sum) is one of:

    numeric              1.0 when the last number in the completion equals the answer's number
                         (a GSM8K answer "... #### 72" counts as 72; 1,000 == 1000; 3.0 == 3), else 0.0
    exact                1.0 when the stripped completion equals the stripped answer
    contains             1.0 when the stripped answer occurs in the completion
    regex:PATTERN        1.0 when PATTERN (Python re) matches anywhere in the completion (format checks)
    python:MOD:FUNC      a user function FUNC(prompt, completion, answer) -> float, from an importable
                         module (my_pkg.verifiers:score) or a file (path/to/verify.py:score)

Any spec may carry a weight: `0.2*regex:^\\d+$`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ConfigError, KilnError
from kiln.eval.answers import answer_number, extract_number

Verifier = Callable[[str, str, str], float]
WEIGHT = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*\*\s*(.+)$", re.S)  # -0.5*contains: a penalty


class RewardError(KilnError):
    """A user verifier that failed or returned something other than a finite number."""


def numeric_match(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's last number equals the answer's number (within 1e-6 relative)."""
    want, got = answer_number(str(answer)), extract_number(completion)
    if want is None or got is None:
        return 0.0
    return 1.0 if math.isclose(want, got, rel_tol=1e-6, abs_tol=1e-9) else 0.0


def exact_match(prompt: str, completion: str, answer: str) -> float:
    return 1.0 if completion.strip() == str(answer).strip() else 0.0


def contains_match(prompt: str, completion: str, answer: str) -> float:
    return 1.0 if str(answer).strip() and str(answer).strip() in completion else 0.0


def regex_verifier(pattern: str) -> Verifier:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"posttrain.rewards: regex:{pattern}: invalid pattern ({e})") from None

    def verify(prompt: str, completion: str, answer: str) -> float:
        return 1.0 if rx.search(completion) else 0.0

    return verify


def python_verifier(target: str) -> Verifier:
    """`module:function` or `path/to/file.py:function` -> the function."""
    mod_name, _, func_name = target.rpartition(":")
    if not mod_name or not func_name:
        raise ConfigError(f"posttrain.rewards: python:{target}: expected python:MODULE:FUNCTION or python:FILE.py:FUNCTION")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.is_file():
                raise ConfigError(f"posttrain.rewards: python:{target}: no such file {path}")
            spec = importlib.util.spec_from_file_location(f"kiln_verifier_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"posttrain.rewards: python:{target}: cannot import {mod_name} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"posttrain.rewards: python:{target}: {mod_name} has no function {func_name}")
    return fn


@dataclass
class Reward:
    """A weighted sum of verifiers, built from posttrain.rewards."""

    specs: list[str]
    parts: list[tuple[float, Verifier]]

    def __call__(self, prompt: str, completion: str, answer: str) -> float:
        total = 0.0
        for spec, (w, fn) in zip(self.specs, self.parts):
            try:
                r = fn(prompt, completion, answer)
            except (Exception, SystemExit) as e:  # sys.exit() in a verifier ended the run without a word
                raise RewardError(f"reward {spec}: raised {type(e).__name__}: {str(e)[:100]} on completion "
                                  f"{completion[:60]!r}") from None
            if isinstance(r, bool):
                raise RewardError(f"reward {spec}: returned {r!r}, a bool; return a number (float(...): 1.0 / 0.0)")
            if not isinstance(r, numbers.Real) or not math.isfinite(r):  # numpy's scalars are Real too
                raise RewardError(f"reward {spec}: returned {r!r}; a verifier must return a finite number")
            total += w * float(r)
        return total


BUILTIN: dict[str, Verifier] = {"numeric": numeric_match, "exact": exact_match, "contains": contains_match}


def build_reward(specs: list[str]) -> Reward:
    """Parse posttrain.rewards; ConfigError names a bad spec."""
    if not specs:
        raise ConfigError("posttrain.rewards: give at least one verifier (numeric, exact, contains, regex:..., python:...)")
    parts = []
    for spec in specs:
        weight, body = 1.0, spec
        if m := WEIGHT.match(spec):
            weight, body = float(m.group(1)), m.group(2)
        kind, _, arg = body.partition(":")
        if body in BUILTIN:
            parts.append((weight, BUILTIN[body]))
        elif kind == "regex" and arg:
            parts.append((weight, regex_verifier(arg)))
        elif kind == "python" and arg:
            parts.append((weight, python_verifier(arg)))
        else:
            split = " (a comma-separated list is split at every comma: pass a pattern with a comma in a JSON list, " \
                "'[\"regex:a{1,3}\"]')" if any(s.startswith("regex:") for s in specs) else ""
            raise ConfigError(f"posttrain.rewards: unknown verifier {spec!r}; use numeric, exact, contains, "
                              f"regex:PATTERN or python:MODULE:FUNCTION (optionally WEIGHT*SPEC){split}")
    return Reward(list(specs), parts)
