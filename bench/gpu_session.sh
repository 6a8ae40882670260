#!/bin/bash
# Issue 5's device checks for one lent GPU session (15 minutes of device time, at most 10 minutes a call), as two
# prepared calls that each fit the 600 s limit with a margin:
#   OUT=$OUT bench/gpu_session.sh 1   # ~7 min: fp8 kernel checks + GPU tests, the sampler's launches, then eager
#                                     #   bf16 and eager fp8 (batches 1 and 4) on the same warm machine, then where the
#                                     #   kernel time of an eager bf16 step, commit and 1K prefill goes (step_profile.py),
#                                     #   then 1K and 4K prefills: chunked / one call / pieces of 2K / the old
#                                     #   math-kernel dispatch, with their peak memory
#   OUT=$OUT bench/gpu_session.sh 2   # ~7 min: compiled (reduce-overhead) bf16 and fp8, batches 1 and 4
# Each step writes $OUT/NAME.log and prints its last lines; a failing or timed-out step does not stop the others.
# Step limits: LIMIT_SCALE=2 doubles them (a slower card). No downloads; weights are random, built on the GPU.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$(( $2 * ${LIMIT_SCALE:-1} )) start=$SECONDS
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n 4 "$OUT/$name.log" | cut -c1-2000
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
case "${1:-1}" in
1)
    step quant_check 90 "$PY" bench/quant_gpu_check.py
    step gpu_tests 90 "$PY" -m pytest -p no:cacheprovider -q -m gpu tests/test_quant.py tests/test_sampling_oracle.py
    step sampler_ops 60 "$PY" bench/sampler_ops.py --device cuda --batch 4 --reps 5
    step eager_bf16 110 "$PY" bench/gpu.py --compile "" --batches 1,4 --no-loop
    step eager_fp8 110 "$PY" bench/gpu.py --compile "" --batches 1,4 --no-loop --quantize fp8
    step profile_bf16 100 "$PY" bench/step_profile.py --steps 4 --prompt 1024
    step long_prompt 100 "$PY" bench/long_prompt.py --device cuda --lengths 1024,4096 --reps 2 --pieces 2048
    ;;
2)
    step compiled_bf16 230 "$PY" bench/gpu.py --compile reduce-overhead --batches 1,4 --no-loop --long-prompt 1024
    step compiled_fp8 250 "$PY" bench/gpu.py --compile reduce-overhead --batches 1,4 --no-loop --long-prompt 1024 \
        --quantize fp8
    ;;
*)
    echo "usage: OUT=DIR bench/gpu_session.sh 1|2" >&2
    exit 2
    ;;
esac
grep -h '^{"bench": "\(gpu\|step_profile\|long_prompt\)"' "$OUT"/*.log > "$OUT/summary.jsonl" 2>/dev/null
echo "== JSON lines in $OUT/summary.jsonl: $(wc -l < "$OUT/summary.jsonl")"
