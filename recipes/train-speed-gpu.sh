#!/bin/bash
# Seconds per optimizer step of `dgemma train` on the Sudoku config: eager fp32 (TF32), bf16 autocast, and
# --compile, at batch 256 and 768, on synthetic Sudoku data made on the spot (no downloads). About 4 minutes on
# one H200; every stage has its own timeout and a stage that would overrun the deadline is skipped, so the script
# always ends with its table.
#   recipes/train-speed-gpu.sh [OUTDIR]            env: DEV=cuda BATCHES="256 768" PY=python3 DEADLINE=230
# CPU rehearsal:  DEV=cpu BATCHES=2 STEPS=4 CSTEPS=4 recipes/train-speed-gpu.sh /tmp/speed
# Output: one line per run, `name batch seconds/step (median of the steps after the first ones) wall_s`,
# plus OUTDIR/speed.jsonl. Compile time shows as the wall time minus steps x seconds/step.
set -uo pipefail
T0=$(date +%s)
export PYTHONPATH=$PWD
PY=${PY:-python3}; DEV=${DEV:-cuda}; BATCHES=${BATCHES:-"256 768"}; DEADLINE=${DEADLINE:-230}
STEPS=${STEPS:-12}; CSTEPS=${CSTEPS:-24}; CONFIG=${CONFIG:-recipes/sudoku-config-h192.json}
O=${1:-/tmp/train-speed}; R=$O/work
rm -rf "$R"; mkdir -p "$R"
export TORCHINDUCTOR_CACHE_DIR=$R/inductor  # a fresh cache: compile time is part of what a lease pays
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__)") | tee "$O/env.txt"
$PY -m dgemma sudoku tokenizer "$R/tok" > /dev/null 2>&1
# 8 x 300 dug puzzles x 10 symmetric images = 24k examples (enough for 24 steps of 768 without an epoch wrap)
for i in 0 1 2 3 4 5 6 7; do
  $PY -m dgemma sudoku generate --count 300 --givens 26-45 --seed $((2000 + i)) --variants 10 --format train \
    --out "$R/t$i.jsonl" 2>/dev/null &
done
wait
cat "$R"/t*.jsonl > "$R/train.jsonl"
echo "$(( $(date +%s) - T0 )) s: data $(wc -l < "$R/train.jsonl") examples" | tee "$O/log.txt"

run() {  # run NAME BATCH STEPS LIMIT_S [train flags...]
  local name=$1 batch=$2 steps=$3 limit=$4; shift 4
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if (( left < limit / 2 )); then echo "$name $batch skipped (${left}s left)" | tee -a "$O/log.txt"; return; fi
  (( limit > left )) && limit=$left
  local t=$(date +%s)
  timeout "$limit" $PY -m dgemma train --config "$CONFIG" --tokenizer "$R/tok" --data "$R/train.jsonl" --raw \
    --batch-size "$batch" --lr 1.5e-3 --warmup 20 --steps "$steps" --device "$DEV" --seed 0 --no-progress \
    --out "$R/$name-$batch" "$@" > "$R/$name-$batch.log" 2>&1
  local rc=$? wall=$(( $(date +%s) - t ))
  $PY - "$R/$name-$batch/log.jsonl" "$name" "$batch" "$rc" "$wall" <<'EOF' | tee -a "$O/log.txt"
import json, sys
from pathlib import Path
path, name, batch, rc, wall = sys.argv[1:]
rows = [json.loads(l) for l in Path(path).read_text().splitlines()] if Path(path).is_file() else []
secs = [r["seconds"] for r in rows if r.get("kind") == "train"]
tail = sorted(secs[max(3, len(secs) // 2):]) if len(secs) > 4 else sorted(secs)
per_step = tail[len(tail) // 2] if tail else None
loss = [round(r["loss"], 4) for r in rows if r.get("kind") == "train"][:3]
line = {"name": name, "batch": int(batch), "seconds_per_step": per_step, "steps_done": len(secs),
        "first_step_s": secs[0] if secs else None, "wall_s": int(wall), "rc": int(rc), "first_losses": loss}
with open(Path(path).parents[2] / "speed.jsonl", "a") as f:
    f.write(json.dumps(line) + "\n")
shown = f"{per_step:.3f} s/step" if per_step else "no steps"
print(f"{name:>14} batch {batch:>4}: {shown}  ({len(secs)} steps, first {line['first_step_s'] or 0:.1f} s, "
      f"wall {wall} s, rc {rc})  losses {loss}")
EOF
}

for b in $BATCHES; do run eager-fp32 "$b" "$STEPS" 40; done
for b in $BATCHES; do run eager-bf16 "$b" "$STEPS" 40 --dtype bfloat16; done
for b in $BATCHES; do run compile-fp32 "$b" "$CSTEPS" 110 --compile; done
for b in $BATCHES; do run compile-bf16 "$b" "$CSTEPS" 110 --compile --dtype bfloat16; done
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$O/log.txt"
tail -n 30 "$R"/compile-fp32-*.log 2>/dev/null | grep -i -m 5 "error\|break" || true
