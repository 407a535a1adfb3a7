# Shared by the real-GPU scripts: `source tests/gpu/lib.sh NAME [model folder A] [model folder B]`.
# Sets A, B, OUTDIR ($OUT or /tmp/NAME), LOG and MODELS (the offline kit's dummy-weight models plus the
# results folder, SERVER_CMD and EXTRA_ARGS for a rehearsal with fakes); say and timed log with UTC times.
A=${2:-/tmp/kitmodels/Qwen2.5-0.5B-Instruct}
B=${3:-/tmp/kitmodels/Qwen2.5-1.5B-Instruct}
OUTDIR=${OUT:-/tmp/$1}
mkdir -p "$OUTDIR/results"
LOG="$OUTDIR/$1.log"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
[ -n "${SERVER_CMD:-}" ] && EXTRA+=(--server-cmd "$SERVER_CMD")
MODELS=(--model-a "$A" --model-b "$B" --load-format dummy --results-dir "$OUTDIR/results" "${EXTRA[@]}")
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
timed() { local name=$1; shift; local t0; t0=$(date +%s.%N)
  "$@" > "$OUTDIR/$name.log" 2>&1; local rc=$?
  say "$name: rc $rc in $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s"; }
say "GPUs: $(nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tr '\n' ';')"
