#!/usr/bin/env bash
# What vLLM holds besides weights and KV, on a card of each size class. vLLM 0.24 gives an API server
# 8,192 batched tokens and 1,024 sequences on a card of 70 GiB or more (an A100 excepted), and
# 2,048 tokens and 256 sequences below; TIER=small emulates the smaller card on a large one by passing
# those two flags. For each model: experiments kvcached and static at a share that holds it. The static
# server's workspace is share x card - weights - "Available KV cache memory" (vLLM's log); the kvcached
# server's rest is its idle level beyond weights and KV pages (summary.md's footprint table).
# TIER=tN (t16384, t32768) passes --max-num-batched-tokens N at vLLM's 1,024 sequences: activations past
# the large card's default batch.
# Usage: TIER=small|large|tN bash tests/gpu/workspace_check.sh [model folder ...]   (writes to $OUT or
# /tmp/workspace_check; SHARES="0.08 0.10 0.25" gives each model's share, in order)
set -u
source "$(dirname "$0")/lib.sh" workspace_check
say "vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1)"
[ $# -gt 0 ] || set -- /tmp/kitmodels/Qwen2.5-0.5B-Instruct /tmp/kitmodels/Qwen2.5-1.5B-Instruct /tmp/kitmodels/Qwen2.5-7B-Instruct
read -r -a shares <<< "${SHARES:-0.08 0.10 0.25}"
tier=${TIER:-small}
tier_args=""
[ "$tier" = small ] && tier_args="--max-num-batched-tokens 2048 --max-num-seqs 256"
[[ "$tier" =~ ^t[0-9]+$ ]] && tier_args="--max-num-batched-tokens ${tier#t}"
i=0
for model in "$@"; do
  share=${shares[$i]}; i=$((i + 1)); name="ws_${tier}_$(basename "$model")"
  timed "$name" python3 run_experiments.py "${MODELS[@]}" --model-a "$model" --model-b "$model" --preset smoke \
    --experiments kvcached,static --gpu-memory-utilization "$share" --extra-server-args "$tier_args" --tag "$name"
  folder=$(ls -d "$OUTDIR"/results/*_"$name" | tail -1)
  say "$name: $(python3 - "$folder" "$share" <<'PY'
import json, pathlib, re, sys
folder, share = pathlib.Path(sys.argv[1]), float(sys.argv[2])
total_gib = json.loads((folder / "config.json").read_text())["gpu"]["total_mib"] / 1024
log = next(folder.glob("*static/server_A_static.log"), None)
text = log.read_text(errors="replace") if log else ""
weights = re.findall(r"Model loading took ([\d.]+) GiB", text)
kv = re.findall(r"Available KV cache memory: (-?[\d.]+) GiB", text)
if weights and kv:
    ws = share * total_gib - float(weights[-1]) - float(kv[-1])
    print(f"card {total_gib:.2f} GiB, share {share}, weights {weights[-1]} GiB, KV {kv[-1]} GiB: workspace {ws:.2f} GiB")
else:
    print(f"static log {log}: weights {weights}, KV {kv}")
PY
)"
  say "$(grep -A5 'What each server holds' "$folder/summary.md" | grep -E '^\| (kvcached|static) ')"
done
say "all done"
