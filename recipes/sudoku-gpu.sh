#!/bin/bash
# Train a Sudoku model on one CUDA GPU for a wall-clock budget (what the 2026-11-27 H200 runs used).
#   recipes/sudoku-gpu.sh OUT [SECONDS] [CONFIG]      e.g. recipes/sudoku-gpu.sh runs/sudoku 3600
# Data: 8 x 40k training examples with 26-45 givens (4k dug puzzles x 10 symmetric images each, seeds
# SEED0..SEED0+7) + 1000 validation puzzles (seed 999); evaluation puzzles use other seeds (777, 778).
# From scratch by default. A fine-tuning stage warm-starts from a model directory instead, e.g. the model card's
# stage 6:  FROM=dgemma/models/sudoku BATCH=256 LR=3e-4 WARMUP=20 recipes/sudoku-gpu.sh runs/s6 315
# Environment knobs (defaults = the from-scratch run): FROM (model dir; full fine-tune, routers trained), BATCH (256),
# LR (1.5e-3), WARMUP (200), SEED0 (1000), GIVENS (26-45), TRAIN_SEED (0).
# The step count the budget allows is logged and saved in OUT/run/train_config.json: `--steps N` reproduces it.
# With PACK=1 the model is also written as OUT/model.tar.part-* (15 MB pieces: a device machine returns files
# of at most 16 MiB); `cat model.tar.part-* | tar x` restores OUT/run/model.
set -euo pipefail
OUT=${1:?usage: recipes/sudoku-gpu.sh OUT [SECONDS] [CONFIG]}; BUDGET=${2:-3600}
CONFIG=${3:-recipes/sudoku-config-h192.json}
BATCH=${BATCH:-256}; LR=${LR:-1.5e-3}; WARMUP=${WARMUP:-200}; SEED0=${SEED0:-1000}; GIVENS=${GIVENS:-26-45}
mkdir -p "$OUT/data"
for i in 0 1 2 3 4 5 6 7; do
  python -m dgemma sudoku generate --count 40000 --givens "$GIVENS" --seed $((SEED0 + i)) --variants 10 \
    --format train --out "$OUT/data/t$i.jsonl" &
done
python -m dgemma sudoku generate --count 1000 --givens 26-45 --seed 999 --format train --out "$OUT/val.jsonl" &
wait
cat "$OUT"/data/t*.jsonl > "$OUT/train.jsonl"
if [ -n "${FROM:-}" ]; then
  START=(--model "$FROM" --mode full --no-freeze-router)
else
  python -m dgemma sudoku tokenizer "$OUT/tok"
  START=(--config "$CONFIG" --tokenizer "$OUT/tok")
fi
python -m dgemma train "${START[@]}" --data "$OUT/train.jsonl" --eval-data "$OUT/val.jsonl" \
  --raw --batch-size "$BATCH" --lr "$LR" --warmup "$WARMUP" --steps 1000000 --time-budget "$BUDGET" \
  --save-every 500 --keep-checkpoints 1 --eval-every 2000 --device cuda --seed "${TRAIN_SEED:-0}" --out "$OUT/run"
if [ "${PACK:-0}" = 1 ]; then
  tar -C "$OUT/run" -cf - model | split -b 15M - "$OUT/model.tar.part-"
fi
python -m dgemma sudoku generate --count 200 --givens 30-36 --seed 777 --out "$OUT/heldout.jsonl"
python -m dgemma sudoku generate --count 200 --givens 25-45 --seed 778 --out "$OUT/bands.jsonl"
# every model-card setting (plain, givens clamped, 16/96 steps, the AR baseline; the bands) in one model load
python recipes/sudoku_report.py "$OUT/run/model" "$OUT/heldout.jsonl" "$OUT/bands.jsonl" --device cuda \
  --out "$OUT/report.json"
