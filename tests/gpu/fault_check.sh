#!/usr/bin/env bash
# Real-GPU check of the harness's fault handling (vLLM + kvcached installed, models as below):
#  1. kill -9 of the harness mid-burst: the card is back to its idle level within 10 s, nothing of ours left;
#  1b. kill -9 of a server's keeper mid-burst: the server still stops (parent-death signal) and frees the
#     card, and the harness records the experiment as failed and goes on;
#  2. two runs on the same ports: the second is refused before it launches anything, whether the first
#     is still starting (port bound, not listening) or already serving; the first run's numbers are intact.
# Usage: bash tests/gpu/fault_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/fault_check;
# ONLY_KILL=1 runs the kill checks alone; ONLY_KILL=1 ONLY_KEEPER=1 the keeper's alone)
set -u
A=${1:-/tmp/kitmodels/Qwen2.5-0.5B-Instruct}
B=${2:-/tmp/kitmodels/Qwen2.5-1.5B-Instruct}
OUTDIR=${OUT:-/tmp/fault_check}
WORK=/tmp/fault_check_work
mkdir -p "$OUTDIR" && rm -rf "$WORK" && mkdir -p "$WORK"
LOG="$OUTDIR/fault_check.log"
COMMON=(--model-a "$A" --model-b "$B" --load-format dummy --preset smoke)
used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; }
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
wait_file() { for _ in $(seq 1 "$2"); do compgen -G "$1" > /dev/null && return 0; sleep 0.5; done; return 1; }
ours() { ps -eo pid,ppid,pgid,etimes,args | grep -E "vllm.entrypoints|VLLM::|SUBREAPER|multiprocessing" | grep -v grep | cut -c1-160; }
# card_back SECONDS: how long after T0 the card came back to BASE (+64 MiB), polled every 0.25 s
card_back() { local now
  for _ in $(seq 1 $(($1 * 4))); do
    now=$(used)
    if [ "$now" -le $((BASE + 64)) ]; then
      say "card back to ${now} MiB after $(python3 -c "import time; print(f'{time.time() - $T0:.2f}')") s"; return 0; fi
    sleep 0.25
  done
  say "card at ${now} MiB: NOT back within $1 s"; }
wait_log() { for _ in $(seq 1 "$3"); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.5; done; return 1; }

say "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i 0)"
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))'); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))')"
BASE=$(used); say "idle card: ${BASE} MiB used"

if [ -z "${ONLY_KEEPER:-}" ]; then
say "=== 1. kill -9 of the harness during a burst (static arm, 0.55 of the card)"
python3 run_experiments.py "${COMMON[@]}" --experiments 2 --bursts 40 --burst-size 64 --max-tokens 256 \
  --prompt-tokens 512 --gap-s 0.2 --no-warmup --results-dir "$WORK/kill" > "$OUTDIR/kill_harness.log" 2>&1 &
H=$!
if wait_file "$WORK/kill/*/01_static/requests.jsonl" 400; then
  sleep 1
  say "mid-burst: card ${BASE} -> $(used) MiB; our processes:"; ours | tee -a "$LOG"
  kill -9 "$H"; T0=$(date +%s.%N); say "harness (pid $H) killed with SIGKILL"
  card_back 30
  say "left of ours 10 s after the kill:"; sleep 2; ours | tee -a "$LOG" || say "(none)"
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | tee -a "$LOG"
else
  say "FAILED: no burst started"; tail -30 "$OUTDIR/kill_harness.log" | tee -a "$LOG"; kill -9 "$H"
fi

fi

say "=== 1b. kill -9 of the server's keeper during a burst (static arm, 0.55 of the card)"
BASE=$(used); say "idle card: ${BASE} MiB used"
# vLLM stops gracefully on the keeper's death and waits for the burst's open requests, which its dead engine
# never answers: the harness ends the burst once the keeper has gone, failing them at once, and closing them
# lets vLLM's API server end (--request-timeout-s 20 bounds the burst all the same)
python3 run_experiments.py "${COMMON[@]}" --experiments 2 --bursts 40 --burst-size 64 --max-tokens 256 \
  --prompt-tokens 512 --gap-s 0.2 --no-warmup --request-timeout-s 20 --results-dir "$WORK/keeper" \
  > "$OUTDIR/kill_keeper.log" 2>&1 &
H=$!
if wait_file "$WORK/keeper/*/01_static/requests.jsonl" 400; then
  sleep 1
  K=$(pgrep -P "$H" -f PR_SET_CHILD_SUBREAPER | head -1)
  say "mid-burst: card ${BASE} -> $(used) MiB; keeper pid ${K:-none}; our processes:"; ours | tee -a "$LOG"
  kill -9 "$K"; T0=$(date +%s.%N); say "keeper (pid $K) killed with SIGKILL"
  card_back 60
  for _ in $(seq 1 240); do kill -0 "$H" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$H" 2>/dev/null; then say "harness still running 2 min after: SIGTERM"; kill -TERM "$H"; fi
  wait "$H"; say "harness exit code $? (1 expected: the experiment failed); its last lines:"
  grep -E "FAILED|died|exit code" "$OUTDIR/kill_keeper.log" | head -5 | cut -c1-400 | tee -a "$LOG"
  sleep 3; say "left of ours after it:"; ours | tee -a "$LOG" || say "(none)"
else
  say "FAILED: no burst started"; tail -30 "$OUTDIR/kill_keeper.log" | tee -a "$LOG"; kill -9 "$H"
fi

if [ -n "${ONLY_KILL:-}" ]; then tar czf "$OUTDIR/fault_check_runs.tgz" -C "$WORK" . 2>/dev/null; exit 0; fi

say "=== 2. two runs on the same ports"
python3 run_experiments.py "${COMMON[@]}" --experiments 1 --bursts 40 --gap-s 2 --port-a 8101 --port-b 8102 \
  --results-dir "$WORK/first" > "$OUTDIR/first_run.log" 2>&1 &
F=$!
# vLLM binds its port after ~20 s of imports and listens only once the engine is up (~50 s)
wait_log "$OUTDIR/first_run.log" "starting A kvcached" 60 && sleep 25
LISTENING=$(awk '$2 ~ /:1FA5$/ && $4 == "0A"' /proc/net/tcp /proc/net/tcp6 | wc -l)
say "second run while the first is starting (first listening on 8101: $LISTENING):"
python3 run_experiments.py "${COMMON[@]}" --experiments 1 --port-a 8101 --port-b 8102 --results-dir "$WORK/second_early" \
  > "$OUTDIR/second_early.log" 2>&1; say "  rc $?: $(grep -m1 -E 'port A:|port 8101|FAILED' "$OUTDIR/second_early.log" | cut -c1-300)"
wait_log "$OUTDIR/first_run.log" "ready after" 300
say "first run's server ready; second run while it serves:"
python3 run_experiments.py "${COMMON[@]}" --experiments 1 --port-a 8101 --port-b 8102 --results-dir "$WORK/second_late" \
  > "$OUTDIR/second_late.log" 2>&1; say "  rc $?: $(grep -m1 -E 'port A:|port 8101|FAILED' "$OUTDIR/second_late.log" | cut -c1-300)"
kill -TERM "$F"; wait "$F"; say "first run stopped with SIGTERM: rc $? (130 expected); headline: $(tail -1 "$OUTDIR/first_run.log" | cut -c1-600)"
say "idle card at the end: $(used) MiB"
tar czf "$OUTDIR/fault_check_runs.tgz" -C "$WORK" . 2>/dev/null
