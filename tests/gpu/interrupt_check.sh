#!/usr/bin/env bash
# After a refactor: does the README's main command still give every default experiment's figures, and does
# a SIGTERM end the run with 130, every server stopped and the card back to its idle level, wherever it
# lands: mid-experiment (two kvcached servers, bursts running), a sleep-mode server asleep between bursts,
# a static server still starting, a server importing vLLM ahead of its start?
# Usage: bash tests/gpu/interrupt_check.sh [model folder A] [model folder B]   (writes to $OUT or
# /tmp/interrupt_check; ONLY_SIGTERMS=1 skips the main command)
set -u
source "$(dirname "$0")/lib.sh" interrupt_check "$@"
used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; }
ours() { ps -eo pid,args | grep -E "vllm.entrypoints|VLLM::|EngineCore|run_staged" | grep -v grep | cut -c1-120; }
# sigterm NAME PATTERN FLAGS...: run with FLAGS, send SIGTERM once PATTERN is in its output (1 s later)
sigterm() { local name=$1 pattern=$2; shift 2; local base h rc t0
  base=$(used); say "=== $name: idle card $base MiB"
  python3 run_experiments.py "${MODELS[@]}" --tag "$name" "$@" > "$OUTDIR/$name.log" 2>&1 &
  h=$!
  while kill -0 "$h" 2>/dev/null; do grep -q "$pattern" "$OUTDIR/$name.log" 2>/dev/null && break; sleep 0.5; done
  sleep 1; say "card $(used) MiB; SIGTERM to $h after: $(grep -m1 "$pattern" "$OUTDIR/$name.log" | cut -c1-90)"
  t0=$(date +%s.%N); kill -TERM "$h"; wait "$h"; rc=$?
  say "exit $rc after $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s; card $(used) MiB (idle $base)"
  say "left of ours: $(ours | wc -l) processes"; ours | tee -a "$LOG"
  say "$(grep -E 'interrupted|stopping|stopped' "$OUTDIR/$name.log" | head -4)"; }
say "vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))'); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))'); torch $(python3 -c 'import importlib.metadata as m; print(m.version("torch"))')"
if [ -z "${ONLY_SIGTERMS:-}" ]; then
  timed main /usr/bin/time -v python3 run_experiments.py "${MODELS[@]}" --tag main
  say "$(grep -E 'Elapsed|Maximum resident' "$OUTDIR/main.log")"
  say "$(grep -E '^\| (kvcached|static|shared|overload|sleep)' "$OUTDIR"/results/*_main/summary.md | head -24)"
fi
sigterm sigterm "burst 2" --experiments 3 --bursts 40 --gap-s 0.5
sigterm asleep "woken in" --experiments 6 --bursts 40 --gap-s 4
sigterm starting "waiting for A static" --experiments 2 --preimport off
sigterm importing_ahead "importing vLLM for A static" --experiments 1,2 --preimport on
say "all done"
