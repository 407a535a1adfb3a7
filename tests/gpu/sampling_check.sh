#!/usr/bin/env bash
# Real-GPU check that the device series has no gaps under 256-stream bursts, on one lane and on two
# lanes of one process, and what the sampler costs alone (4 cards; models as below).
# Usage: bash tests/gpu/sampling_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/sampling_check)
set -u
source "$(dirname "$0")/lib.sh" sampling_check "$@"
( timed one_lane python3 run_experiments.py "${MODELS[@]}" --gpu-index 0 --experiments 1 --tag one_lane ) &
( timed two_lanes python3 run_experiments.py "${MODELS[@]}" --gpus 1,2 --port-a 8201 --port-b 8202 \
    --experiments 1,3 --tag two_lanes ) &
( timed sampler_bench python3 benchmarks/sampler_bench.py --seconds 30 -- --model-a "$A" --load-format dummy \
    --gpu-index 3 --port-a 8501 --port-b 8502 ) &
wait
say "all done"
