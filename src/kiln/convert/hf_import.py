"""`kiln import --hf DIR --out RUN_DIR`: a Hugging Face model folder as a kiln run folder.

The command only; the state-dict conversion is kiln.export.import_hf_folder.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from kiln.cliargs import user_path
from kiln.export import import_hf_folder
from kiln.paths import first_missing


def import_hf(argv: list[str]) -> int:
    """`kiln import --hf DIR --out RUN_DIR`: an HF Llama / Qwen3 / SmolLM3 folder as a kiln run folder."""
    p = argparse.ArgumentParser(prog="kiln import", description="Import a Hugging Face model folder "
                                "(Llama, Qwen3, SmolLM3; safetensors) as a kiln checkpoint.",
                                allow_abbrev=False)
    p.add_argument("--hf", required=True, type=user_path,
                   help="HF model folder (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--out", required=True, type=user_path, help="kiln run folder to create")
    args = p.parse_args(argv)
    out = Path(args.out)
    # a refused import (a tokenizer too big for the model, found after its files were copied) leaves no
    # half-written --out; only what this import created goes, never a folder the user had
    created = first_missing(out) or first_missing(out / "tokenizer")
    try:
        ckpt = import_hf_folder(args.hf, args.out)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    print(f"imported {args.hf} -> {ckpt}\n  fine-tune: kiln sft --checkpoint {args.out} --data chats.jsonl\n"
          f"  continue pretraining: kiln train {Path(args.out) / 'config.yaml'} --data.train ...")
    return 0
