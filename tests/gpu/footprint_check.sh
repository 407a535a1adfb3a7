#!/usr/bin/env bash
# Explain every MiB: experiments 1, 2 and 6 (kvcached, static, sleep mode) with the default models, for
# each server's idle footprint (weights, KV, the rest) and what each sleep frees; then kill -9 of the
# harness mid-burst (the first check of fault_check.sh), timing the card's return to its idle level.
# Usage: bash tests/gpu/footprint_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/footprint_check)
set -u
source "$(dirname "$0")/lib.sh" footprint_check "$@"
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc)"
timed explain_every_mib python3 run_experiments.py "${MODELS[@]}" --experiments kvcached,static,sleep --gpu-index 0 \
  --tag explain_every_mib
say "$(sed -n '/What each server holds/,/^\*\*One model/p' "$OUTDIR"/results/*_explain_every_mib/summary.md)"
ONLY_KILL=1 OUT="$OUTDIR/fault" bash "$(dirname "$0")/fault_check.sh" "$A" "$B"
cat "$OUTDIR/fault/fault_check.log" >> "$LOG"
say "all done"
