#!/usr/bin/env bash
# After a refactor: does the README's main command still give every default experiment's figures, and does
# a SIGTERM mid-experiment (two kvcached servers up, bursts running) end the run with 130, every server
# stopped and the card back to its idle level?
# Usage: bash tests/gpu/interrupt_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/interrupt_check)
set -u
source "$(dirname "$0")/lib.sh" interrupt_check "$@"
used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; }
ours() { ps -eo pid,args | grep -E "vllm.entrypoints|VLLM::|EngineCore" | grep -v grep | cut -c1-120; }
say "vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))'); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))'); torch $(python3 -c 'import importlib.metadata as m; print(m.version("torch"))')"
timed main /usr/bin/time -v python3 run_experiments.py "${MODELS[@]}" --tag main
say "$(grep -E 'Elapsed|Maximum resident' "$OUTDIR/main.log")"
say "$(grep -E '^\| (kvcached|static|shared|overload|sleep)' "$OUTDIR"/results/*_main/summary.md | head -24)"
BASE=$(used); say "idle card: $BASE MiB"
python3 run_experiments.py "${MODELS[@]}" --experiments 3 --bursts 40 --gap-s 0.5 --tag sigterm \
  > "$OUTDIR/sigterm.log" 2>&1 &
H=$!
for _ in $(seq 1 400); do grep -q "burst 2" "$OUTDIR/sigterm.log" 2>/dev/null && break; sleep 0.5; done
say "mid-run: card $(used) MiB; sending SIGTERM to $H"; T0=$(date +%s.%N)
kill -TERM "$H"; wait "$H"; RC=$?
say "harness exit $RC after $(python3 -c "import time; print(f'{time.time() - $T0:.1f}')") s; card $(used) MiB (idle $BASE)"
say "left of ours: $(ours | wc -l) processes"; ours | tee -a "$LOG"
say "$(grep -E 'interrupted|stopping|stopped' "$OUTDIR/sigterm.log" | head -6)"
say "all done"
