"""Post-training with kiln's default LRs: derived from the checkpoint (kiln.posttrain.lr) against the
fixed defaults kiln had before (SFT 2e-5, DPO 5e-7, RLVR 1e-6), through the CLI as a user runs it.

    PYTHONPATH=src .venv/bin/python -m kiln train tiny --run.out_dir /tmp/pt-tiny --train.max_steps 300
    PYTHONPATH=src .venv/bin/python bench/posttrain_lr.py --checkpoint /tmp/pt-tiny --out /tmp/pt-lr

Data kiln has never seen, written here: 400 addition chats (a, b < 20) for SFT, 200 preference pairs
(the right sum over a wrong one) for DPO, 100 addition prompts (a, b < 5) with numeric answers for RLVR.
DPO and RLVR start from the SFT run with derived defaults (the usual SFT -> DPO / RLVR chain, which
also checks that the pretraining peak travels through posttrain.pretrain_lr). Prints one table.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from kiln.train.metrics import read_metrics

OLD = {"sft": 2e-5, "dpo": 5e-7, "rlvr": 1e-6}  # kiln's fixed defaults before kiln.posttrain.lr


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data(folder: Path) -> dict[str, tuple[Path, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)

    def chat(a: int, b: int) -> dict:
        return {"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                             {"role": "assistant", "content": f"{a + b}"}]}

    def pair(a: int, b: int) -> dict:
        return {"prompt": f"What is {a}+{b}?", "chosen": f"{a + b}", "rejected": f"{a + b + rng.randint(1, 5)}"}

    def two(hi: int) -> tuple[int, int]:
        return rng.randrange(hi), rng.randrange(hi)

    sft = (_jsonl(folder / "sft.jsonl", [chat(*two(20)) for _ in range(400)]),
           _jsonl(folder / "sft_val.jsonl", [chat(*two(20)) for _ in range(64)]))
    dpo = (_jsonl(folder / "dpo.jsonl", [pair(*two(20)) for _ in range(200)]),
           _jsonl(folder / "dpo_val.jsonl", [pair(*two(20)) for _ in range(64)]))
    tasks = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b)} for a, b in (two(5) for _ in range(100))]
    val = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b)} for a in range(5) for b in range(5)]
    rlvr = (_jsonl(folder / "rlvr.jsonl", tasks), _jsonl(folder / "rlvr_val.jsonl", val))
    return {"sft": sft, "dpo": dpo, "rlvr": rlvr}


def run(stage: str, ckpt: Path, data: tuple[Path, Path], out: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "kiln", stage, "--checkpoint", str(ckpt), "--data", str(data[0]),
           "--val-data", str(data[1]), "--run.out_dir", str(out), "--quiet", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
    return next((line for line in res.stdout.splitlines() if "optim.lr" in line), "")


def summary(stage: str, out: Path) -> dict[str, float]:
    recs = read_metrics(out)
    tr = [r for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    key = {"sft": "loss", "dpo": "rewards/margin", "rlvr": "reward"}[stage]
    eval_key = {"sft": "eval_loss", "dpo": "eval_rewards/margin", "rlvr": "eval_reward"}[stage]

    def mean(xs: list[float]) -> float:
        return sum(xs) / max(len(xs), 1)

    return {"lr": tr[0]["lr"] if stage == "rlvr" else max(r["lr"] for r in tr), "metric": key,
            "train_first": mean([r[key] for r in tr[:5]]), "train_last": mean([r[key] for r in tr[-5:]]),
            "eval_first": ev[0][eval_key], "eval_last": ev[-1][eval_key],
            **({"eval_acc_last": ev[-1]["eval_rewards/accuracy"]} if stage == "dpo" else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a pretrained run (kiln train tiny ...)")
    p.add_argument("--out", required=True, help="folder for the data and the runs")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    out = Path(args.out)
    data = make_data(out / "data")
    common = ("--train.max_steps", str(args.steps), "--train.eval_every", str(args.steps), "--train.log_every", "1",
              "--train.sample_tokens", "0")
    rl = ("--posttrain.max_new_tokens", "6", "--posttrain.group_size", "8", "--train.max_steps",
          str(args.steps // 2))
    rows = []
    src = {"sft": Path(args.checkpoint), "dpo": out / "sft-derived", "rlvr": out / "sft-derived"}
    for stage in ("sft", "dpo", "rlvr"):
        extra = common + (rl if stage == "rlvr" else ())
        for variant in ("derived", "old"):
            lr = () if variant == "derived" else ("--optim.lr", str(OLD[stage]))
            line = run(stage, src[stage], data[stage], out / f"{stage}-{variant}", *extra, *lr)
            rows.append((stage, variant, summary(stage, out / f"{stage}-{variant}"), line))
    print("| stage | LR | peak LR | metric | train first 5 -> last 5 | eval start -> end |")
    print("|---|---|---:|---|---|---|")
    for stage, variant, s, _ in rows:
        acc = f" (accuracy {s['eval_acc_last']:.2f})" if "eval_acc_last" in s else ""
        print(f"| {stage} | {variant} | {s['lr']:.3g} | {s['metric']} | {s['train_first']:.4f} -> "
              f"{s['train_last']:.4f} | {s['eval_first']:.4f} -> {s['eval_last']:.4f}{acc} |")
    for _stage, variant, _, line in rows:
        if variant == "derived":
            print(line)


if __name__ == "__main__":
    main()
