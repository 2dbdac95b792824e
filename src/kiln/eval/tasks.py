"""Downstream tasks from local jsonl: multiple choice by log-likelihood, GSM8K-style generation.

Multiple choice (HellaSwag / ARC / MMLU style), as lm-evaluation-harness 0.4 scores it zero-shot:
each choice's continuation is the task's target delimiter (" ") + the choice, scored as the summed
log-probability of its tokens after the context; the tokens are those of encode(context +
continuation) after encode(context), where trailing whitespace of the context moves into the
continuation (lm-eval's _encode_pair, context.rstrip()). Reported: accuracy (argmax of the sum) and
acc_norm (argmax of the sum divided by the choice's length in characters, without the delimiter:
lm-eval's completion_len). Record layouts, detected per record, with lm-eval's prompts:

    hellaswag   {"ctx_a", "ctx_b", "activity_label", "endings": [...], "label": "2"}   Rowan/hellaswag
                context preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices
                preprocess(ending) (lm-eval's hellaswag/utils.py); a record with only "ctx" uses it as is
    arc         {"question", "choices": {"text": [...], "label": ["A", ...]}, "answerKey": "B"} allenai/ai2_arc
                context "Question: {question}\nAnswer:", choices the texts
    mmlu        {"question", "choices": [...], "answer": 1 | "B", "subject"?}                  cais/mmlu
                context "The following are multiple choice questions (with answers) about {subject}.\n\n"
                (subject's underscores as spaces; left out without a subject) + "question\nA. ..\nB. ..\n
                Answer:", choices the letters "A", "B", ...
    generic     {"context", "choices": [...], "answer": index | letter | the choice's text}
                each choice appended as written (target delimiter "")

An empty context is replaced by [EOS] (kiln trains without BOS; lm-eval's hf model uses BOS there).

GSM8K (openai/gsm8k, config "main"): {"question", "answer": "... #### 72"}. Greedy generation, either
plain ("Question: ..\nAnswer:", few-shot examples before it, stopping at the next "Question:") or
through the chat template (--chat). exact_match: the completion's "#### N" equals the reference
(lm-eval's strict match); accuracy: its last number does (flexible extract).

The hub is not needed: pass a local jsonl of any of these layouts; --data NAME[:CONFIG] with --split
loads the HF dataset where the network or an HF cache allows it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.errors import DataError
from kiln.eval.answers import answer_number, extract_number
from kiln.eval.loss import right_padded, token_logps

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class MCItem:
    context: str
    choices: list[str]  # as lm-eval's doc_to_choice gives them; acc_norm divides by their length
    answer: int
    delimiter: str = ""  # lm-eval's target_delimiter: each continuation is delimiter + choice

    def continuations(self) -> list[str]:
        return [self.delimiter + c for c in self.choices]


def _preprocess_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _answer_index(value, choices: list[str], labels: list[str] | None, where: str, key: str = "answer") -> int:
    if isinstance(value, str) and labels and value.strip() in labels:  # ARC's labels may be "1".."4"
        idx = labels.index(value.strip())
    elif isinstance(value, int) and not isinstance(value, bool):  # true / false are no index
        idx = value
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        idx = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value.strip() in [c.strip() for c in choices]:
        idx = [c.strip() for c in choices].index(value.strip())
    else:
        idx = None
    if value is None:  # it was "answer None is not a choice index"
        raise DataError(f"{where}: no '{key}' field (the right answer: a choice's index, letter or text)")
    if (idx is None or not 0 <= idx < len(choices)) and key == "answerKey" and labels:  # ARC: a label's name
        raise DataError(f"{where}: answerKey {value!r} is not one of the labels {', '.join(labels)}")
    if idx is None:
        raise DataError(f"{where}: answer {value!r} is not a choice index, letter or choice text")
    if not 0 <= idx < len(choices):
        letter = f" (the letter {value.strip().upper()!r})" if isinstance(value, str) and not value.strip().isdigit() \
            else ""
        raise DataError(f"{where}: answer index {idx}{letter} is outside the {len(choices)} choices "
                        f"(0-{len(choices) - 1}, {LETTERS[0]}-{LETTERS[len(choices) - 1]})")
    return idx


def _text(rec: dict, key: str, where: str, default: str | None = None) -> str:
    """rec[key] as a string: a missing field (without a default) or another type is one line naming it."""
    value = rec.get(key, default)
    if value is None:
        raise DataError(f"{where}: no '{key}' field")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {json.dumps(value)[:60]}")
    return value


def _texts(value: Any, key: str, where: str) -> list[str]:
    """A record's choices: a list of at least two strings (a string would be split into its letters)."""
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise DataError(f"{where}: '{key}' must be a list of at least two strings, got {json.dumps(value)[:60]}")
    return list(value)


