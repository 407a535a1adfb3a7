#!/usr/bin/env bash
# N models on one card: experiments 3-7 (shared_kvcached, shared_static, overload_kvcached,
# overload_static, shared_sleep) with three models named by --models: the offline kit's dummy
# Qwen2.5-0.5B, 1.5B and 7B. Every experiment runs all three; the summary gives idle and peak memory
# per strategy and per model.
# Usage: bash tests/gpu/many_models_check.sh [folder A] [folder B] [folder C]   (writes to $OUT or
# /tmp/many_models_check). A rehearsal with fakes: SERVER_CMD and EXTRA_ARGS, with model ids as arguments.
set -u
source "$(dirname "$0")/lib.sh" many_models_check "${1:-}" "${2:-}"
C=${3:-/tmp/kitmodels/Qwen2.5-7B-Instruct}
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc)"
timed three_models python3 run_experiments.py --models "$A,$B,$C" --load-format dummy \
  --results-dir "$OUTDIR/results" "${EXTRA[@]}" --experiments 3,4,5,7 --bursts 2 --gpu-index 0 --tag three_models
say "$(sed -n '/^| experiment/,/^$/p' "$OUTDIR"/results/*_three_models/summary.md | head -20)"
say "$(tail -1 "$OUTDIR/three_models.log")"
say "all done"
