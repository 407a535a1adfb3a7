#!/usr/bin/env bash
# vLLM's workspace past the large card's default batch of 8,192 tokens: 16,384 and 32,768 batched tokens at
# vLLM's 1,024 sequences (workspace_check.sh's TIER=tN), for Qwen2.5-7B, the Qwen2.5-14B shape (written by
# large_workspace_check.sh), the Llama-3.1-8B shape and Qwen2.5-0.5B (largest MLP first), on a card of 80 GiB
# or more. Usage: bash tests/gpu/batch_workspace_check.sh   (TIERS="t32768 t16384", SHARES, MODELS override)
set -u
here=$(dirname "$0")
kit=${KITMODELS:-/tmp/kitmodels}
KITMODELS=$kit WRITE_ONLY=1 bash "$here/large_workspace_check.sh" > /dev/null
read -r -a names <<< "${MODELS:-Qwen2.5-7B-Instruct Qwen2.5-14B-shape Llama-3.1-8B-shape Qwen2.5-0.5B-Instruct}"
for tier in ${TIERS:-t32768 t16384}; do
  TIER=$tier SHARES=${SHARES:-0.30 0.45 0.30 0.10} bash "$here/workspace_check.sh" "${names[@]/#/$kit/}"
done
