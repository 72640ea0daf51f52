#!/usr/bin/env bash
# Tool use on the tiny model (spec §2.7), offline on a CPU: SFT on calculator traces → RLOO with the tool loop →
# evaluation of both checkpoints with and without the loop. A variant of tiny_pipeline.sh, on `--model tiny-tools`
# (the tiny model with a BPE that also learned the tool-call format: a call costs 11 tokens, not 69; the search
# lines split into the same tokens as with `tiny`, so the two chains differ by the tool alone).
#
#   bash tiny_tools.sh                       # out/tiny-tools, seed 0
#   bash tiny_tools.sh out/tiny-tools-s1 1   # another seed
#   QUICK=1 bash tiny_tools.sh               # out/quick-tools: the same chain, shortened (a smoke run: nothing learns)
#
# The traces (tools.synthetic_tool_traces): tiny_pipeline.sh's complete search, each hit sent to the calculator
# and believed only if its value comes back as the target ("… = 38 <tool_call>…</tool_call><tool_response>38
# </tool_response> found it."); in a quarter of them a slip in the line's values makes a false hit that the
# response refutes ("…<tool_response>44</tool_response> no.") and the search goes on. Generation stops at each
# </tool_call>, the harness appends the response; responses are context, never trained on. RLOO samples with the
# loop (--tools calculate, at most --max-calls 4 calls per answer) and rewards the answer with the Countdown reward.
# Puzzles: "easy" (3 numbers in 1–9, targets 1–50), the splits of tiny_pipeline.sh; evaluation on :test.
set -euo pipefail
if [ -n "${QUICK:-}" ]; then
  SFT_STEPS=30 RL_STEPS=2 EVAL_N=8 DEFAULT_OUT=out/quick-tools
else
  SFT_STEPS=3000 RL_STEPS=100 EVAL_N=500 DEFAULT_OUT=out/tiny-tools
fi
OUT=${1:-$DEFAULT_OUT}
SEED=${2:-0}
if [ -e "$OUT" ]; then  # a run's directory is never reused: its checkpoints would mix with the new ones
  echo "tiny_tools.sh: $OUT exists: remove it, or give another directory (bash tiny_tools.sh out/tiny-tools-2)" >&2
  exit 2
fi
TOKENS=192  # completion budget, the harness's tokens included (a trace is 59–184 tokens of tiny-tools' BPE)

python sft.py --model tiny-tools --data synthetic --puzzles easy:sft --trace tools --synthetic-rows 20000 \
  --steps $SFT_STEPS --batch-size 32 --grad-accum 1 --lr 1e-3 --warmup 0.02 --log-every 250 --eval-every 1000 \
  --save-every 1000 --seed $SEED --out-dir $OUT/sft

python rloo.py --model $OUT/sft --puzzles easy:train --tools calculate --max-calls 4 --k 8 --prompts-per-step 8 \
  --micro-prompts 8 --lr 3e-5 --kl-coef 0 --temperature 1.0 --max-new-tokens $TOKENS --steps $RL_STEPS \
  --eval-every 0 --sample-every 50 --log-every 10 --save-every 1000 --seed $SEED --out-dir $OUT/rloo

for stage in sft rloo; do   # each evaluation: the model alone (the plain prompt), then the tool loop
  python evaluate.py --model $OUT/$stage --puzzles easy:test --n $EVAL_N --seed 1 --max-new-tokens $TOKENS \
    --tools calculate --max-calls 4 --out-dir $OUT/eval/$stage-greedy
done

python evaluate.py --collect $OUT --out-dir $OUT
