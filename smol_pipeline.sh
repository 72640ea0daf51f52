#!/usr/bin/env bash
# The chain on a real pretrained model, offline, on a CPU: SmolLM2-135M-Instruct (--model smollm2) on Countdown.
#   synthetic WarmStart traces (calculator.py) → SFT → RLOO and DPO from the SFT checkpoint → evaluation.
#
#   bash smol_pipeline.sh                    # out/smol, seed 0: the whole chain (~75 minutes on 2 cores)
#   SFT_FROM=out/smol/sft bash smol_pipeline.sh out/smol-s1 1   # RLOO and DPO again, seed 1, from that SFT checkpoint
#   QUICK=1 bash smol_pipeline.sh            # out/smol-quick: the same chain, a few steps of each (minutes)
#
# Every step is one plain command reading the previous step's directory: copy any line.
# Puzzles of the spec's shape, 3to4 (3 or 4 numbers in 1–99, targets 10–100, as Countdown-Tasks-3to4). SFT learns
# the "sums" trace on the :sft split (add every number; the excess over the target is twice what the numbers taken
# away add up to; calculator.sums_completion); RLOO and DPO's pairs use :rl, puzzles SFT never saw; evaluation the
# held-out :test split of 3to4, and of easy (3 numbers in 1–9) beside it. The first run fetches the model (93 MB).
set -euo pipefail
if [ -n "${QUICK:-}" ]; then
  SFT_STEPS=2 RL_STEPS=1 PAIRS=4 DPO_STEPS=1 EVAL_N=4 BASE_N=4 EVAL_EASY=4 TOKENS=32 DEFAULT_OUT=out/smol-quick
else
  SFT_STEPS=40 RL_STEPS=8 PAIRS=64 DPO_STEPS=8 EVAL_N=200 BASE_N=100 EVAL_EASY=100 TOKENS=256 DEFAULT_OUT=out/smol
fi
OUT=${1:-$DEFAULT_OUT}
SEED=${2:-0}
if [ -e "$OUT" ]; then  # a run's directory is never reused: its checkpoints would mix with the new ones
  echo "smol_pipeline.sh: $OUT exists: remove it, or give another directory (bash smol_pipeline.sh out/smol-2)" >&2
  exit 2
fi
# Memory: a step's activations take ~1.9 MB a token in fp32, so SFT's 16 rows and DPO's 8 pairs (up to ~400 tokens each)
# go through in two micro-batches, the same step (each loss is normalised by the whole step's count); at 16 × 1 and
# 8 × 1 the chain peaked at 17.1 GB.
# TOKENS: the completion budget everywhere (a sums trace is 60–270 tokens, 110 on average). The base model answers in
# prose to the end of the budget (~3 s a puzzle), so it gets BASE_N puzzles of 3to4, not EVAL_N.
# SFT_FROM: the seeds of RLOO and DPO share one SFT checkpoint: no base, no SFT, and 3to4 alone is evaluated.
SFT=${SFT_FROM:-$OUT/sft}
STAGES="base sft rloo dpo"
[ -n "${SFT_FROM:-}" ] && STAGES="rloo dpo"

[ -z "${SFT_FROM:-}" ] && python sft.py --model smollm2 --data synthetic --puzzles 3to4:sft --trace sums --synthetic-rows 2000 \
  --steps $SFT_STEPS --batch-size 8 --grad-accum 2 --lr 1e-4 --warmup 0.05 --max-len 512 --log-every 4 \
  --eval-every 0 --save-every 20 --seed $SEED --out-dir $OUT/sft

python rloo.py --model $SFT --puzzles 3to4:rl --n-prompts 400 --eval-prompts 0 --k 8 --prompts-per-step 4 --micro-prompts 1 --lr 2e-5 \
  --kl-coef 0 --temperature 1.0 --max-new-tokens $TOKENS --steps $RL_STEPS --eval-every 0 --sample-every 4 \
  --log-every 1 --save-every 5 --seed $SEED --out-dir $OUT/rloo

python dpo.py --model $SFT --data countdown --puzzles 3to4:rl --pair-prompts $PAIRS --pair-samples 4 \
  --pair-temperature 1.0 --pair-max-tokens $TOKENS --beta 0.1 --lr 1e-5 --batch-size 4 --grad-accum 2 \
  --steps $DPO_STEPS --eval-rows 16 --log-every 2 --eval-every $DPO_STEPS --save-every 1000 --seed $SEED --out-dir $OUT/dpo

for stage in $STAGES; do
  if [ $stage = base ]; then   # the instruction-tuned base answers in prose, sampled or not: greedy alone
    python evaluate.py --model smollm2 --puzzles 3to4:test --n $BASE_N --seed 1 --max-new-tokens $TOKENS \
      --out-dir $OUT/eval/base-3to4-greedy
    python evaluate.py --model smollm2 --puzzles easy:test --n $EVAL_EASY --seed 1 --max-new-tokens $TOKENS \
      --out-dir $OUT/eval/base-easy-greedy
    continue
  fi
  model=$OUT/$stage
  [ $stage = sft ] && model=$SFT
  for T in 0.0 1.0; do
    mode=greedy
    [ $T = 1.0 ] && mode=sampled
    python evaluate.py --model $model --puzzles 3to4:test --n $EVAL_N --seed 1 --max-new-tokens $TOKENS \
      --temperature $T --out-dir $OUT/eval/$stage-3to4-$mode
    [ -n "${SFT_FROM:-}" ] && continue
    python evaluate.py --model $model --puzzles easy:test --n $EVAL_EASY --seed 1 --max-new-tokens $TOKENS \
      --temperature $T --out-dir $OUT/eval/$stage-easy-$mode
  done
done

if [ -n "${SFT_FROM:-}" ]; then   # the shared SFT checkpoint's evaluations, so this run's table has its SFT rows
  mkdir -p $OUT/eval && cp -r $(dirname $SFT)/eval/sft-3to4-* $OUT/eval/
fi
python evaluate.py --collect $OUT --out-dir $OUT
