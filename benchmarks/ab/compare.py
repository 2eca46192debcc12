"""Per workload, the best examples/s (and ratio to the plain backbone) each checkout reached over
the rounds of `serving_trees.sh`, and new ÷ old. Prints JSON lines.

    python benchmarks/ab/compare.py OUT OLD_COMMIT NEW_COMMIT
"""
import json
import sys
from pathlib import Path

out, old, new = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
best: dict[tuple[str, str], dict] = {}
for path in sorted(out.glob("*.jsonl")):
    tree = path.stem.rsplit("-", 1)[0]
    for record in map(json.loads, path.read_text().splitlines()):
        value = record.get("examples_per_s")
        if value is None or "workload" not in record:
            continue
        key = (tree, f"{record['part']}: {record['workload']}")
        if key not in best or value > best[key]["examples_per_s"]:
            best[key] = record
for (tree, workload), record in sorted(best.items()):
    if tree != old or (new, workload) not in best:
        continue
    after = best[new, workload]
    print(json.dumps({"workload": workload, "old_examples_per_s": round(record["examples_per_s"], 1),
                      "new_examples_per_s": round(after["examples_per_s"], 1),
                      "new_over_old": round(after["examples_per_s"] / record["examples_per_s"], 3),
                      "old_vs_plain": record.get("vs_plain"), "new_vs_plain": after.get("vs_plain")}))
