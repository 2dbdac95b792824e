#!/usr/bin/env bash
# The GPU benchmark suite: run on a machine with one NVIDIA GPU, from the repository root.
#
#   make setup && .venv/bin/pip install -e '.[speed]'    # optional: Liger's fused loss, torchao (fp8)
#   bash bench/gpu_suite.sh                              # ~20-30 min on an H100
#   OUT=bench/results/gpu.jsonl bash bench/gpu_suite.sh dense    # one part: dense | dense2 | llama | hf
#
# Parts append to the same $OUT when it is given, so a machine with a per-command time limit runs
# them one call each and the last call's table holds all of them. An $OUT that is a folder (a lent
# machine's output folder) gets gpu.jsonl inside it, and a copy of the updated RESULTS.md.
#
# Every `kiln bench` run appends one JSON line to $OUT (tokens/s, step ms, MFU from the device
# table, peak memory next to kiln.estimate's prediction); bench/vs_hf.py adds kiln and HF at the
# same shape on the same device. At the end the table is printed and recorded in bench/RESULTS.md
# (block "gpu"; the vs-HF table goes to block "vs_hf:cuda"). Commit RESULTS.md and $OUT together.
set -uo pipefail

# the project's venv (`make setup`), else the machine's python3 with kiln read from src/ (a GPU box with torch
# and transformers but no network: `kiln bench` and vs_hf.py need neither datasets nor mistral-common)
if [ -z "${PY:-}" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S).jsonl}
OUT_DIR=""
if [ -d "$OUT" ]; then OUT_DIR=$OUT; OUT="$OUT/gpu.jsonl"; fi
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
PARTS=${*:-dense dense2 llama hf}
for p in $PARTS; do
  case $p in dense|dense2|llama|hf) ;;
    *) echo "gpu_suite.sh: unknown part '$p' (dense, dense2, llama, hf)" >&2; exit 2;;
  esac
done
want() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$(dirname "$OUT")"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # sdpa with a document mask and GQA runs on cuDNN's kernel where this torch ranks it first
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" 2>&1
} | tee "${OUT%.jsonl}.gpu.txt"

# per-run scratch files (mktemp: two suites on one machine never share them), removed on exit
LINE=$(mktemp "${TMPDIR:-/tmp}/kiln_bench_line.XXXXXX")
ERR=$(mktemp "${TMPDIR:-/tmp}/kiln_bench_err.XXXXXX")
trap 'rm -f "$LINE" "$ERR"' EXIT

bench() {  # kiln bench PRESET [overrides]; a failure (OOM, missing package) is logged and skipped
  echo "== kiln bench $*" >&2
  if ! "$PY" -m kiln bench "$@" --steps "$STEPS" --warmup "$WARMUP" > "$LINE" 2> "$ERR"; then
    echo "   FAILED: $(tail -1 "$ERR")" >&2
    return 0
  fi
  tail -1 "$LINE" | tee -a "$OUT"
}

# ---- dense-180m (the Dense-180M guide): bf16 autocast, T=2048, micro-batch 16; one optimizer step = 1 micro-batch
D="dense-180m --train.global_batch_size 16"
if want dense; then
bench $D                                                       # defaults: sdpa + doc mask, fused loss
bench $D --train.compile true                                  # compiled blocks
bench $D --train.loss_impl plain                               # full logits (before the fused loss)
bench $D --data.doc_mask false                                 # plain causal: the flash kernel
bench $D --train.compile true --data.doc_mask false            # best case for the MFU target
bench $D --model.attention flex --train.compile true           # flex attention, cached block masks
fi
if want dense2; then
bench $D --train.compile true --train.compile_mode model       # whole trunk compiled
if "$PY" -c "import liger_kernel" 2>/dev/null; then
  bench $D --train.loss_impl chunked                           # kiln's chunked loss (the default is Liger's)
fi
bench $D --model.attention flash                               # flash-attn varlen (if installed)
bench $D --train.activation_checkpointing selective
bench $D --train.activation_checkpointing full --train.micro_batch_size 32 --train.global_batch_size 32
fi

# ---- llama-1b: micro-batch 8 x 2048 (4 micro-batches per step)
L="llama-1b --train.global_batch_size 32"
if want llama; then
bench $L
bench $L --train.compile true
bench $L --train.compile true --train.activation_checkpointing selective --train.micro_batch_size 16
bench $L --train.compile true --data.doc_mask false
fi

# ---- kiln vs Hugging Face at the same shapes on this GPU (same weights, data, AdamW, bf16 autocast)
if want hf; then
"$PY" bench/vs_hf.py --device cuda --dtype bf16 --preset dense-180m --batch 8 --seq 2048 --threads 8 \
  --steps 10 --warmup 3 --variants hf,kiln,kiln-compiled --json "$OUT" || echo "vs_hf dense-180m FAILED" >&2
"$PY" bench/vs_hf.py --device cuda --dtype bf16 --preset llama-1b --batch 4 --seq 2048 --threads 8 \
  --steps 10 --warmup 3 --variants hf,kiln,kiln-compiled --json "$OUT" --no-write || echo "vs_hf llama-1b FAILED" >&2
fi

"$PY" bench/report.py "$OUT" --write gpu
if [ -n "$OUT_DIR" ]; then cp bench/RESULTS.md "$OUT_DIR/RESULTS.md"; fi
echo "results: $OUT (table recorded in bench/RESULTS.md)"