def mc_item(rec: dict, *, where: str) -> MCItem:
    """One multiple-choice record of any layout in the module docstring; a field of the wrong type or a
    missing one is one line naming it."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "endings" in rec:  # HellaSwag, as lm-eval's hellaswag/utils.py process_docs
        if "ctx_a" in rec:
            ctx = _text(rec, "ctx_a", where) + " " + _text(rec, "ctx_b", where, "").capitalize()
        else:
            ctx = _text(rec, "ctx", where, "")
        label = _text(rec, "activity_label", where) if rec.get("activity_label") is not None else None
        context = _preprocess_hellaswag((f"{label}: " if label is not None else "") + ctx)
        choices = [_preprocess_hellaswag(e) for e in _texts(rec["endings"], "endings", where)]
        return MCItem(context, choices, _answer_index(rec.get("label"), choices, None, where, "label"), " ")
    choices = rec.get("choices", rec.get("options"))
    if isinstance(choices, dict) and "text" in choices:  # ARC
        texts = _texts(choices["text"], "choices.text", where)
        labels = [str(x) for x in choices.get("label", LETTERS[:len(texts)])]
        context = f"Question: {_text(rec, 'question', where)}\nAnswer:"
        key = "answer" if "answer" in rec and "answerKey" not in rec else "answerKey"
        return MCItem(context, texts, _answer_index(rec.get(key), texts, labels, where, key), " ")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: expected 'choices' (or 'endings') with at least two strings")
    answer = rec.get("answer", rec.get("label", rec.get("gold")))
    if "context" in rec or "prompt" in rec or "query" in rec:  # generic: context + each choice as written
        context = _text(rec, next(k for k in ("context", "prompt", "query") if k in rec), where)
        return MCItem(context, list(choices), _answer_index(answer, list(choices), None, where))
    if "question" in rec:  # MMLU: lettered options, the letter is scored
        subject = str(rec.get("subject") or "").replace("_", " ").strip()
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
        body = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        context = f"{head}{_text(rec, 'question', where).strip()}\n{body}\nAnswer:"
        letters = list(LETTERS[:len(choices)])
        return MCItem(context, letters, _answer_index(answer, list(choices), letters, where), " ")
    raise DataError(f"{where}: no 'context' or 'question' field")


def continuation_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them; an empty context becomes [EOS]."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [tokenizer.eos_id]
    if not cont:
        raise DataError(f"choice {continuation!r} tokenizes to nothing after the context ...{context[-20:]!r} (its "
                        "text merges into the context's last token); start each choice with a space, as the "
                        "HellaSwag / ARC layouts do")
    return ctx, cont


@torch.no_grad()
def loglikelihoods(model: nn.Module, requests: list[tuple[list[int], list[int]]], *, max_len: int,
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding would produce it) per request.
    Contexts are cut from the left so context + continuation - 1 inputs fit max_len."""
    device = next(model.parameters()).device
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs, scored = [], []
        for i in idx:
            ctx, cont = requests[i]
            seq = (ctx + cont)[-(max_len + 1):]
            n = min(len(cont), len(seq) - 1)
            seqs.append(seq)
            scored.append([False] * (len(seq) - n) + [True] * n)
        tok, tgt = right_padded(seqs, scored, pad_id=0)
        logp, greedy = token_logps(model, tok.to(device), tgt.to(device), greedy=True)  # (B, T) each
        for r, i in enumerate(idx):
            out[i] = (float(logp[r].sum()), bool(greedy[r].all()))
    return out


