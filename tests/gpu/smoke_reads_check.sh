#!/usr/bin/env bash
# --preset smoke reads each server 20 times a second: does a read now fall in every smoke burst, so that
# every model's peaks are figures rather than n/a, and what does reading that often cost the harness?
# RATES="20 2" adds the same run at the earlier 2 reads a second, the before (results/REFERENCE.md has one
# for three of the experiments).
# Usage: bash tests/gpu/smoke_reads_check.sh [model folder A] [model folder B]   (writes to $OUT or
# /tmp/smoke_reads_check)
set -u
source "$(dirname "$0")/lib.sh" smoke_reads_check "$@"
say "vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))'); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))'); torch $(python3 -c 'import importlib.metadata as m; print(m.version("torch"))')"
for hz in ${RATES:-20}; do
  name="smoke_${hz}hz"
  flags=(--preset smoke --experiments all --tag "$name")
  [ "$hz" = 2 ] && flags+=(--process-sample-hz 2)
  timed "$name" /usr/bin/time -v python3 run_experiments.py "${MODELS[@]}" "${flags[@]}"
  summary=$(ls "$OUTDIR"/results/*_"$name"/summary.md)
  say "$name: $(grep -E 'Elapsed|User time|System time' "$OUTDIR/$name.log" | tr -s ' ' | tr '\n' ';')"
  say "$name: $(grep -c 'no read fell' "$summary") 'no read fell' problems; $(grep -E '^Time:' "$summary")"
  say "$(grep -E '^- .*(no read fell|sampling errors)' "$summary" | cut -c1-200)"
done
say "all done"
