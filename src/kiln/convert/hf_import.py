"""`kiln import --hf DIR --out RUN_DIR`: a Hugging Face model folder as a kiln run folder.

The command only; the state-dict conversion is kiln.export.import_hf_folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.export import import_hf_folder


def import_hf(argv: list[str]) -> int:
    """`kiln import --hf DIR --out RUN_DIR`: an HF Llama / Qwen3 / SmolLM3 folder as a kiln run folder."""
    p = argparse.ArgumentParser(prog="kiln import", description="Import a Hugging Face model folder "
                                "(Llama, Qwen3, SmolLM3; safetensors) as a kiln checkpoint.")
    p.add_argument("--hf", required=True, help="HF model folder (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--out", required=True, help="kiln run folder to create")
    args = p.parse_args(argv)
    ckpt = import_hf_folder(args.hf, args.out)
    print(f"imported {args.hf} -> {ckpt}\n  fine-tune: kiln sft --checkpoint {args.out} --data chats.jsonl\n"
          f"  continue pretraining: kiln train {Path(args.out) / 'config.yaml'} --data.train ...")
    return 0
