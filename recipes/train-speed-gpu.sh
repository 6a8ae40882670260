#!/bin/bash
# Seconds per optimizer step of `dgemma train` on the Sudoku config, at batch 256 and 768, on synthetic Sudoku data
# made on the spot (no downloads), in this order (a stage that would pass DEADLINE seconds is skipped, so the script
# always ends with its table; about 4 minutes on one H200):
#   baseline-fp32   this trainer with the new paths switched off in-process (rms_norm's autograd chain, the
#                   per-expert MoE loop with its host sync, foreach AdamW): the step as it was before them
#   eager-fp32      the default (TF32): FusedRMSNorm, dense MoE dispatch (E=4, K=2), fused AdamW
#   eager-bf16      --dtype bfloat16: FusedRMSNorm, experts cast to bf16 for the grouped GEMM
#   compile-fp32    --compile (compile time = wall - steps x s/step)
#   compile-bf16    --compile --dtype bfloat16
#   recipes/train-speed-gpu.sh [OUTDIR]   env: DEV=cuda BATCHES="256 768" PY=python3 DEADLINE=230 CLIMIT=150
#   (more runs: --compile reduce-overhead adds CUDA graphs; EXTRA="--compile reduce-overhead" runs it last)
# CPU rehearsal (compiling there is slow):  DEV=cpu BATCHES=2 STEPS=4 CSTEPS=4 DEADLINE=1500 CLIMIT=500 \
#   OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 recipes/train-speed-gpu.sh /tmp/speed
# Output: one line per run (median seconds/step over the later steps, steps done, first step, wall, exit code,
# first losses) in OUTDIR/log.txt, one JSON line per run in OUTDIR/speed.jsonl; a failed run's log tail follows it.
set -uo pipefail
T0=$(date +%s)
export PYTHONPATH=$PWD
PY=${PY:-python3}; DEV=${DEV:-cuda}; BATCHES=${BATCHES:-"256 768"}; DEADLINE=${DEADLINE:-230}
STEPS=${STEPS:-12}; CSTEPS=${CSTEPS:-24}; CLIMIT=${CLIMIT:-150}; CONFIG=${CONFIG:-recipes/sudoku-config-h192.json}
O=${1:-/tmp/train-speed}; R=$O/work
rm -rf "$R"; mkdir -p "$R"; : > "$O/speed.jsonl"
export TORCHINDUCTOR_CACHE_DIR=$R/inductor  # a fresh cache: compile time is part of what a lease pays
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__)") | tee "$O/env.txt"
$PY -m dgemma sudoku tokenizer "$R/tok" > /dev/null 2>&1
# 8 x 150 dug puzzles x 10 symmetric images = 12k examples
for i in 0 1 2 3 4 5 6 7; do
  $PY -m dgemma sudoku generate --count 150 --givens 26-45 --seed $((2000 + i)) --variants 10 --format train \
    --out "$R/t$i.jsonl" 2>/dev/null &
done
wait
cat "$R"/t*.jsonl > "$R/train.jsonl"
echo "$(( $(date +%s) - T0 )) s: data $(wc -l < "$R/train.jsonl") examples" | tee "$O/log.txt"

cat > "$R/baseline.py" <<'EOF'
"""`dgemma train` with the step-cost changes switched off: the step as it was before them."""
import argparse
import importlib
import sys

import torch

from dgemma.model import layers
from dgemma.train.commands import add_train_parser, config_from_args

trainer = importlib.import_module("dgemma.train.train")


def foreach_adamw(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


layers.set_fused_norm("off")
trainer.choose_moe_dispatch = lambda model, cfg, device: False
trainer._optimizer = foreach_adamw
parser = argparse.ArgumentParser()
add_train_parser(parser.add_subparsers(dest="command"))
trainer.train(config_from_args(parser.parse_args(["train", *sys.argv[1:]])))
EOF

run() {  # run NAME BATCH STEPS LIMIT_S [train flags...]; NAME baseline-* runs baseline.py
  local name=$1 batch=$2 steps=$3 limit=$4; shift 4
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if (( left < limit / 2 )); then echo "$name $batch skipped (${left}s left)" | tee -a "$O/log.txt"; return; fi
  (( limit > left )) && limit=$left
  local entry=(-m dgemma train)
  [[ $name == baseline-* ]] && entry=("$R/baseline.py")
  local t=$(date +%s)
  timeout "$limit" $PY "${entry[@]}" --config "$CONFIG" --tokenizer "$R/tok" --data "$R/train.jsonl" --raw \
    --batch-size "$batch" --lr 1.5e-3 --warmup 20 --steps "$steps" --device "$DEV" --seed 0 --no-progress \
    --out "$R/$name-$batch" "$@" > "$R/$name-$batch.log" 2>&1
  local rc=$? wall=$(( $(date +%s) - t ))
  $PY - "$R/$name-$batch/log.jsonl" "$name" "$batch" "$rc" "$wall" "$O/speed.jsonl" <<'EOF' | tee -a "$O/log.txt"
import json, sys
from pathlib import Path
path, name, batch, rc, wall, out = sys.argv[1:]
rows = [json.loads(l) for l in Path(path).read_text().splitlines()] if Path(path).is_file() else []
secs = [r["seconds"] for r in rows if r.get("kind") == "train"]
tail = sorted(secs[max(3, len(secs) // 2):]) if len(secs) > 4 else sorted(secs)
per_step = tail[len(tail) // 2] if tail else None
loss = [round(r["loss"], 4) for r in rows if r.get("kind") == "train"][:3]
line = {"name": name, "batch": int(batch), "seconds_per_step": per_step, "steps_done": len(secs),
        "first_step_s": secs[0] if secs else None, "wall_s": int(wall), "rc": int(rc), "first_losses": loss}
with open(out, "a") as f:
    f.write(json.dumps(line) + "\n")
shown = f"{per_step:.3f} s/step" if per_step else "no steps"
print(f"{name:>14} batch {batch:>4}: {shown}  ({len(secs)} steps, first {line['first_step_s'] or 0:.1f} s, "
      f"wall {wall} s, rc {rc})  losses {loss}")
EOF
  (( rc != 0 )) && tail -n 4 "$R/$name-$batch.log" | cut -c1-300 | sed 's/^/    | /' | tee -a "$O/log.txt"
  return 0
}

for b in $BATCHES; do run baseline-fp32 "$b" "$STEPS" 40; done
for b in $BATCHES; do run eager-fp32 "$b" "$STEPS" 40; done
for b in $BATCHES; do run eager-bf16 "$b" "$STEPS" 40 --dtype bfloat16; done
for b in $BATCHES; do run compile-fp32 "$b" "$CSTEPS" "$CLIMIT" --compile; done
for b in $BATCHES; do run compile-bf16 "$b" "$CSTEPS" "$CLIMIT" --compile --dtype bfloat16; done
[[ -n ${EXTRA:-} ]] && for b in $BATCHES; do run extra "$b" "$CSTEPS" "$CLIMIT" $EXTRA; done
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$O/log.txt"
