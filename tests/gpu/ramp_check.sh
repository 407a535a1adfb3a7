#!/usr/bin/env bash
# Staggered ramps on one card, the shape of kvcached's own benchmark: three Llama-3.1-8B-shaped models
# (the offline kit's dummy weights, 128 KiB of KV per token), each rising by 1 request/s a second to its
# peak and back to 1, the next starting once the one before has peaked; kvcached (experiment 3) against
# a static split of about 24 GiB per model (experiment 4, 0.3 of an 80 GB card) and sleep mode at the
# same share behind the router (experiment 7), one window per peak of 8, 14 and 20 requests/s,
# 512-token prompts and 256-token answers, the default SLOs.
# Usage: bash tests/gpu/ramp_check.sh [model folder]   (writes to $OUT or /tmp/ramp_check). A rehearsal
# with fakes: SERVER_CMD, and EXTRA_ARGS (they come last, so they override the peaks and the duration).
set -u
source "$(dirname "$0")/lib.sh" ramp_check
M=${1:-/tmp/kitmodels/Llama-3.1-8B-shape}
TOTAL=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 2>/dev/null | head -1)
SHARE=$(python3 -c "print(min(0.3, round(24 * 1024 / ${TOTAL:-81559}, 2)))")
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc); static share $SHARE of ${TOTAL:-?} MiB"
timed ramps python3 run_experiments.py --models "$M,$M,$M" --load-format dummy \
  --results-dir "$OUTDIR/results" --experiments 3,4,7 --static-shares "$SHARE,$SHARE,$SHARE" \
  --gpu-memory-utilization "$SHARE" \
  --arrivals ramp --peak-rates 8,14,20 --ramp-step 1 --duration-s 80 --prompt-tokens 512 \
  --max-tokens 256 --max-model-len 2048 --gpu-index 0 --tag ramps "${EXTRA[@]}"
say "$(sed -n '/^What one card/,/^At /p' "$OUTDIR"/results/*_ramps/summary.md)"
say "$(tail -1 "$OUTDIR/ramps.log")"
say "all done"
