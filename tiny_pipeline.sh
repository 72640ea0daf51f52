#!/usr/bin/env bash
# The whole method on a laptop CPU, offline, in about 23–27 minutes on 2 cores (2-core machines differ up to 2×):
#   synthetic WarmStart (calculator.py) → SFT → RLOO and DPO from the SFT checkpoint → evaluation.
#
#   bash tiny_pipeline.sh                    # out/tiny, seed 0
#   bash tiny_pipeline.sh out/tiny-s1 1      # another seed
#   QUICK=1 bash tiny_pipeline.sh            # out/quick: the same chain, shortened to two minutes (the tests run its commands)
#
# Every step is one plain command reading the previous step's directory: copy any line.
# Puzzles: 3 numbers in 1–9, targets 1–50 ("easy"). SFT learns a complete search on the :sft split, one
# row in four with "!" marks on its hits and the rest without (--trace search-mixed; after the all-marked
# search RL moved accuracy by less than a seed does); RLOO samples all of :train (on the 377 puzzles of :rl
# alone the tiny model memorises answers); DPO's pairs come from :rl, puzzles SFT never saw; evaluation
# uses the held-out :test split.
# Every split is disjoint from :test by construction. The GPU recipe with Qwen2.5-0.5B is in README.md.
set -euo pipefail
# ROWS: synthetic SFT rows; TOKENS: the completion budget everywhere (a search trace is 40–116 tokens)
if [ -n "${QUICK:-}" ]; then
  ROWS=1280 SFT_STEPS=40 RL_STEPS=2 PAIRS=64 DPO_STEPS=2 EVAL_N=16 SAMPLES=1 TOKENS=64 DEFAULT_OUT=out/quick
else
  ROWS=20000 SFT_STEPS=3000 RL_STEPS=600 PAIRS=1500 DPO_STEPS=150 EVAL_N=500 SAMPLES=2 TOKENS=128 DEFAULT_OUT=out/tiny
fi
OUT=${1:-$DEFAULT_OUT}
SEED=${2:-0}
if [ -e "$OUT" ]; then  # a run's directory is never reused: its checkpoints would mix with the new ones
  echo "tiny_pipeline.sh: $OUT exists: remove it, or give another directory (bash tiny_pipeline.sh out/tiny-2)" >&2
  exit 2
fi

python sft.py --model tiny --data synthetic --puzzles easy:sft --trace search-mixed --synthetic-rows $ROWS \
  --steps $SFT_STEPS --batch-size 32 --grad-accum 1 --lr 1e-3 --warmup 0.02 --log-every 250 --eval-every 1000 \
  --save-every 1000 --seed $SEED --out-dir $OUT/sft

python rloo.py --model $OUT/sft --puzzles easy:train --k 8 --prompts-per-step 8 --micro-prompts 8 --lr 3e-5 \
  --kl-coef 0 --temperature 1.0 --max-new-tokens $TOKENS --steps $RL_STEPS --eval-every 0 --sample-every 50 \
  --log-every 10 --save-every 1000 --seed $SEED --out-dir $OUT/rloo

python dpo.py --model $OUT/sft --data countdown --puzzles easy:rl --pair-prompts $PAIRS --pair-samples 4 \
  --pair-temperature 1.0 --pair-max-tokens $TOKENS --beta 0.1 --lr 1e-5 --batch-size 16 --grad-accum 1 \
  --steps $DPO_STEPS --eval-rows 100 --log-every 20 --eval-every 100 --save-every 1000 --seed $SEED --out-dir $OUT/dpo

for stage in base sft rloo dpo; do
  model=$OUT/$stage
  [ $stage = base ] && model=tiny
  python evaluate.py --model $model --puzzles easy:test --n $EVAL_N --seed 1 --max-new-tokens $TOKENS \
    --out-dir $OUT/eval/$stage-greedy
  python evaluate.py --model $model --puzzles easy:test --n $EVAL_N --seed 1 --max-new-tokens $TOKENS \
    --temperature 1.0 --samples $SAMPLES --out-dir $OUT/eval/$stage-sampled
done

python evaluate.py --collect $OUT --out-dir $OUT
