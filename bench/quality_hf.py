"""The Hugging Face side of bench/quality.py, and the one scorer both systems' models go through.

`score_bpb` reads any folder that `AutoModelForCausalLM` + `AutoTokenizer` load (a `kiln export`, or
the Trainer run's output) and returns bits per byte on held-out text:

    bpb = sum over every token of the text of -ln p(token | the tokens before it in its window)
          / (ln 2 x UTF-8 bytes of the text)

Each document is encoded by the model's own tokenizer (no special tokens added), preceded by the
tokenizer's EOS (the document separator both systems train with: it is context, never a target), and
cut into non-overlapping windows of `window` targets: window k feeds ids[kW : kW+W] and scores
ids[kW+1 : kW+W+1], positions restarting at 0 in each window. So every token of the text is scored
exactly once, with 1 to W tokens of context, whatever the tokenizer; bytes do not depend on it.

`hf_main` is the HF Trainer run (a child process of bench/quality.py): the run_clm recipe.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import datasets
import quiet_imports  # noqa: F401  (before transformers: quiets torchao's CPU notices)
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from kiln.data.tokenizer import mistral_model_file


def load_texts(path: str | Path) -> list[str]:
    """The documents of a held-out file: jsonl(.gz) with "text" (one per line), or a .txt(.gz) as one document."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        if ".jsonl" in p.suffixes or ".json" in p.suffixes:
            return [json.loads(line)["text"] for line in f if line.strip()]
        return [f.read()]


def _window_nats(model: Any, x: list[list[int]], y: list[list[int]]) -> float:
    logits = model(input_ids=torch.tensor(x), use_cache=False).logits.float()  # (B, W, V)
    return F.cross_entropy(logits.flatten(0, 1), torch.tensor(y).flatten(), reduction="sum").item()


@torch.inference_mode()
def score_bpb(model_dir: str | Path, texts: list[str], *, window: int = 256, batch_size: int = 8) -> dict[str, Any]:
    """Bits per byte of `texts` under the model in `model_dir` (see the module docstring); fp32."""
    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if tok.eos_token_id is None:
        raise ValueError(f"{model_dir}: the tokenizer has no EOS token to start each document with")
    nats, tokens, n_bytes = 0.0, 0, 0
    for text in texts:
        ids = [tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        tokens, n_bytes = tokens + len(ids) - 1, n_bytes + len(text.encode("utf-8"))
        starts = range(0, len(ids) - 1, window)
        full = [s for s in starts if s + window + 1 <= len(ids)]
        for i in range(0, len(full), batch_size):
            group = full[i:i + batch_size]
            nats += _window_nats(model, [ids[s:s + window] for s in group], [ids[s + 1:s + window + 1] for s in group])
        tail = [s for s in starts if s + window + 1 > len(ids)]
        for s in tail:  # the last, shorter window
            nats += _window_nats(model, [ids[s:-1]], [ids[s + 1:]])
    return {"bpb": nats / (math.log(2) * n_bytes), "nats": nats, "tokens": tokens, "bytes": n_bytes,
            "bits_per_token": nats / math.log(2) / max(tokens, 1), "window": window}


# ---------------------------------------------------------------------------------------------
# The HF Trainer run (a child process: `python bench/quality.py --hf-child SPEC.json`)


def hf_tokenizer(spec: str, out: Path) -> Any:
    """The tokenizer an HF user would build: the Mistral SentencePiece file through LlamaTokenizer
    (FACTS.md: LlamaTokenizerFast(vocab_file=...) is empty in transformers 5), or an HF folder."""
    if spec in ("mistral-v3", "mistral-v1"):
        src = out / "sentencepiece"
        src.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mistral_model_file(spec), src / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(str(src))
    else:
        tok = AutoTokenizer.from_pretrained(spec)
    return tok


def hf_dataset(corpus: str, tok: Any, *, block: int, cache: Path) -> Any:
    """run_clm's data: tokenize each document (EOS appended: documents must not run together, and kiln's
    packer does the same), concatenate, cut into `block`-token blocks (the remainder dropped), labels = inputs."""
    raw = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=str(cache))
    eos = tok.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": [ids + [eos] for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // block * block
        blocks = [flat[i:i + block] for i in range(0, n, block)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    ds = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    # run_clm groups 1000 documents at a time; all at once drops only one remainder
    return ds.map(group, batched=True, batch_size=len(ds))


class StepClock(TrainerCallback):
    """When train() began and when each step ended."""

    def __init__(self) -> None:
        self.begin, self.ends = 0.0, []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.begin = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ends.append(time.perf_counter())


def _trainer(spec: dict[str, Any], ds: Any, tok: Any, *, max_steps: int, out: Path, clock: StepClock) -> Any:
    torch.manual_seed(spec["seed"])  # the same initial weights in the warm-up and the timed run
    model = LlamaForCausalLM(LlamaConfig(**spec["model"], bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id)).float()
    sched = {"cosine": "cosine_with_min_lr", "constant": "constant_with_warmup"}[spec["schedule"]]
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["accum"], learning_rate=spec["lr"], lr_scheduler_type=sched,
        lr_scheduler_kwargs={"min_lr_rate": spec["min_lr_ratio"]} if sched == "cosine_with_min_lr" else {},
        warmup_steps=spec["warmup_steps"], weight_decay=spec["weight_decay"], adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1], adam_epsilon=spec["eps"], max_grad_norm=spec["grad_clip"],
        optim="adamw_torch_fused", use_cpu=True, seed=spec["seed"], data_seed=spec["seed"], logging_steps=10,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
                   callbacks=[clock])


