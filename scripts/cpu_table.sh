#!/usr/bin/env bash
# Regenerate the digits `cpu` rows one method at a time (one heavy job on a 2-core machine);
# each finished run is resumable and skipped when run again. Usage: bash scripts/cpu_table.sh [methods...]
set -u
cd "$(dirname "$0")/.."
export BENCH_DATA="${BENCH_DATA:-$(cd .. && pwd)/shared/data}"
BENCH=bench; [ -x .venv/bin/bench ] && BENCH=.venv/bin/bench
methods=("$@")
[ ${#methods[@]} -eq 0 ] && methods=(otcs not tcr reflow scones ddib egsde w2gan otm ot-icnn knot dpmot)
for m in "${methods[@]}"; do
  probe=()
  case "$m" in otcs|not|knot|w2gan|otm|ot-icnn|tcr|reflow) probe=(--probe-every 500 --probe-n 200);; esac
  [ "$m" = not ] && probe=(--probe-every 20 --probe-n 500)
  [ "$m" = otcs ] && probe=(--probe-every 1000 --probe-n 200)
  "$BENCH" run --methods "$m" --task digits --budget cpu --out runs --no-progress "${probe[@]}" || echo "$m failed"
done
