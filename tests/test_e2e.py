"""From the command line as a user would: train tiny on the bundled corpus -> generate -> eval -> export -> HF."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import kiln_cmd

# Not in the bundled corpus (checked below): a paragraph written for this test.
HELD_OUT = (
    "The harbour master walked along the pier every morning before the boats went out. He counted the ropes, "
    "looked at the sky, and told the young sailors which way the wind would turn. Nobody in the village could "
    "remember a day when he had been wrong, and nobody could remember a day when he had smiled about it.\n\n"
    "His daughter kept the accounts of the harbour in a small red book. She wrote down every boat, every cargo "
    "and every debt, and in the evening she read the numbers aloud while her father listened by the fire."
)


def kiln(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(kiln_cmd(*args), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"kiln {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


@pytest.mark.slow
def test_train_generate_eval_export_roundtrip(tmp_path):
    import gzip

    from kiln.data.sources import resolve_files

    bundled = "".join(gzip.open(p, "rt").read() for p in resolve_files(_src("bundled:train")))
    assert HELD_OUT[:60] not in bundled
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(HELD_OUT)
    run = tmp_path / "run"

    res = kiln("train", "tiny", "--run.out_dir", str(run), "--train.max_steps", "20", "--train.eval_every", "10",
               "--train.save_every", "10", "--train.eval_tokens", "4096", "--train.sample_tokens", "8")
    assert "sample:" in res.stdout
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_10", "step_20"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 20
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0  # held-out bundled split clearly improves

    # a text that is not in the corpus scores clearly better than at initialisation
    after = json.loads(kiln("eval", "--checkpoint", str(run), "--data", str(text_file)).stdout.strip().splitlines()[-1])
    assert set(after) >= {"loss", "ppl", "bits_per_byte"}
    init = json.loads(kiln("eval", "--checkpoint", str(run / "checkpoints" / "step_10"),
                           "--data", str(text_file)).stdout.strip().splitlines()[-1])
    assert after["loss"] < init["loss"]
    assert abs(after["ppl"] - torch.tensor(after["loss"]).exp().item()) / after["ppl"] < 1e-4

    # resume: running again with a larger budget continues from step 20
    res = kiln("train", "tiny", "--run.out_dir", str(run), "--train.max_steps", "22", "--train.sample_tokens", "0",
               "--train.eval_tokens", "4096")
    assert "resumed from step_20" in res.stdout

    # greedy generation: kiln and transformers agree token for token on the exported model
    prompt = "It is a truth universally acknowledged"
    gen = kiln("generate", "--checkpoint", str(run), "--prompt", prompt, "--temperature", "0",
               "--max-new-tokens", "16").stdout
    assert gen.startswith(prompt) and gen.endswith("\n")
    kiln_text = gen[:-1]  # the CLI prints prompt + continuation and one newline
    hf_dir = tmp_path / "hf"
    res = kiln("export", "--checkpoint", str(run), "--out", str(hf_dir))
    # tiny keeps the seed's 1024-position RoPE table but trains on 256 tokens: the export says so
    assert json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"] == 1024
    assert res.stderr.strip().splitlines()[-1] == ("note: max_position_embeddings is model.max_seq_len (1024); "
                                                  "this run trained on 256-token sequences "
                                                  "(model.max_seq_len: 256 declares that)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)
    from kiln.data.tokenizer import load_tokenizer
    from kiln.generate import generate
    from kiln.train.checkpoint import load_for_inference

    kmodel, _, _ = load_for_inference(run)
    ktok = load_tokenizer("mistral-v3")
    assert ids[0].tolist() == ktok.encode(prompt)
    ours = generate(kmodel, ktok.encode(prompt), max_new_tokens=16, temperature=0.0, eos_id=None)[0]
    assert out[0, ids.shape[1]:].tolist() == ours
    base = ktok.decode(ktok.encode(prompt))
    assert kiln_text == prompt + ktok.decode(ktok.encode(prompt) + ours)[len(base):]


def _src(path: str):
    from kiln.config import SourceConfig

    return SourceConfig(path=path)
