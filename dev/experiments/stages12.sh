#!/usr/bin/env bash
# Stages 1-2 on the synthetic task, per seed: fresh model, +mid-training (verified, packed),
# +SFT (harder subset, unpacked), and mid-training on UNVERIFIED teacher data (rejection sampling off).
# Held-out synthetic test problems (difficulty 1 and 2, 200 each), greedy, 128 new tokens.
#   bash dev/experiments/stages12.sh OUT_DIR SEED
set -euo pipefail
OUT=$1; SEED=$2
TF=${TF:-$(pwd)/.venv/bin/thinkforge}
SYS='model.system_prompt="Solve it step by step."'
mkdir -p "$OUT"; cd "$OUT"
ev() {  # ev MODEL NAME
  for d in 1 2; do
    $TF eval -m "$1" -b synthetic --limit 200 --max-new-tokens 128 -t 0 --batch-size 64 --out "eval-$2-d$d" "$SYS" \
      synthetic.difficulty=$d seed=$SEED 2>/dev/null | sed -n 3p
  done
}
[ -f model/config.json ] || $TF init-model model --arch phi3 --hidden 128 --layers 4 --heads 4 --seed $SEED 2>/dev/null
$TF data distill --out rollouts.jsonl --problems 1500 -n 4 --slip-rate 0.3 seed=$SEED distill.difficulties=[1,2] 2>/dev/null
$TF data select rollouts.jsonl --out sel --min-difficulty 2 2>/dev/null
S1="midtrain.max_len=1024 midtrain.batch_size=4 midtrain.grad_accum=1 midtrain.optim.lr=2e-3 midtrain.epochs=3 midtrain.optim.warmup_ratio=0.03"
$TF midtrain --data sel/accepted.jsonl -m model --out midtrain "$SYS" seed=$SEED $S1 2>/dev/null
$TF midtrain --data rollouts.jsonl -m model --out midtrain-unverified "$SYS" seed=$SEED $S1 2>/dev/null
$TF sft --data sel/hard.jsonl -m midtrain/final --out sft "$SYS" seed=$SEED sft.max_len=512 \
  sft.batch_size=16 sft.grad_accum=1 sft.optim.lr=5e-4 sft.epochs=2 sft.optim.warmup_ratio=0.03 2>/dev/null
echo "seed $SEED: fresh";               ev model fresh
echo "seed $SEED: +midtrain";            ev midtrain/final midtrain
echo "seed $SEED: +sft";                 ev sft/final sft
echo "seed $SEED: midtrain unverified";  ev midtrain-unverified/final unverified
