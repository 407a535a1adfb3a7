#!/usr/bin/env bash
# Any model: experiments 1-5 with Qwen3-0.6B's shapes as model A, then experiments 1-2 (smoke preset)
# with Llama-3.1-8B's: architectures vLLM 0.24 runs on its Model Runner V2, which kvcached 0.1.6 refuses
# there. The harness must put every server, of every arm, on V1; config.json says which runner each used.
# Usage: bash tests/gpu/any_model_check.sh [model folder A] [model folder B] [Llama-shaped folder]
# (writes to $OUT or /tmp/any_model_check). For a rehearsal with fakes: SERVER_CMD and EXTRA_ARGS.
set -u
source "$(dirname "$0")/lib.sh" any_model_check "${1:-/tmp/kitmodels/Qwen3-0.6B}" "${2:-}"
LLAMA=${3:-/tmp/kitmodels/Llama-3.1-8B-shape}
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc); VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER-unset}"
timed qwen3_1_to_5 python3 run_experiments.py "${MODELS[@]}" --experiments 1,2,3,4,5 --gpu-index 0 --tag any_model_qwen3
timed llama_1_2 python3 run_experiments.py "${MODELS[@]}" --model-a "$LLAMA" --experiments 1,2 --preset smoke \
  --gpu-index 0 --tag any_model_llama
for run in "$OUTDIR"/results/*/; do
  say "$(basename "$run"): $(python3 -c "
import json, sys
c = json.load(open(sys.argv[1] + 'config.json'))
print('runner env', c.get('model_runner_env'), '|', '; '.join(f'{k}: {v.get(\"model_runner\")}' for k, v in c['servers'].items()))
" "$run" 2>&1)"
done
say "all done"
