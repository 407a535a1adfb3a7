#!/usr/bin/env bash
# Do the sleep arms' memory per model add up to the card's, and are a model's peaks from /metrics and
# kvcached's segment read? sleep (one server, read from the card's series), shared_sleep (two, read per
# process tree) and shared_kvcached (two, whose 0.3 s smoke bursts fell between 2 Hz reads of /metrics)
# with --preset smoke, at the default --process-sample-hz (2) and at 20 (8 samples in a 0.4 s burst);
# then each run's memory cost rows, per-model rows and problem lines; last, what the sampler costs at
# each rate beside one idle kvcached server (benchmarks/sampler_bench.py, 30 s each; SAMPLER_RATES="20"
# measures only that rate, where device time is short).
# Usage: bash tests/gpu/sleep_sampling_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/sleep_sampling_check)
set -u
source "$(dirname "$0")/lib.sh" sleep_sampling_check "$@"
for hz in 2 20; do
  timed "sleep_${hz}hz" python3 run_experiments.py "${MODELS[@]}" --preset smoke \
    --experiments shared_kvcached,sleep,shared_sleep --process-sample-hz "$hz" --tag "sleep_${hz}hz"
done
for hz in ${SAMPLER_RATES:-2 20}; do
  timed "sampler_${hz}hz" python3 benchmarks/sampler_bench.py --seconds 30 -- --model-a "$A" --load-format dummy \
    --process-sample-hz "$hz" "${EXTRA[@]}"
  say "$(grep -A4 '^sampler alone' "$OUTDIR/sampler_${hz}hz.log")"
done
for summary in "$OUTDIR"/results/*/summary.md; do
  say "$(basename "$(dirname "$summary")"):"
  say "$(grep -E 'per-model memory|peaks from|^\| (sleep|shared_sleep|shared_kvcached) \| ' "$summary")"
done
say "all done"
