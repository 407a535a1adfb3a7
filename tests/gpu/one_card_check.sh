#!/usr/bin/env bash
# Every default experiment on one card with the default flags (vLLM's engine process forked, each next
# server's vLLM imported ahead), then the tutorial's three with --preimport off: the paths a one-card
# user takes. Compare memory with the reference runs (spawned engines, two cards per run):
# python3 benchmarks/compare_runs.py OLD NEW.
# Usage: bash tests/gpu/one_card_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/one_card_check)
# For a rehearsal with fakes: SERVER_CMD (passed as --server-cmd) and EXTRA_ARGS (more flags, split on spaces).
set -u
source "$(dirname "$0")/lib.sh" one_card_check "$@"
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc)"
timed defaults_1gpu python3 run_experiments.py "${MODELS[@]}" --gpu-index 0 --tag defaults_1gpu
timed seed_no_preimport python3 run_experiments.py "${MODELS[@]}" --experiments seed --preset seed --gpu-index 0 \
  --preimport off --tag seed_no_preimport
say "all done"
