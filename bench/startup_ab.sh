#!/bin/bash
# Command start-up: kiln train (2 tiny steps), export and eval of this tree against an older worktree, interleaved,
# 5 rounds; wall seconds per command. usage: git worktree add /tmp/old REV; bench/startup_ab.sh /tmp/old
A="--model.d_model 32 --model.n_layers 1 --model.n_heads 2 --model.n_kv_heads 1 --model.ffn_dim 64 --train.seq_len 64 --train.micro_batch_size 2 --train.global_batch_size 2 --train.max_steps 2 --train.eval_tokens 128 --train.sample_tokens 0"
ROOT=$(cd "$(dirname "$0")/.." && pwd); OLD=${1:?usage: bench/startup_ab.sh OLD_WORKTREE (git worktree add /tmp/old REV)}
PY=$ROOT/.venv/bin/python
export KILN_CACHE=/tmp/ab-cache
for i in 1 2 3 4 5; do
  for v in old new; do
    src=$ROOT/src; [ $v = old ] && src=$OLD/src
    rm -rf /tmp/ab/$v
    t0=$(date +%s.%N); PYTHONPATH=$src $PY -m kiln train tiny $A --run.out_dir /tmp/ab/$v/r >/dev/null 2>&1; t1=$(date +%s.%N)
    PYTHONPATH=$src $PY -m kiln export --checkpoint /tmp/ab/$v/r --out /tmp/ab/$v/hf >/dev/null 2>&1; t2=$(date +%s.%N)
    PYTHONPATH=$src $PY -m kiln eval --checkpoint /tmp/ab/$v/r --data bundled:val --max-tokens 256 >/dev/null 2>&1; t3=$(date +%s.%N)
    echo "$v train $(echo "$t1-$t0" | bc) export $(echo "$t2-$t1" | bc) eval $(echo "$t3-$t2" | bc)"
  done
done
