#!/usr/bin/env bash
# Does each experiment count only its own sleeps when a sleep-mode server is reused (sleep, then
# shared_sleep, --preset smoke), and do two models' staggered ramps (kvcached and sleep mode behind the
# router) name each model in the progress lines and say a ramp's rate as each model's peak?
# Usage: bash tests/gpu/sleep_spans_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/sleep_spans_check)
set -u
source "$(dirname "$0")/lib.sh" sleep_spans_check "$@"
timed sleep_spans python3 run_experiments.py "${MODELS[@]}" --preset smoke --experiments sleep,shared_sleep \
  --tag sleep_spans
timed ramps python3 run_experiments.py "${MODELS[@]}" --experiments 3,7 --arrivals ramp --peak-rates 2,4 \
  --ramp-step 1 --duration-s 12 --prompt-tokens 256 --max-tokens 64 --max-model-len 2048 --tag ramps
say "$(grep -A4 '^What sleep mode frees' "$OUTDIR"/results/*_sleep_spans/summary.md)"
say "$(python3 -c "
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob('results/*/*/experiment.json')):
    for s in json.loads(f.read_text())['servers']:
        print(f.parent.name, s['label'], s['log'].split('/')[-2], s.get('log_lines'))
" "$OUTDIR")"
say "$(grep -E '^    . ramp [0-9]' "$OUTDIR/ramps.log")"
say "$(grep -E 'peak [0-9]|At 99|sleeps of this' "$OUTDIR"/results/*_ramps/summary.md)"
say "all done"
