"""Downstream tasks scored inside training (`train.eval_tasks`), on a fixed subset at every eval.

    heldout-next   bundled, offline: a passage of a held-out document (the bundled corpus's validation
                   split, never trained on) and four candidate next sentences: the true one and three
                   of similar length from other held-out documents. Chance is 25%. Like HellaSwag or
                   StoryCloze it asks which continuation the model finds likeliest, scored the same way
                   (kiln.eval.tasks: acc = argmax of the summed log-likelihood, acc_norm = per character).
    FILE.jsonl     multiple choice in the HellaSwag / ARC / MMLU / generic layouts of kiln.eval.tasks

Each task's items are the first `limit` of the file (heldout-next: `limit` items drawn with a fixed seed),
so every eval scores the same items and the curve moves only with the model. Logged as
eval/<task>/acc and eval/<task>/acc_norm.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from torch import nn

from kiln.config import SourceConfig
from kiln.data.records import load_records
from kiln.data.sources import load_documents
from kiln.errors import DataError
from kiln.eval.tasks import MCItem, mc_item, score_mc

BUILTIN = ("heldout-next",)
_SENTENCE = re.compile(r"[^.!?]*[.!?]+[\"')\]]*\s+", re.S)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text.replace("\n", " ")) if s.strip()]


def heldout_next_items(texts: list[str], *, n: int, seed: int = 0, n_choices: int = 4) -> list[MCItem]:
    """`n` next-sentence items from `texts` (one per document at most per pass; see the module docstring)."""
    docs = [_sentences(t) for t in texts]
    pool = [(d, s) for d, sents in enumerate(docs) for s in sents if 25 <= len(s) <= 200]
    rng = random.Random(seed)
    items: list[MCItem] = []
    candidates = [(d, i) for d, sents in enumerate(docs) for i in range(3, len(sents))
                  if 25 <= len(sents[i]) <= 200]
    rng.shuffle(candidates)
    for d, i in candidates:
        if len(items) >= n:
            break
        true = docs[d][i]
        context = " ".join(docs[d][i - 3:i])[-400:]
        others = [s for dd, s in pool if dd != d and abs(len(s) - len(true)) <= max(20, len(true) // 3)]
        if len(others) < n_choices - 1:
            continue
        choices = rng.sample(others, n_choices - 1)
        answer = rng.randrange(n_choices)
        choices.insert(answer, true)
        items.append(MCItem(context=context, choices=choices, answer=answer, delimiter=" "))
    return items


def task_name(spec: str) -> str:
    """The name a task logs under: builtin names as they are, files by their stem."""
    return spec if spec in BUILTIN else Path(spec).stem


def load_tasks(specs: list[str], *, limit: int, seed: int = 0) -> dict[str, list[MCItem]]:
    """{name: items} for `train.eval_tasks`; an unknown name or missing file is one DataError line."""
    tasks: dict[str, list[MCItem]] = {}
    for spec in specs:
        name = task_name(spec)
        if name in tasks:
            raise DataError(f"train.eval_tasks: '{spec}' is listed twice (tasks log under their name: {name})")
        if spec == "heldout-next":
            texts = list(load_documents(SourceConfig(path="bundled:val", name="bundled"))["text"])
            tasks[name] = heldout_next_items(texts, n=limit, seed=seed)
            continue
        if not Path(spec).expanduser().is_file():
            raise DataError(f"train.eval_tasks: no such task file '{spec}'; a task is one of {', '.join(BUILTIN)} "
                            "or a local .jsonl of multiple-choice records (HellaSwag / ARC / MMLU layouts)")
        records = load_records(spec, what="train.eval_tasks")[:limit]
        tasks[name] = [mc_item(r, where=w) for w, r in records]
    return tasks


def score_tasks(model: nn.Module, tokenizer, tasks: dict[str, list[MCItem]], *, max_len: int,
                batch_size: int) -> dict[str, float]:
    """{eval/<task>/acc, eval/<task>/acc_norm} of `model` (every rank of a sharded model calls it alike)."""
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    for name, items in tasks.items():
        res = score_mc(model, tokenizer, items, max_len=max_len, batch_size=batch_size)
        out[f"eval/{name}/acc"], out[f"eval/{name}/acc_norm"] = res["accuracy"], res["acc_norm"]
    model.train(was_training)
    return out
