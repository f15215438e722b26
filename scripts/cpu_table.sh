#!/usr/bin/env bash
# Regenerate the digits `cpu` rows one method at a time (one heavy job on a 2-core machine);
# each finished run is resumable and skipped when run again. After each method, its row.json and grid
# are copied to results/digits/rows/<method>-cpu-seed<S>.{json,png}, its probe curve (if any) to
# results/digits/curves/, and results/digits/table_cpu.md and the README's cpu table are regenerated.
# Usage: SEEDS="0 1 2" bash scripts/cpu_table.sh [methods...]   (default seeds: 0)
# Default methods: every registered method that takes the digits task's setting, references aside (run those by
# name); each method's learning-curve flags are its declarations (probe_every["cpu"], probe_n; bench.api.Method).
set -u
cd "$(dirname "$0")/.."
export BENCH_DATA="${BENCH_DATA:-$(cd .. && pwd)/shared/data}"
BENCH=bench; [ -x .venv/bin/bench ] && BENCH=.venv/bin/bench
PY=python; [ -x .venv/bin/python ] && PY=.venv/bin/python
methods=("$@")
if [ ${#methods[@]} -eq 0 ]; then
  names=$("$PY" -c '
from bench.registry import get_task, methods
setting = get_task("digits").setting
print(" ".join(n for n, m in methods().items() if m.family != "Reference" and setting in m.settings))') \
    || { echo "cannot list the registered methods"; exit 1; }
  read -r -a methods <<< "$names"
fi
for seed in ${SEEDS:-0}; do
  for m in "${methods[@]}"; do
    # learning curves: a few points over each method's `cpu` loop (steps / probe-every), cheap sources
    flags=$("$PY" -c '
import sys
from bench.registry import get_method
m = get_method(sys.argv[1])
every = m.probe_every.get("cpu") if m.probe_loop else None
print(f"--probe-every {every} --probe-n {m.probe_n}" if every else "")' "$m") || flags=""
    read -r -a probe <<< "$flags"
    "$BENCH" run --methods "$m" --task digits --budget cpu --seeds "$seed" --out runs --no-progress "${probe[@]}" \
      || { echo "$m seed $seed failed"; continue; }
    # the run this command just made or skipped (the default options: not the newest directory, which may be a
    # run with other options that was re-evaluated since)
    dir=$("$BENCH" status --methods "$m" --task digits --budget cpu --seeds "$seed" --out runs \
          | grep -o '[^ ]*/digits/[^ ]*$' | head -1)
    [ -n "$dir" ] && [ -f "$dir/row.json" ] || { echo "$m seed $seed: no finished run found"; continue; }
    mkdir -p results/digits/rows results/digits/curves
    cp "$dir/row.json" results/digits/rows/"$m"-cpu-seed"$seed".json
    [ -f "$dir/grid.png" ] && cp "$dir/grid.png" results/digits/rows/"$m"-cpu-seed"$seed".png
    if [ ${#probe[@]} -gt 0 ]; then
      "$PY" scripts/plot_curves.py "$dir" --out results/digits/curves/"$m"-cpu-seed"$seed".png || true
    fi
    "$BENCH" table --task digits --rows results/digits/rows --budget cpu --save results/digits/table_cpu.md > /dev/null || true
    "$PY" scripts/readme_table.py --write README.md || true
  done
done