def score_mc(model: nn.Module, tokenizer, items: list[MCItem], *, max_len: int, batch_size: int = 16) -> dict:
    """accuracy / acc_norm over `items`, plus the per-item log-likelihoods."""
    requests, spans = [], []
    for it in items:
        spans.append((len(requests), len(it.choices)))
        requests += [continuation_tokens(tokenizer, it.context, c) for c in it.continuations()]
    lls = [ll for ll, _ in loglikelihoods(model, requests, max_len=max_len, batch_size=batch_size)]
    correct = correct_norm = 0
    per_item = []
    for it, (s, n) in zip(items, spans):
        ll = lls[s:s + n]
        pred = max(range(n), key=lambda j: ll[j])
        pred_norm = max(range(n), key=lambda j: ll[j] / max(len(it.choices[j]), 1))
        correct += pred == it.answer
        correct_norm += pred_norm == it.answer
        per_item.append(ll)
    n = max(len(items), 1)
    acc = correct / n
    return {"task": "mc", "n": len(items), "accuracy": acc, "acc_norm": correct_norm / n,
            "stderr": math.sqrt(acc * (1 - acc) / max(len(items) - 1, 1)), "loglikelihoods": per_item}


# ---------------------------------------------------------------------------------------------
# GSM8K-style generation

STRICT = re.compile(r"#### (-?[0-9.,]+)")
PLAIN_STOPS = ["Question:", "\n\n\n"]


@dataclass
class GenItem:
    question: str
    answer: str  # reference solution ("... #### 72") or the bare answer


def gen_item(rec: dict, *, where: str) -> GenItem:
    if not isinstance(rec, dict) or "question" not in rec or "answer" not in rec:
        raise DataError(f"{where}: a GSM8K record needs \"question\" and \"answer\"")
    if answer_number(str(rec["answer"])) is None:  # it could only ever be scored wrong
        raise DataError(f"{where}: answer {rec['answer']!r} holds no number; give the reference as \"... #### N\" "
                        "(or the number itself)")
    return GenItem(str(rec["question"]), str(rec["answer"]))


def plain_prompt(item: GenItem, shots: list[GenItem]) -> str:
    """Few-shot text prompt in lm-eval's gsm8k layout: 'Question: ..\\nAnswer: ..' blocks."""
    parts = [f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots]
    return "".join(parts) + f"Question: {item.question}\nAnswer:"


def chat_messages(item: GenItem, shots: list[GenItem]) -> list[dict[str, str]]:
    msgs = []
    for s in shots:
        msgs += [{"role": "user", "content": s.question}, {"role": "assistant", "content": s.answer}]
    return msgs + [{"role": "user", "content": item.question}]


def strict_answer(completion: str) -> float | None:
    m = STRICT.search(completion)
    return extract_number(m.group(1)) if m else None


def score_gsm8k(items: list[GenItem], completions: list[str]) -> dict:
    """exact_match (strict '#### N') and accuracy (last number) of completions against references."""
    strict = flexible = 0
    for it, c in zip(items, completions, strict=True):
        want = answer_number(it.answer)
        if want is None:
            continue
        s, f = strict_answer(c), extract_number(c)
        strict += s is not None and math.isclose(s, want, rel_tol=1e-6, abs_tol=1e-9)
        flexible += f is not None and math.isclose(f, want, rel_tol=1e-6, abs_tol=1e-9)
    n = max(len(items), 1)
    return {"task": "gsm8k", "n": len(items), "exact_match": strict / n, "accuracy": flexible / n}
