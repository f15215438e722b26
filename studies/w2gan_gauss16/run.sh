#!/usr/bin/env bash
# W2GAN on gauss-16 (cpu budget, seed 0): the default diverges near step 1,150; does clipping the gradients or
# dropping the mean-cost scale of the potentials keep it stable?  One thread; rows land in studies/w2gan_gauss16/out/.
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
out=studies/w2gan_gauss16/out
mkdir -p "$out"
for variant in "grad_clip=1.0" "potential_scale=none" "critic_lr=1e-4 map_lr=1e-4"; do
  opts=(); for kv in $variant; do opts+=(--opt "$kv"); done
  bench run --methods w2gan --task gauss-16 --budget cpu --seeds 0 --out runs --no-progress --opt log_every=50 "${opts[@]}"
done
bench run --methods w2gan --task gauss-16 --budget cpu --seeds 0 --out runs --no-progress   # the default (stored)
for d in runs/gauss-16/w2gan/cpu-seed0-*; do
  [ -f "$d/row.json" ] && cp "$d/row.json" "$out/$(basename "$d").json"
done
