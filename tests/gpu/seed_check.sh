#!/usr/bin/env bash
# The tutorial's three experiments and the sampler on a host with 4 cards (vLLM + kvcached installed,
# models as below), three jobs at once:
#  GPUs 0,1: `--experiments seed --preset seed --gpus 0,1`, twice (the first on a fresh host);
#  GPU 2:    the same on one card;
#  GPU 3:    the sampler alone for 60 s against an idle kvcached server (benchmarks/sampler_bench.py).
# Usage: bash tests/gpu/seed_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/seed_check)
# For a rehearsal with fakes: SERVER_CMD (passed as --server-cmd) and EXTRA_ARGS (more flags, split on spaces).
set -u
source "$(dirname "$0")/lib.sh" seed_check "$@"
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc)"
SEED=(--experiments seed --preset seed)
( timed seed_2gpu_first python3 run_experiments.py "${MODELS[@]}" "${SEED[@]}" --gpus 0,1 --tag seed_2gpu_first
  timed seed_2gpu_second python3 run_experiments.py "${MODELS[@]}" "${SEED[@]}" --gpus 0,1 --tag seed_2gpu_second ) &
( timed seed_1gpu python3 run_experiments.py "${MODELS[@]}" "${SEED[@]}" --gpu-index 2 --port-a 8201 --port-b 8202 \
    --tag seed_1gpu ) &
( timed sampler_bench python3 benchmarks/sampler_bench.py --seconds 60 -- --model-a "$A" --load-format dummy \
    --gpu-index 3 --port-a 8501 --port-b 8502 "${EXTRA[@]}" ) &
wait
say "all done"
