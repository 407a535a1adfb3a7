#!/usr/bin/env bash
# Does kvcached start slower than the static pool, or does the first start-up on a fresh host? On a
# host where vLLM has not run yet: `--experiments static` alone, then `kvcached,static` twice, each with
# --preimport off (every start-up includes vLLM's import) and --preset smoke; then the ready times and
# vLLM's "init engine" lines of every server.
# Usage: bash tests/gpu/startup_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/startup_check)
set -u
source "$(dirname "$0")/lib.sh" startup_check "$@"
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc)"
for run in static:cold_static kvcached,static:warm_both kvcached,static:warm_again; do
  timed "${run##*:}" python3 run_experiments.py "${MODELS[@]}" --preset smoke --preimport off \
    --experiments "${run%%:*}" --tag "${run##*:}"
  say "$(grep 'ready after' "$OUTDIR/${run##*:}.log")"
done
for log in "$OUTDIR"/results/*/*/server_*.log; do
  say "$(basename "$(dirname "$(dirname "$log")")")/$(basename "$(dirname "$log")"): $(grep -o 'init engine.*' "$log")"
done
say "all done"
