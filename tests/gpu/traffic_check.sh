#!/usr/bin/env bash
# Real-GPU runs of the sleep arm and of open-loop traffic (4 cards; models as below), two jobs at once:
#  GPUs 0,1: kvcached, static and sleep mode, one model and two (experiments 1,2,3,4,6,7), --gpus 0,1;
#  GPUs 2,3: experiments 1 and 2 under Poisson arrivals at 2, 4, 8 and 16 requests/s, 30 s each,
#            with a decode-length mix and SLOs (goodput), --gpus 2,3.
# Usage: bash tests/gpu/traffic_check.sh [model folder A] [model folder B]   (writes to $OUT or /tmp/traffic_check)
# For a rehearsal with fakes: SERVER_CMD (passed as --server-cmd) and EXTRA_ARGS (more flags, split on spaces).
set -u
source "$(dirname "$0")/lib.sh" traffic_check "$@"
( timed three_arms python3 run_experiments.py "${MODELS[@]}" --gpus 0,1 --experiments 1,2,3,4,6,7 --tag three_arms ) &
( timed open_loop python3 run_experiments.py "${MODELS[@]}" --gpus 2,3 --port-a 8201 --port-b 8202 \
    --experiments 1,2 --arrivals poisson --rates 2,4,8,16 --duration-s 30 --output-tokens-dist lognormal:128,0.6 \
    --max-tokens 512 --slo-ttft-ms 500 --slo-tpot-ms 50 --tag open_loop ) &
wait
say "all done"
