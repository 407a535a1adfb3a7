#!/usr/bin/env bash
# How much of the TTFT gap at 256 streams (the client's TTFT above vLLM's own time_to_first_token_seconds)
# is the harness's client, on one card:
#  1. benchmarks/client_bench.py on this host's cores: the client alone, against a zero-work server;
#  2. the harness, experiment 2 (static 0.5B, bursts of 256 requests at once, ~766 + 128 tokens), twice:
#     its summary's client-vs-server table;
#  3. `vllm bench serve`, vLLM's own client, the same shape (256 random requests at once, 766 + 128
#     tokens, ignore_eos), three times against a static 0.5B server of the same share: each run's mean
#     TTFT against the delta of the server's histogram around it.
# Usage: bash tests/gpu/client_gap_check.sh [model folder]   (writes to $OUT or /tmp/client_gap_check)
set -u
source "$(dirname "$0")/lib.sh" client_gap_check "${1:-/tmp/kitmodels/Qwen2.5-0.5B-Instruct}"
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc)"
if [ -z "${ONLY_BENCH_SERVE:-}" ]; then  # set: step 3 alone
  timed client_bench python3 benchmarks/client_bench.py
  say "$(grep '^|' "$OUTDIR/client_bench.log")"
  timed harness python3 run_experiments.py "${MODELS[@]}" --experiments 2 --repeats 2 --gpu-index 0 --tag gap256
  say "$(grep -A4 '^Client vs server' "$OUTDIR"/results/*_gap256/summary.md)"
fi

PORT=8301
ttft_histogram() {  # sum and count of vLLM's time_to_first_token_seconds
  python3 -c "
import re, urllib.request
text = urllib.request.urlopen('http://127.0.0.1:$PORT/metrics', timeout=10).read().decode()
pick = lambda name: sum(float(v) for v in re.findall(r'^' + name + r'(?:\{[^}]*\})? (\S+)$', text, re.M))
print(pick('vllm:time_to_first_token_seconds_sum'), pick('vllm:time_to_first_token_seconds_count'))"
}
python3 -m vllm.entrypoints.cli.main serve "$A" --load-format dummy --port $PORT --gpu-memory-utilization 0.5 --max-model-len 2048 \
  > "$OUTDIR/vllm_serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
for run in 1 2 3; do
  read -r sum0 count0 <<< "$(ttft_histogram)"
  timed "bench_serve_$run" python3 -m vllm.entrypoints.cli.main bench serve --backend openai-chat --endpoint /v1/chat/completions \
    --base-url "http://127.0.0.1:$PORT" --model "$A" --dataset-name random --random-input-len 766 \
    --random-output-len 128 --ignore-eos --num-prompts 256 --max-concurrency 256 --request-rate inf \
    --seed "$run" --save-result --result-dir "$OUTDIR" --result-filename "bench_serve_$run.json"
  read -r sum1 count1 <<< "$(ttft_histogram)"
  client=$(python3 -c "import json; print(round(json.load(open('$OUTDIR/bench_serve_$run.json'))['mean_ttft_ms'], 1))")
  server=$(python3 -c "print(round(($sum1 - $sum0) / max($count1 - $count0, 1) * 1000, 1))")
  say "vllm bench serve run $run: $((${count1%.*} - ${count0%.*})) requests, mean TTFT client $client ms, server $server ms"
done
kill "$SERVER"; wait "$SERVER"
say "all done"
