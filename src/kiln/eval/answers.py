"""Numbers in model answers: the last number of a completion, and a reference answer's number (GSM8K's
"#### 72" marker). The GSM8K task (kiln.eval.tasks) scores with them, and so does RLVR's numeric reward
(kiln.posttrain.rewards)."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> float | None:
    """The last number in `text` (commas as thousands separators, optional sign and decimals), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def answer_number(answer: str) -> float | None:
    """The reference number: what follows GSM8K's '####' marker if present, else the last number."""
    if "####" in answer:
        answer = answer.split("####")[-1]
    return extract_number(answer)
