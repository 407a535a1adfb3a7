#!/usr/bin/env bash
# A production trace on one card: two Llama-3.1-8B-shaped models (the offline kit's dummy weights,
# 128 KiB of KV per token), model A replaying the Azure LLM inference trace 2023 of code and model B
# that of conversation (Azure/AzurePublicDataset, data/, CC-BY; bring both files, they are not in the
# repository), each its busiest 300 s, ten times faster; one window per rate scale of 0.025, 0.05
# and 0.1 (a quarter of the trace's own rate, half of it and the rate itself); lengths from the trace
# (--max-model-len 8192 fits every request, or clips it and counts it), kvcached (experiment 3) against the default static split (experiment 4), the
# default SLOs. Usage: bash tests/gpu/trace_check.sh CODE_CSV CONV_CSV [model folder]   (writes to $OUT
# or /tmp/trace_check). A rehearsal with fakes: SERVER_CMD, and EXTRA_ARGS (they come last).
set -u
source "$(dirname "$0")/lib.sh" trace_check
CODE=$1 CONV=$2
M=${3:-/tmp/kitmodels/Llama-3.1-8B-shape}
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc)"
say "traces: $(sha256sum "$CODE" "$CONV" | awk '{print $1}' | tr '\n' ' ')"
timed traces python3 run_experiments.py --models "$M,$M" --load-format dummy \
  --results-dir "$OUTDIR/results" --experiments 3,4 --arrivals trace --trace "$CODE,$CONV" \
  --trace-window busiest:300 --trace-speedup 10 --trace-rate-scale 0.025,0.05,0.1 --max-model-len 8192 \
  --request-timeout-s 60 --gpu-index 0 --tag traces "${EXTRA[@]}"
say "$(sed -n '/^What one card/,/^At /p' "$OUTDIR"/results/*_traces/summary.md)"
say "$(tail -1 "$OUTDIR/traces.log")"
say "all done"
