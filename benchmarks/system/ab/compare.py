"""Per workload, the best each checkout reached over the rounds of `serving_trees.sh` — in
examples/s and as its ratio to the plain backbone of the same run (the steadier figure on a
noisy machine) — and new ÷ old of both. Prints JSON lines.

    python benchmarks/system/ab/compare.py OUT OLD_COMMIT NEW_COMMIT
"""
import json
import sys
from pathlib import Path

out, old, new = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
best: dict[tuple[str, str], dict[str, float]] = {}
for path in sorted(out.glob("*.jsonl")):
    tree = path.stem.rsplit("-", 1)[0]
    for record in map(json.loads, path.read_text().splitlines()):
        if record.get("examples_per_s") is None or "workload" not in record:
            continue
        seen = best.setdefault((tree, f"{record['part']}: {record['workload']}"), {"examples_per_s": 0, "vs_plain": 0})
        for figure in seen:
            seen[figure] = max(seen[figure], record.get(figure) or 0)
for (tree, workload), before in sorted(best.items()):
    after = best.get((new, workload))
    if tree != old or after is None:
        continue
    print(json.dumps({"workload": workload, **{f"{figure}_{side}": round(values[figure], 3)
                                               for figure in before for side, values in (("old", before), ("new", after))},
                      "new_over_old_vs_plain": round(after["vs_plain"] / before["vs_plain"], 3) if before["vs_plain"] else None}))
