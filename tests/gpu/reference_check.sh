#!/usr/bin/env bash
# The reference runs on a host with 4 cards (vLLM + kvcached installed, models as below), two jobs at once:
#  GPUs 0,1: every default experiment, --repeats 3, --gpus 0,1 (reference run 1), then experiments 1 and 2
#            under Poisson arrivals at 2, 4, 8 and 16 requests/s, 30 s each, with a decode-length mix and
#            SLOs (goodput);
#  GPUs 2,3: every default experiment, --repeats 3, --gpus 2,3 (reference run 2), then the sampler alone
#            against an idle kvcached server on GPU 2 (benchmarks/sampler_bench.py).
# Usage: bash tests/gpu/reference_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/reference_check)
# For a rehearsal with fakes: SERVER_CMD (passed as --server-cmd) and EXTRA_ARGS (more flags, split on spaces).
set -u
source "$(dirname "$0")/lib.sh" reference_check "$@"
say "python $(python3 -V 2>&1); vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1 | tail -1); kvcached $(python3 -c 'import importlib.metadata as m; print(m.version("kvcached"))' 2>&1 | tail -1); cores $(nproc)"
( timed reference_1 python3 run_experiments.py "${MODELS[@]}" --gpus 0,1 --repeats 3 --tag reference_1
  timed open_loop python3 run_experiments.py "${MODELS[@]}" --gpus 0,1 --experiments 1,2 --arrivals poisson \
    --rates 2,4,8,16 --duration-s 30 --output-tokens-dist lognormal:128,0.6 --max-tokens 512 \
    --slo-ttft-ms 500 --slo-tpot-ms 50 --tag open_loop ) &
( timed reference_2 python3 run_experiments.py "${MODELS[@]}" --gpus 2,3 --port-a 8201 --port-b 8202 --repeats 3 \
    --tag reference_2
  timed sampler_bench python3 benchmarks/sampler_bench.py --seconds 30 -- --model-a "$A" --load-format dummy \
    --gpu-index 2 --port-a 8501 --port-b 8502 "${EXTRA[@]}" ) &
wait
say "all done"
