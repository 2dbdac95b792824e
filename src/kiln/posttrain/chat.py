"""Chat templates, conversation encoding with assistant-token masks, and the post-training record checks.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
It is rendered to text by a Jinja chat template (the same renderer transformers'
`apply_chat_template` uses, so an exported tokenizer reproduces kiln's tokens exactly), and the
text is tokenized once. Which template:

    posttrain.chat_template = auto   the tokenizer's own (tokenizer_config.json `chat_template` or
                                     chat_template.jinja of an HF tokenizer folder), else kiln's default
                            = kiln   kiln's default (below), whatever the tokenizer
                            = PATH   a .jinja file

kiln's default template (KILN_TEMPLATE) is Mistral's instruct format without BOS (kiln trains
documents without one):

    [INST] {system}\\n\\n{user 1}[/INST] {assistant 1}</s>[INST] {user 2}[/INST] {assistant 2}</s>

The system message, if any, is put before the first user message. The generation prompt is the
text up to and including `[/INST]`. The Mistral tokenizers have [INST] / [/INST] as control tokens,
so every turn boundary is a token boundary; with another tokenizer they are plain text.

Assistant masks: the characters an assistant message adds are found by rendering incrementally
(the conversation up to the message with the generation prompt, then including the message); the
tokens whose character offsets overlap those spans are the assistant's, including the closing EOS
(the model must learn to stop). A template whose renders are not prefixes of each other cannot be
masked this way and raises DataError.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.data.tokenizer import Tokenizer
from kiln.errors import DataError

KILN_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for m in turns %}"
    "{%- if m['role'] == 'user' %}"
    "{{- '[INST] ' }}{%- if loop.first and system %}{{- system + '\\n\\n' }}{%- endif %}{{- m['content'] + '[/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{{- ' ' + m['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('kiln chat template: roles are system (first only), user and assistant') }}"
    "{%- endif %}"
    "{%- endfor %}"
)
ROLES = ("system", "user", "assistant")


def tokenizer_chat_template(spec: str) -> str | None:
    """The chat template shipped with an HF tokenizer folder (or next to a tokenizer.json), if any."""
    path = Path(spec).expanduser()
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    if folder is None:
        return None  # a named kiln tokenizer (mistral-v3 ...): no template of its own
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else None


def resolve_template(choice: str, tokenizer_spec: str) -> tuple[str, str]:
    """(name, Jinja source) of the chat template for `posttrain.chat_template` = choice."""
    if choice == "auto":
        own = tokenizer_chat_template(tokenizer_spec)
        return ("tokenizer", own) if own else ("kiln", KILN_TEMPLATE)
    if choice == "kiln":
        return "kiln", KILN_TEMPLATE
    path = Path(choice).expanduser()
    if not path.is_file():
        if "/" in choice or choice.endswith(".jinja"):  # meant as a file: say it is not there
            raise DataError(f"posttrain.chat_template: no such file {choice}; pass auto, kiln, or a path to a "
                            ".jinja file")
        raise DataError(f"posttrain.chat_template={choice!r}: expected auto, kiln, or a path to a .jinja file")
    return str(path), path.read_text()


def check_messages(messages: Any, *, where: str) -> list[dict[str, str]]:
    """Validate one conversation; DataError naming `where` (file:line) otherwise."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, "
                            f"\"content\": text}}, got {str(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


@dataclass
class Encoded:
    """A tokenized conversation. mask[j] is True where token j was written by a trained assistant turn."""

    ids: np.ndarray  # (L,) int32 (half the memory of int64; batches are built as int64)
    mask: np.ndarray  # (L,) bool


class ChatFormat:
    """Renders conversations with one template and tokenizes them with kiln's tokenizer."""

    def __init__(self, tokenizer: Tokenizer, *, template: str = KILN_TEMPLATE, name: str = "kiln") -> None:
        self.tokenizer, self.template, self.name = tokenizer, template, name
        self._special = {k: v for k, v in (("eos_token", tokenizer.eos_token), ("bos_token", tokenizer.bos_token),
                                            ("unk_token", tokenizer.unk_token)) if v}

    @classmethod
    def for_config(cls, tokenizer: Tokenizer, *, chat_template: str, tokenizer_spec: str) -> ChatFormat:
        name, template = resolve_template(chat_template, tokenizer_spec)
        return cls(tokenizer, template=template, name=name)

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The template's text for `messages` (what `apply_chat_template(tokenize=False)` returns)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.template,
                                                add_generation_prompt=add_generation_prompt, **self._special)
        except Exception as e:  # jinja errors, raise_exception() from the template
            raise DataError(f"chat template '{self.name}': {str(e).splitlines()[0] if str(e) else e!r}") from None
        return rendered[0]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Tokens of `messages` followed by the generation prompt: what the model continues at inference."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt=True))

    def encode(self, messages: list[dict[str, str]], *, train_on: str = "all") -> Encoded:
        """Tokens of the whole conversation and the mask of assistant tokens.

        train_on="all" marks every assistant message, "last" only the final one (DPO, whose pair
        differs in that message alone).
        """
        full = self.render(messages)
        targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on == "last":
            targets = targets[-1:] if targets and targets[-1] == len(messages) - 1 else []
        spans = []
        for i in targets:
            before = self.render(messages[:i], add_generation_prompt=True)
            after = self.render(messages[: i + 1])
            if not (after.startswith(before) and full.startswith(after)):
                raise DataError(f"chat template '{self.name}': the text rendered up to message {i} is not a "
                                "prefix of the whole conversation, so assistant tokens cannot be located; use "
                                "--posttrain.chat_template kiln")
            spans.append((len(before), len(after)))
        enc = self.tokenizer.backend.encode(full, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        if spans:
            starts = np.asarray([o[0] for o in enc.offsets])
            ends = np.asarray([o[1] for o in enc.offsets])
            for a, b in spans:
                mask |= (starts < b) & (ends > a)
        return Encoded(ids=ids, mask=mask)


# ---------------------------------------------------------------------------------------------
# Post-training records (read by kiln.data.records.load_records)


@contextlib.contextmanager
def naming(where: str) -> Iterator[None]:
    """A DataError raised inside (a template that refuses a message order) names the record `where`."""
    try:
        yield
    except DataError as e:
        if str(e).startswith(where):
            raise
        raise DataError(f"{where}: {e}") from None


def as_messages(value: Any, *, role: str, where: str, field: str) -> list[dict[str, str]]:
    """A string (one message of `role`), one message object, or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: '{field}' must be a string or a list of messages")
    return check_messages(value, where=f"{where} ({field})")


def write_chat_template(folder: Path, *, chat_template: str, tokenizer_spec: str) -> str:
    """Put the resolved chat template into an exported tokenizer_config.json; returns its name."""
    name, template = resolve_template(chat_template, tokenizer_spec)
    cfg_file = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = template
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return name
