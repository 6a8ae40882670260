#!/bin/bash
# Train a Sudoku model on one CUDA GPU for a wall-clock budget (what the 2026-11-27 H200 runs used).
#   recipes/sudoku-gpu.sh OUT [SECONDS] [CONFIG]      e.g. recipes/sudoku-gpu.sh runs/sudoku 3600
# Data: 320k training examples (8 x 40k puzzles with 26-45 givens: 4k dug puzzles x 10 symmetric images, seeds
# 1000-1007) + 1000 validation puzzles (seed 999); evaluation puzzles should use other seeds (e.g. 777).
# The step count the budget allows is logged and saved in OUT/run/train_config.json: `--steps N` reproduces it.
set -euo pipefail
OUT=${1:?usage: recipes/sudoku-gpu.sh OUT [SECONDS] [CONFIG]}; BUDGET=${2:-3600}
CONFIG=${3:-recipes/sudoku-config-h192.json}
mkdir -p "$OUT/data"
python -m dgemma sudoku tokenizer "$OUT/tok"
for i in 0 1 2 3 4 5 6 7; do
  python -m dgemma sudoku generate --count 40000 --givens 26-45 --seed $((1000 + i)) --variants 10 --format train \
    --out "$OUT/data/t$i.jsonl" &
done
python -m dgemma sudoku generate --count 1000 --givens 26-45 --seed 999 --format train --out "$OUT/val.jsonl" &
wait
cat "$OUT"/data/t*.jsonl > "$OUT/train.jsonl"
python -m dgemma train --config "$CONFIG" --tokenizer "$OUT/tok" --data "$OUT/train.jsonl" --eval-data "$OUT/val.jsonl" \
  --raw --batch-size 256 --lr 1.5e-3 --warmup 200 --steps 1000000 --time-budget "$BUDGET" --save-every 500 \
  --eval-every 2000 --device cuda --seed 0 --out "$OUT/run"
python -m dgemma sudoku generate --count 200 --givens 30-36 --seed 777 --out "$OUT/heldout.jsonl"
python -m dgemma sudoku generate --count 200 --givens 25-45 --seed 778 --out "$OUT/bands.jsonl"
# every model-card setting (plain, givens clamped, 16/96 steps, the AR baseline; the bands) in one model load
python recipes/sudoku_report.py "$OUT/run/model" "$OUT/heldout.jsonl" "$OUT/bands.jsonl" --device cuda \
  --out "$OUT/report.json"
