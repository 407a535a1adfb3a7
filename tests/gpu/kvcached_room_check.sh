#!/usr/bin/env bash
# Does each kvcached server need its rest beside its weights? With another process holding the card down to
# FREE_GIB of free memory, three models under shared_kvcached (the smoke preset), its preflight included.
# OLD=path/to/an/earlier/run_experiments.py runs that one too, whose check counted only the weights and
# one request. Usage: FREE_GIB="24 31" bash tests/gpu/kvcached_room_check.sh [A] [B] [C]   (writes to $OUT
# or /tmp/kvcached_room_check; HOLD_CMD replaces the torch holder for a rehearsal with fakes)
set -u
[ $# -gt 0 ] || set -- /tmp/kitmodels/Qwen2.5-0.5B-Instruct /tmp/kitmodels/Qwen2.5-1.5B-Instruct /tmp/kitmodels/Qwen2.5-7B-Instruct
source "$(dirname "$0")/lib.sh" kvcached_room_check "$1" "$2"
models=$(IFS=,; echo "$*")
hold() {  # leaves $1 GiB free on GPU 0 until killed
  exec python3 -c "
import sys, time, torch
torch.cuda.init(); free, total = torch.cuda.mem_get_info()
x = torch.empty(free - int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device='cuda')
print('holding', x.numel() >> 20, 'MiB', flush=True); time.sleep(1e6)" "$1"
}
for free in ${FREE_GIB:-24 31}; do
  ${HOLD_CMD:-hold} "$free" > "$OUTDIR/hold_$free.log" 2>&1 & holder=$!
  sleep 15
  say "free ${free} GiB: $(cat "$OUTDIR/hold_$free.log"); card: $(nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader 2>/dev/null)"
  for code in ${OLD:+$OLD} run_experiments.py; do
    label=after; [ "$code" = run_experiments.py ] || label=before
    tag="free${free}_$label"
    flags=(--models "$models" --experiments shared_kvcached --preset smoke --tag "$tag")
    timed "run_$tag" python3 "$code" "${MODELS[@]}" "${flags[@]}"
    say "$(grep -A1 'models fit' "$OUTDIR/run_$tag.log" | cut -c1-300)"
    folder=$(ls -d "$OUTDIR"/results/*_"$tag" 2>/dev/null | tail -1)
    say "$(grep -hE 'preflight failed|out of memory|OutOfMemory|No available memory|Error:|[0-9] failed' \
      "$OUTDIR/run_$tag.log" ${folder:+"$folder"/*/server_*.log} 2>/dev/null | grep -v ' 0 failed' | sort -u | head -6 | cut -c1-300)"
    [ -n "$folder" ] && say "$(grep -E '^\| shared_kvcached \| [A-Z] kvcached' "$folder/summary.md")"
  done
  kill "$holder"; wait "$holder" 2>/dev/null
done
say "all done"
