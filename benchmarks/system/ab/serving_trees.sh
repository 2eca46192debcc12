#!/usr/bin/env bash
# Before/after a refactor: `benchmarks/system/serving.py --parts PARTS` (default engine,supermask) run
# by each of two checkouts (e.g. a `git worktree` of the old commit), alternating, so both
# meet the same machine state (who goes first alternates per round); every run's records go to OUT/<commit>-<round>.jsonl.
#
#   benchmarks/system/ab/serving_trees.sh OLD_TREE NEW_TREE OUT [ROUNDS] [PARTS]
#
# Compare with `python benchmarks/system/ab/compare.py OUT`.
set -euo pipefail
old=$(realpath "$1") new=$(realpath "$2") out=$(realpath -m "$3") rounds=${4:-2} parts=${5:-engine,supermask}
mkdir -p "$out"
for tree in "$old" "$new"; do  # each checkout's own compiled kernels (a fresh worktree has none)
  (cd "$tree" && PYTHONPATH="$tree" python -m ticketserve.core.kernels build >/dev/null)
done
for round in $(seq 1 "$rounds"); do
  order=("$old" "$new")
  (( round % 2 )) || order=("$new" "$old")  # who goes first alternates: position matters on these machines
  for tree in "${order[@]}"; do
    label=$(git -C "$tree" rev-parse --short HEAD)
    git -C "$tree" diff --quiet HEAD || label="$label+"
    script=(-m benchmarks.system.serving)  # checkouts from before the split ran it as a file
    [ -f "$tree/benchmarks/system/serving.py" ] || script=("$tree/benchmarks/serving.py")
    (cd "$tree" && PYTHONPATH="$tree" python "${script[@]}" --parts "$parts" --skip-bert-base \
      --rounds 1 --results "$out/$label-$round.jsonl")
  done
done
