#!/bin/bash
# The GPU benchmark of issue 5 (26B-A4B, random bf16 weights made on the GPU, no downloads; under 8 minutes on one
# H100/H200): eager, then the compiled decoder step (CUDA graphs) beside it. Arguments go to bench/gpu.py, e.g.
#   bench/gpu.sh                          # eager + --compile reduce-overhead, batches 1 and 4
#   bench/gpu.sh --compile "" --batches 1 # eager only, one user
# Ends with gpu.py's one JSON line. See bench/README.md, section gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu.py --compile reduce-overhead "$@"
