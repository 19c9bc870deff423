#!/usr/bin/env bash
# DeepSeek-R1's post-training chain (SPEC §6) at tiny scale, on a CPU: the quickstart model (pre-trained
# on Python sources, it has never seen arithmetic) gets a cold-start SFT on worked solutions of 2-digit
# additions in the <think>…</think><answer>…</answer> format (numbers digit by digit, one token per digit;
# column lines with their carries), then GRPO with the rule-based rewards (math + format) on other
# problems. The held-out accuracy (greedy, problems seen in neither stage) is measured after each stage,
# with its 95% binomial (Wilson) interval; the plots of reward, accuracy, KL and response length over the
# GRPO steps and the summary go to benchmarks/results/r1/.
#
# Reuses runs/tiny/final when it exists (otherwise trains it: scripts/quickstart.sh's run). Reruns start
# the stages over. Sizes can be changed through the environment (SFT_STEPS, GRPO_STEPS, GRPO_LR, …); the
# defaults are sized for 2 shared CPU cores (under 30 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
DSV3=.venv/bin/dsv3
# one intra-op thread: on a small shared machine torch's OpenMP threads spin-wait on each other, and the
# tiny model's matrices are too small to gain from two (the engine samples ~25x faster here with one)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUNS=${RUNS:-runs/r1}
OUT=${OUT:-benchmarks/results/r1}
SEED=${SEED:-0}
# SFT stops while the skill is half learned (~45% held out after 200 steps; 400 steps reach ~97%), so
# that what GRPO adds can be seen.
SFT_N=${SFT_N:-1000}; SFT_STEPS=${SFT_STEPS:-200}; SFT_BATCH=${SFT_BATCH:-32}; SFT_LR=${SFT_LR:-3e-3}
# GRPO: 16 prompts x 8 samples per step, one update per batch. Sampling at temperature 0.6 (the ratio is
# taken against the raw policy): at 1.0 this small model's samples are mostly wrong, and most of its right
# answers come with a wrong <think> (reinforcing those hurt); lr above ~5e-5 made it worse, not better.
# 1000 held-out problems: GRPO's gain (~8 points in two runs) is then larger than the 95% intervals'
# half-widths added (~3 points each; with 400 problems they are ~5 points and overlap).
GRPO_STEPS=${GRPO_STEPS:-300}; GROUP=${GROUP:-8}; PROMPTS=${PROMPTS:-16}; GRPO_LR=${GRPO_LR:-5e-5}
TEMP=${TEMP:-0.6}; UPDATES=${UPDATES:-1}
HELDOUT=${HELDOUT:-1000}; MAX_NEW=${MAX_NEW:-64}
mkdir -p "$RUNS" "$OUT"
start=$(date +%s)

if [ ! -f runs/tiny/final/config.json ]; then
  echo "--- pre-training the tiny model (the quickstart run) ---"
  $DSV3 train --preset tiny --out runs/tiny --overwrite --no-progress --sample-prompt ""
fi

echo "--- the built-in task: 2-digit addition ($SFT_N cold-start solutions, 2000 RL prompts, $HELDOUT held out) ---"
$DSV3 r1-task --out "$RUNS/task" --digits 2 --sft "$SFT_N" --train 2000 --heldout "$HELDOUT" --seed "$SEED"

evaluate() {   # evaluate MODEL_DIR NAME
  $DSV3 sample --model "$1" --prompts "$RUNS/task/heldout.jsonl" --n 1 --temperature 0 --keep none \
      --max-new-tokens "$MAX_NEW" --json > "$OUT/$2.json"
  .venv/bin/python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"held-out accuracy ({sys.argv[2]}): {r['accuracy']:.3f} = {r['correct']}/{r['total']} (95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f})\")" "$OUT/$2.json" "$2"
}

echo "--- cold-start SFT: $SFT_STEPS steps of $SFT_BATCH records ---"
$DSV3 sft --model runs/tiny/final --data "$RUNS/task/sft.jsonl" --out "$RUNS/sft" --steps "$SFT_STEPS" \
    --batch-size "$SFT_BATCH" --seq-len 88 --lr "$SFT_LR" --warmup 10 --eval-every 0 --save-every 100 \
    --overwrite --no-progress --no-plots
evaluate runs/tiny/final pretrained
evaluate "$RUNS/sft/final" sft

echo "--- GRPO: $GRPO_STEPS steps of $PROMPTS prompts x $GROUP samples (temperature $TEMP), rewards math + format ---"
$DSV3 grpo --model "$RUNS/sft/final" --prompts "$RUNS/task/train.jsonl" --reward math,format --group "$GROUP" \
    --prompts-per-step "$PROMPTS" --steps "$GRPO_STEPS" --lr "$GRPO_LR" --clip 0.2 --kl 0.04 --updates "$UPDATES" \
    --temperature "$TEMP" --max-new-tokens "$MAX_NEW" --save-every 25 --out "$RUNS/grpo" --overwrite --no-progress --seed "$SEED"
evaluate "$RUNS/grpo/final" grpo

.venv/bin/python benchmarks/r1_report.py "$RUNS" "$OUT" --seconds $(( $(date +%s) - start ))
