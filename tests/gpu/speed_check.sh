#!/usr/bin/env bash
# Real-GPU timing of the harness on a host with 4 cards (vLLM + kvcached installed, models as below),
# three jobs at once, each on its own cards and ports:
#  GPU 0:    the full default suite on one card (wall time, harness_overhead_s);
#  GPU 1,2:  the full default suite with --gpus 1,2, then the tutorial's three with --gpus 1,2 --preset seed;
#  GPU 3:    the sampler alone against an idle kvcached server (benchmarks/sampler_bench.py), then
#            experiment 2 at 64 streams, twice, for client vs server TTFT.
# Usage: bash tests/gpu/speed_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/speed_check)
set -u
source "$(dirname "$0")/lib.sh" speed_check "$@"
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))'); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))'); cores $(nproc)"

( timed full_1gpu python3 run_experiments.py "${MODELS[@]}" --gpu-index 0 --tag full_1gpu ) &
( timed full_2gpu python3 run_experiments.py "${MODELS[@]}" --gpus 1,2 --port-a 8201 --port-b 8202 --tag full_2gpu
  timed seed_2gpu python3 run_experiments.py "${MODELS[@]}" --gpus 1,2 --port-a 8201 --port-b 8202 \
    --experiments seed --preset seed --tag seed_2gpu ) &
( timed sampler_bench python3 benchmarks/sampler_bench.py --seconds 30 -- --model-a "$A" --load-format dummy \
    --gpu-index 3 --port-a 8501 --port-b 8502
  timed ttft64 python3 run_experiments.py "${MODELS[@]}" --gpu-index 3 --port-a 8501 --port-b 8502 \
    --experiments 2 --burst-size 64 --repeats 2 --tag ttft64 ) &
wait
say "all done"
