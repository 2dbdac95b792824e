"""`kiln eval`: loss, perplexity and bits per byte of a checkpoint on any text source."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from kiln.config import SourceConfig
from kiln.data.loader import validation_batches
from kiln.data.sources import check_text_column_flag, is_hub_source
from kiln.data.tokenizer import load_tokenizer
from kiln.device import autocast_dtype, autocast_for
from kiln.errors import DataError
from kiln.eval.loss import evaluate
from kiln.train.checkpoint import load_for_inference


def scored_bytes(batches: list, tokenizer: Any) -> int:
    """UTF-8 bytes of the text behind the scored targets (EOS scores but has no bytes). The rows are consecutive
    pieces of one packed stream, so each run of scored targets (a document, up to its EOS) is decoded after the
    input token before it, whose bytes are taken off again: a run decoded on its own loses the space its first
    token carries (SentencePiece drops a text's leading space), which made the bytes, and so bits per byte,
    depend on the row length."""
    def size(ids: list[int]) -> int:
        return len(tokenizer.decode(ids).encode("utf-8"))

    total, run, prefix = 0, [], []
    for b in batches:
        for x, t in zip(b.tokens.flatten().tolist(), b.targets.flatten().tolist()):
            if t >= 0 and t != tokenizer.eos_id:
                if not run:  # a document's first scored token follows this input (none after an EOS)
                    prefix = [] if x == tokenizer.eos_id else [x]
                run.append(t)
                continue
            if run:
                total += size(prefix + run) - size(prefix)
            run = []
    return total + (size(prefix + run) - size(prefix) if run else 0)


def evaluate_source(checkpoint: str, data: str, *, text_column: str = "text", max_tokens: int = 1_000_000,
                    batch_size: int = 8, seq_len: int = 0, device: str = "auto", split: str = "",
                    dtype: str | None = None) -> dict[str, Any]:
    """Score the first `max_tokens` tokens of `data` (documents in file order, packed as in training);
    `split`: the split of an HF dataset name (default train); `dtype`: train.dtype's choices (default: the
    checkpoint's own)."""
    _not_a_task(data, "loss")
    src = SourceConfig(path=data, name=Path(data).stem or data, text_column=text_column, split=split or "train")
    if split and not is_hub_source(src):  # a local file or the bundled corpus has one split
        raise DataError(f"--split applies to an HF dataset name; {data} is a local source with no splits: drop it")
    check_text_column_flag(text_column, [src])
    if (Path(data) / "metrics.jsonl").is_file() or (Path(data) / "checkpoints").is_dir():  # read as JSON data
        raise DataError(f"--data {data}: a kiln run folder, not text to score; pass a text, jsonl or parquet source "
                        f"(or --checkpoint {data} to evaluate that run)")
    model, cfg, ckpt = load_for_inference(checkpoint, device=device)
    tok = load_tokenizer(cfg.data.tokenizer)
    T = seq_len or cfg.train.seq_len
    if T > cfg.model.max_seq_len:  # positions past it were never trained (kiln train refuses the same)
        raise DataError(f"--seq-len {T} exceeds the model's max_seq_len ({cfg.model.max_seq_len}) of {ckpt}; "
                        f"pass --seq-len {cfg.model.max_seq_len} or less")
    try:
        batches = validation_batches(src, tok, seq_len=T, batch_size=batch_size, max_tokens=max_tokens)
    except DataError as e:  # the data layer names the config key; here the user typed a command
        raise DataError(str(e).replace("; set text_column on the source", "; pass --text-column NAME (or --task "
                                       "mc / gsm8k for a benchmark file)")) from None
    dev = next(model.parameters()).device
    dtype = dtype or cfg.train.dtype
    res = evaluate(model, batches, device=dev, doc_mask=cfg.data.doc_mask, autocast=autocast_for(dtype, dev),
                   impl=cfg.train.loss_impl)
    n_bytes = scored_bytes(batches, tok)
    return {"loss": res["loss"], "ppl": res["ppl"], "bits_per_byte": res["nats"] / math.log(2) / max(n_bytes, 1),
            "tokens": res["tokens"], "bytes": n_bytes, "precision": precision_name(dtype, dev),
            "checkpoint": str(ckpt), "data": data}


def precision_name(dtype: str, device: Any) -> str:
    """What the scores were computed in: "bf16 autocast" or "fp32" (train.dtype auto resolves per device)."""
    low = autocast_dtype(dtype, device)
    return f"{str(low).removeprefix('torch.').replace('bfloat16', 'bf16').replace('float16', 'fp16')} autocast" \
        if low is not None else "fp32"


def _not_a_task(data: str, task: str) -> None:
    """A bundled multiple-choice task (heldout-next) is scored by --task mc only; it is no text, file or dataset."""
    from kiln.eval.suite import BUILTIN

    if data in BUILTIN and task != "mc":
        raise DataError(f"--data {data} is a bundled multiple-choice task; score it with --task mc")


def _records(data: str, split: str, limit: int, what: str = "--data") -> list[tuple[str, dict]]:
    from kiln.data.records import load_records

    recs = load_records(data, split=split or "test", what=what)
    return recs[:limit] if limit > 0 else recs


def evaluate_task(checkpoint: str, data: str, *, task: str, limit: int | None = None, split: str = "", batch_size: int = 8,
                  max_new_tokens: int = 256, chat: bool = False, num_fewshot: int = 0, fewshot_data: str = "",
                  device: str = "auto", dtype: str | None = None) -> dict[str, Any]:
    """`kiln eval --task mc|gsm8k`: a downstream benchmark on local jsonl (kiln.eval.tasks), under the
    checkpoint's autocast (train.dtype: bf16 on CUDA by default). `--task mc --data heldout-next` scores
    the bundled task of `train.eval_tasks` (kiln.eval.suite): its items drawn with the checkpoint's
    run.seed and scored within train.seq_len, as the run's in-training eval does: its first `limit` (None: the
    run's train.eval_tasks_limit, the items its logged eval/<task>/acc scored; 0: all)."""
    from kiln.eval.suite import BUILTIN, load_tasks

    _not_a_task(data, task)
    model, cfg, ckpt = load_for_inference(checkpoint, device=device)
    tok = load_tokenizer(cfg.data.tokenizer)
    if data in BUILTIN:  # the numbers the run's eval/<task>/acc logged, for its checkpoints and any other
        n = cfg.train.eval_tasks_limit if limit is None else limit or sys.maxsize
        items = load_tasks([data], limit=n, seed=cfg.run.seed)[data]
        recs, max_len = [(data, item) for item in items], cfg.train.seq_len
    else:
        recs, max_len = _records(data, split, limit or 0), cfg.model.max_seq_len
    dtype, dev = dtype or cfg.train.dtype, next(model.parameters()).device
    with autocast_for(dtype, dev):  # the precision `kiln eval --task loss` uses
        res = _run_task(model, cfg, tok, recs, task=task, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        chat=chat, num_fewshot=num_fewshot, fewshot_data=fewshot_data, max_len=max_len)
    res.update({"precision": precision_name(dtype, dev), "checkpoint": str(ckpt), "data": data})
    return res


def _run_task(model, cfg, tok, recs: list[tuple[str, Any]], *, task: str, batch_size: int, max_new_tokens: int,
              chat: bool, num_fewshot: int, fewshot_data: str, max_len: int) -> dict[str, Any]:
    from kiln.errors import DataError
    from kiln.eval import tasks as T

    if task == "mc":
        items = [r if isinstance(r, T.MCItem) else T.mc_item(r, where=w) for w, r in recs]  # heldout-next: items
        res = T.score_mc(model, tok, items, max_len=max_len, batch_size=batch_size)
        res.pop("loglikelihoods")
        # "acc" as lm-eval and the training logs (eval/<task>/acc) name it; "accuracy" stays for existing scripts
        res = {"task": res["task"], "n": res["n"], "acc": res["accuracy"], **res}
    elif task == "gsm8k":
        from kiln.generate import generate_texts, prompt_room

        items = [T.gen_item(r, where=w) for w, r in recs]
        shots: list = []
        if num_fewshot:
            if not fewshot_data:
                raise DataError("--num-fewshot needs --fewshot-data FILE.jsonl (worked examples, e.g. GSM8K train)")
            examples = _records(fewshot_data, "train", 0, what="--fewshot-data")
            if len(examples) < num_fewshot:
                raise DataError(f"--fewshot-data {fewshot_data} has {len(examples)} examples; lower --num-fewshot "
                                f"{num_fewshot} to {len(examples)} or fewer, or add examples")
            shots = [T.gen_item(r, where=w) for w, r in examples[:num_fewshot]]
            scored = {it.question.strip() for it in items}
            leaked = sum(s.question.strip() in scored for s in shots)
            if leaked:  # its answer is in the prompt: the score flatters the model
                print(f"note: {leaked} of the {num_fewshot} few-shot examples are items scored here (--fewshot-data "
                      f"{fewshot_data} holds them): their answers are in every prompt; take the examples from another "
                      "split (GSM8K's train)", file=sys.stderr)
        if chat:
            from kiln.posttrain.chat import ChatFormat

            fmt = ChatFormat.for_config(tok, chat_template=cfg.posttrain.chat_template,
                                        tokenizer_spec=cfg.data.tokenizer)
            prompts, stops = [fmt.prompt_ids(T.chat_messages(it, shots)) for it in items], []
        else:
            prompts, stops = [tok.encode(T.plain_prompt(it, shots)) for it in items], T.PLAIN_STOPS
        room = prompt_room(max_new_tokens, cfg.model.max_seq_len, setting="--max-new-tokens")
        prompts = [p[-room:] for p in prompts]
        completions = []
        for i in range(0, len(prompts), batch_size):
            completions += generate_texts(model, tok, prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                                          temperature=0.0, stop=stops)
        res = T.score_gsm8k(items, completions)
    else:
        raise DataError(f"--task {task}: expected loss, mc or gsm8k")
    return res