def fit_hf_steps(budget: float, *, step: float, overhead: float, warmup: int) -> int:
    """The most steps whose train() fits: overhead + n x step <= budget less a 2% margin (as kiln's plan)."""
    margin = max(0.02 * budget, 2 * step)
    return max(int((budget - margin - overhead) // max(step, 1e-9)), 0)


def hf_main(spec_path: str) -> int:
    """Run the HF side described by SPEC.json and write its result beside it (hf_result.json)."""
    t0 = time.time()
    datasets.disable_progress_bars()
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out_dir"])
    tok = hf_tokenizer(spec["tokenizer"], out)
    ds = hf_dataset(spec["corpus"], tok, block=spec["seq_len"], cache=out / "datasets")
    data_s = time.time() - t0
    # 20 steps timed, the first 5 gaps not counted: a plan timed on 10 gaps left HF 30% of its budget unused
    # (2026-12-04: 1.90 s/step timed, 1.36 s/step run), and a longer sample is less at the mercy of one slow
    # stretch of a shared machine
    warm_n = 21
    clock = StepClock()
    _trainer(spec, ds, tok, max_steps=warm_n, out=out / "warmup", clock=clock).train()
    gaps = [b - a for a, b in zip(clock.ends, clock.ends[1:])][5:]
    step = statistics.median(gaps)
    overhead = max(clock.ends[0] - clock.begin - step, 0.0)  # train() set-up and the first step's one-off costs
    n = fit_hf_steps(spec["budget_s"], step=step, overhead=overhead, warmup=spec["warmup_steps"])
    if n <= spec["warmup_steps"]:
        raise SystemExit(f"HF: budget {spec['budget_s']:.0f} s fits {n} steps of {step:.2f} s, not more than the "
                         f"{spec['warmup_steps']} warmup steps; raise --budget")
    clock = StepClock()
    trainer = _trainer(spec, ds, tok, max_steps=n, out=out / "trainer", clock=clock)
    metrics = trainer.train().metrics
    final = out / "final"
    trainer.save_model(str(final))
    tok.save_pretrained(str(final))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    result = {"steps": trainer.state.global_step, "train_s": metrics["train_runtime"],
              "process_s": time.time() - t0, "data_s": data_s, "warmup_step_s": step, "warmup_overhead_s": overhead,
              "tokens": trainer.state.global_step * spec["micro_batch"] * spec["accum"] * spec["seq_len"],
              "n_params": sum(p.numel() for p in trainer.model.parameters()), "final_train_loss": losses[-1],
              "blocks": len(ds), "model_dir": str(final)}
    (out / "hf_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0
