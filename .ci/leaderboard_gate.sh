#!/usr/bin/env bash
# The smoke leaderboard gate: every registered method on the shipped demo checkpoint over a fixed shapes_vqa
# subset (model_configs/sweeps/ci_smoke.yaml), run as two shards into separate folders, merged, and checked
# against the committed baseline. Exit status 1 = a method got worse or its token counts changed.
# Refresh the baseline after an intended change:  bash .ci/leaderboard_gate.sh --write-baseline
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=leaderboards/ci_smoke.baseline.json
out=logs/ci_smoke
mode=(--check "$baseline" --tolerance 0.01)
if [ "${1:-}" = "--write-baseline" ]; then
  mode=(--write-baseline "$baseline")
elif [ -n "${1:-}" ]; then
  out=$1
fi
rm -rf "$out"  # always real runs: a finished run folder would be skipped, and would hide a change
for shard in 1 2; do
  lmms-tokprune sweep model_configs/sweeps/ci_smoke.yaml --shard "$shard/2" --output-dir "$out/shard-$shard"
done
lmms-tokprune leaderboard "$out/shard-1" "$out/shard-2" --out "$out/leaderboard" "${mode[@]}"
