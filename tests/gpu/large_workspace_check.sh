#!/usr/bin/env bash
# vLLM's workspace for models beyond 7B and for a larger vocabulary: writes Qwen2.5-14B-, Qwen2.5-32B- and
# a 0.5B model with Gemma's 262,144-token vocabulary (the kit's tokenizer, the real layer shapes, dummy
# weights) beside the kit's Llama-3.1-8B-shape, then runs workspace_check.sh on them at the tier given.
# Usage: TIER=small|large bash tests/gpu/large_workspace_check.sh   (on a card of 140 GiB: the shares
# below hold each model's weights with room for KV; SHARES and MODELS override them; WRITE_ONLY=1 writes
# the folders and stops)
set -u
here=$(dirname "$0")
kit=${KITMODELS:-/tmp/kitmodels}
python3 - "$kit" <<'PY'
import json, pathlib, shutil, sys
kit = pathlib.Path(sys.argv[1])
base = json.loads((kit / "Qwen2.5-7B-Instruct" / "config.json").read_text())
shapes = {
    "Qwen2.5-14B-shape": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                              num_hidden_layers=48, max_window_layers=48, num_key_value_heads=8),
    "Qwen2.5-32B-shape": dict(hidden_size=5120, intermediate_size=27648, num_attention_heads=40,
                              num_hidden_layers=64, max_window_layers=64, num_key_value_heads=8),
    "Qwen2.5-0.5B-vocab262k": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                   num_hidden_layers=24, max_window_layers=24, num_key_value_heads=2,
                                   tie_word_embeddings=True, vocab_size=262144),
}
for name, shape in shapes.items():
    folder = kit / name
    if not folder.exists():
        shutil.copytree(kit / "Qwen2.5-7B-Instruct", folder)
    (folder / "config.json").write_text(json.dumps({**base, **shape}, indent=2))
    print("wrote", folder / "config.json")
PY
[ "${WRITE_ONLY:-0}" = 1 ] && exit 0
tier=${TIER:-large}
if [ "$tier" = small ]; then default_models="Llama-3.1-8B-shape Qwen2.5-14B-shape Qwen2.5-0.5B-vocab262k"
  default_shares="0.15 0.25 0.05"
else default_models="Llama-3.1-8B-shape Qwen2.5-14B-shape Qwen2.5-32B-shape Qwen2.5-0.5B-vocab262k"
  default_shares="0.15 0.25 0.5 0.05"
fi
read -r -a names <<< "${MODELS:-$default_models}"
TIER=$tier SHARES=${SHARES:-$default_shares} bash "$here/workspace_check.sh" "${names[@]/#/$kit/}"
