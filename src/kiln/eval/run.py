"""`kiln eval`: loss, perplexity and bits per byte of a checkpoint on any text source."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kiln.config import SourceConfig
from kiln.data.loader import validation_batches
from kiln.data.tokenizer import load_tokenizer
from kiln.eval.loss import evaluate
from kiln.train.trainer import autocast_for, load_model_for_cli


def scored_bytes(batches: list, tokenizer: Any) -> int:
    """UTF-8 bytes of the text behind the scored targets (EOS scores but has no bytes)."""
    total = 0
    for b in batches:
        for row in b.targets.tolist():
            ids = [t for t in row if t >= 0 and t != tokenizer.eos_id]
            total += len(tokenizer.decode(ids).encode("utf-8"))
    return total


def evaluate_source(checkpoint: str, data: str, *, text_column: str = "text", max_tokens: int = 1_000_000,
                    batch_size: int = 8, seq_len: int = 0, device: str = "auto") -> dict[str, Any]:
    """Score the first `max_tokens` tokens of `data` (documents in file order, packed as in training)."""
    model, cfg, ckpt = load_model_for_cli(checkpoint, device=device)
    tok = load_tokenizer(cfg.data.tokenizer)
    src = SourceConfig(path=data, name=Path(data).stem or data, text_column=text_column)
    T = seq_len or cfg.train.seq_len
    batches = validation_batches(src, tok, seq_len=T, batch_size=batch_size, max_tokens=max_tokens)
    dev = next(model.parameters()).device
    res = evaluate(model, batches, device=dev, doc_mask=cfg.data.doc_mask, autocast=autocast_for(cfg, dev))
    n_bytes = scored_bytes(batches, tok)
    return {"loss": res["loss"], "ppl": res["ppl"], "bits_per_byte": res["nats"] / math.log(2) / max(n_bytes, 1),
            "tokens": res["tokens"], "bytes": n_bytes, "checkpoint": str(ckpt), "data": data}
