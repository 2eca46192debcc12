#!/usr/bin/env bash
# Before/after a refactor: `benchmarks/serving.py --parts engine,supermask` run by each of two
# checkouts (e.g. a `git worktree` of the old commit), alternating, so both meet the same
# machine state; every run's records go to OUT/<commit>-<round>.jsonl.
#
#   benchmarks/ab/serving_trees.sh OLD_TREE NEW_TREE OUT [ROUNDS]
#
# Compare with `python benchmarks/ab/compare.py OUT`.
set -euo pipefail
old=$1 new=$2 out=$3 rounds=${4:-2}
mkdir -p "$out"
for round in $(seq 1 "$rounds"); do
  for tree in "$old" "$new"; do
    label=$(git -C "$tree" rev-parse --short HEAD)
    git -C "$tree" diff --quiet HEAD || label="$label+"
    PYTHONPATH="$tree" python "$tree/benchmarks/serving.py" --parts engine,supermask --skip-bert-base \
      --rounds 1 --results "$out/$label-$round.jsonl"
  done
done
