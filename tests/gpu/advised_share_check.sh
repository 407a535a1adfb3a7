#!/usr/bin/env bash
# The share the room checks advise, served by vLLM: for each model, --check at a share too small for it
# (refused, naming the share that fits), then experiment 2 (static) at the advised share, and what vLLM
# found for KV. Models: the 0.5B with a 262,144-token vocabulary, the 14B and 32B shapes
# (large_workspace_check.sh writes them). Usage: bash tests/gpu/advised_share_check.sh
# (writes to $OUT or /tmp/advised_share_check; SMALL_SHARES="0.06 0.36 0.8" gives each model's too-small share)
set -u
here=$(dirname "$0")
kit=${KITMODELS:-/tmp/kitmodels}
WRITE_ONLY=1 bash "$here/large_workspace_check.sh" > /dev/null
source "$here/lib.sh" advised_share_check
read -r -a small <<< "${SMALL_SHARES:-0.06 0.36 0.8}"
i=0
for name in Qwen2.5-0.5B-vocab262k Qwen2.5-14B-shape Qwen2.5-32B-shape; do
  share=${small[$i]}; i=$((i + 1)); model=$kit/$name
  run=(python3 run_experiments.py "${MODELS[@]}" --model-a "$model" --model-b "$model" --preset smoke --experiments 2)
  timed "check_${name}_$share" "${run[@]}" --check --gpu-memory-utilization "$share"
  say "$(grep -E 'models fit' "$OUTDIR/check_${name}_$share.log" | head -1)"
  advised=$(grep -oE 'fix: --gpu-memory-utilization [0-9.]+' "$OUTDIR/check_${name}_$share.log" | head -1 | awk '{print $3}')
  [ -n "$advised" ] || { say "$name: no share advised"; continue; }
  timed "serve_${name}_$advised" "${run[@]}" --gpu-memory-utilization "$advised" --tag "advised_$name"
  folder=$(ls -d "$OUTDIR"/results/*_advised_"$name" | tail -1)
  say "$name at $advised: $(grep -ah 'Available KV cache memory\|No available memory' "$folder"/*/server_A_static.log | sed 's/^.*\] //' | head -2 | tr '\n' ' ')"
  say "$(grep -A4 'What each server holds' "$folder/summary.md" | grep -E '^\| static ')"
done
say "all done"
