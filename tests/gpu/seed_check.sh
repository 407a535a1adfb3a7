#!/usr/bin/env bash
# The tutorial's three experiments and the sampler on real GPUs (vLLM + kvcached installed, models as
# below). CARDS (default 4) says how many cards the host lends:
#  4: three jobs at once: `--experiments seed --preset seed --gpus 0,1` twice (the first on a fresh
#     host); the same on GPU 2 alone; the sampler alone for 60 s against an idle kvcached server on GPU 3
#     (benchmarks/sampler_bench.py);
#  2: the two-card runs only;
#  1: the sampler, then the one-card run, both on GPU 0.
# Usage: [CARDS=N] bash tests/gpu/seed_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/seed_check)
# For a rehearsal with fakes: SERVER_CMD (passed as --server-cmd) and EXTRA_ARGS (more flags, split on spaces).
set -u
source "$(dirname "$0")/lib.sh" seed_check "$@"
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc)"
SEED=(--experiments seed --preset seed)
two_cards() {
  timed seed_2gpu_first python3 run_experiments.py "${MODELS[@]}" "${SEED[@]}" --gpus 0,1 --tag seed_2gpu_first
  timed seed_2gpu_second python3 run_experiments.py "${MODELS[@]}" "${SEED[@]}" --gpus 0,1 --tag seed_2gpu_second; }
one_card() {   # GPU, ports
  timed seed_1gpu python3 run_experiments.py "${MODELS[@]}" "${SEED[@]}" --gpu-index "$1" --port-a "$2" \
    --port-b "$3" --tag seed_1gpu; }
sampler() {   # GPU
  timed sampler_bench python3 benchmarks/sampler_bench.py --seconds 60 -- --model-a "$A" --load-format dummy \
    --gpu-index "$1" --port-a 8501 --port-b 8502 "${EXTRA[@]}"; }
case "${CARDS:-4}" in
  1) sampler 0; one_card 0 8201 8202 ;;
  2) two_cards ;;
  *) two_cards & one_card 2 8201 8202 & sampler 3 & wait ;;
esac
say "all done"
