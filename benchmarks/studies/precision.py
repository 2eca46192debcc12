"""Quality under reduced precision: every task artifact of a study registry (the quality
studies write to benchmarks/.registry), evaluated on its task's GLUE dev split with the
shared encoder in float32, bfloat16, float16 or int8 — the path `ticketserve eval --dtype /
--quantize` and `serve` take. Resumable: one record per (artifact digest, dtype) in
results/precision.jsonl; the report benchmarks/studies/precision.md gives, per task and method, the
float32 metric and the change under each precision (target: |mean change| ≤ 0.5 points).

    python -m benchmarks.studies.precision [--registry benchmarks/.registry] [--dtypes float32,bfloat16,int8]
    python -m benchmarks.studies.precision --train --jobs 2     # first retrain the studies' artifacts (hours)

The quality studies' registries did not keep their artifacts, so `--train` retrains one per
task and method at the rate its study chose (seed 42, the studies' data budgets, `--epochs`
as given: the recorded run used 1): full FT, BitFit, Dominant-1 (its own ticket, searched as
the Dominant study searched), supermask, and the structure masks of plain multi-task training
(`ticketshare --plain`, every gate open: a closed gate multiplies by an exact 0 in any
precision, so open gates are where precision can cost anything).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import time
from pathlib import Path

from benchmarks import common

HERE = Path(__file__).parent
RESULTS = common.RESULTS / "precision.jsonl"
TRAINING = common.RESULTS / "precision-training.jsonl"  # what --train trained (budgets differ from the studies')
REPORT = HERE / "precision.md"
DATA_ROOT = common.GLUE
TASKS = ("sst2", "mrpc", "rte", "cola")
SST2_TRAIN_SAMPLES = 8000  # as every study trained SST-2
# method → (the rate its study chose, options); supermask's from benchmarks/studies/supermask.md, the
# others' from benchmarks/studies/dominant.md (Dominant-1 and BitFit peak at 3e-3, full FT at 2e-4)
STUDY_SETTINGS = {"full": (2e-4, {}), "bitfit": (3e-3, {}), "dominant": (3e-3, {"k": 1}), "supermask": (0.5, {})}
MODES = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "float16": ("float16", "none"),
         "int8": ("float32", "int8")}  # a precision's name → the encoder's dtype and quantization


def task_versions(store, pattern: str) -> list:
    """The latest version of every task artifact whose name matches `pattern`."""
    from ticketserve.core.kinds import get_kind

    found = []
    for name in sorted(fnmatch.filter(store.names(), pattern)):
        version = store.resolve(name)
        manifest = store.manifest(version)
        if get_kind(manifest.kind).is_task:
            found.append((version, manifest))
    return found


def retrain(registry: Path, jobs: int, epochs: int = 3, methods: tuple[str, ...] = (*STUDY_SETTINGS, "mtl")) -> None:
    """The studies' artifacts, retrained where the registry lacks them (resumable by name)."""
    import functools

    from benchmarks.studies.quality import (
        append,
        cli,
        run_stage,
        set_jobs,
        train_record,
    )
    from ticketserve.registry import open_store

    set_jobs(jobs)
    have = set(open_store(str(registry)).names())
    samples = {"sst2": SST2_TRAIN_SAMPLES}

    def data(task: str) -> list[str]:
        return ["--data-dir", str(DATA_ROOT / task), "--registry", str(registry), "--seed", "42",
                *(["--train-samples", str(samples[task])] if task in samples else [])]

    def single(task: str, method: str) -> None:
        name = f"precision-{task}-{method}-s42"
        if name in have:
            return
        lr, options = STUDY_SETTINGS[method]
        if method == "dominant":
            options = {**options, "ticket": f"precision-{task}-ticket-s42"}
        record = train_record(task, method, 42, name=name, train_samples=samples.get(task), epochs=epochs, lr=lr,
                              options=options, registry=registry)
        append(TRAINING, record | {"study": "precision-v1"})  # not quality.jsonl: other budgets than the studies'

    def search(task: str) -> None:
        if f"precision-{task}-ticket-s42" not in have:
            cli("train", "--method", "ticket-search", "--task", task, "--name", f"precision-{task}-ticket-s42",
                "--sigma-quantile", "0.99", "--epochs", str(epochs), *data(task))

    def multitask() -> None:
        if "precision-mtl" not in have:
            cli("train", "--method", "ticketshare", "--plain", "--tasks", ",".join(TASKS), "--data-root",
                str(DATA_ROOT), "--name", "precision-mtl", "--registry", str(registry), "--seed", "42",
                "--train-samples", str(SST2_TRAIN_SAMPLES))

    run_stage(jobs, [*([multitask] if "mtl" in methods else []),
                     *(functools.partial(search, t) for t in TASKS if "dominant" in methods),
                     *(functools.partial(single, t, m) for m in ("full", "bitfit", "supermask") if m in methods
                       for t in TASKS)])
    if "dominant" in methods:
        run_stage(jobs, [functools.partial(single, t, "dominant") for t in TASKS])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default=str(common.STUDY_REGISTRY))
    parser.add_argument("--names", default="*", help="artifact names to evaluate (a glob)")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8", help=f"of: {', '.join(MODES)}")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--train", action="store_true", help="first retrain the studies' artifacts (see above)")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time (--train)")
    parser.add_argument("--epochs", type=int, default=3, help="--train: epochs per run (the studies trained 3)")
    parser.add_argument("--methods", default="full,bitfit,dominant,supermask,mtl", help="--train: which to retrain")
    args = parser.parse_args()
    if args.train:
        retrain(Path(args.registry), args.jobs, args.epochs, tuple(args.methods.split(",")))

    import torch

    from ticketserve.core import artifact
    from ticketserve.core.backbone import dtype_named, load_backbone
    from ticketserve.core.data import load_split
    from ticketserve.registry import open_store
    from ticketserve.runtime.evaluate import evaluate
    from ticketserve.runtime.executor import Runtime

    store = open_store(args.registry)
    done = {(r["digest"], r["dtype"]) for r in map(json.loads, RESULTS.read_text().splitlines())} \
        if RESULTS.exists() else set()
    targets = task_versions(store, args.names)
    print(f"{len(targets)} task artifacts in {args.registry}", flush=True)
    for dtype in args.dtypes.split(","):
        todo = [(v, m) for v, m in targets if (v.digest, dtype) not in done]
        runtimes: dict[str, Runtime] = {}
        for version, manifest in todo:
            backbone_name = manifest.backbone.name
            if backbone_name not in runtimes:
                encoder_dtype, quantize = MODES[dtype]
                runtimes[backbone_name] = Runtime(load_backbone(backbone_name, store), device="cpu",
                                                  dtype=dtype_named(encoder_dtype), quantize=quantize)
            runtime = runtimes[backbone_name]
            task = runtime.add(artifact.load(store, version, runtime.backbone))
            spec = manifest.task
            dataset = load_split(spec, spec.eval_split, args.data_root / spec.name)
            started = time.perf_counter()
            metrics = evaluate(runtime, task, dataset)
            runtime.remove(task)
            record = {"study": "precision-v1", "artifact": str(version), "digest": version.digest, "name": manifest.name,
                      "kind": manifest.kind, "method": manifest.method, "task": spec.name, "dtype": dtype,
                      "metric_name": spec.metric, "metric": metrics[spec.metric], "examples": len(dataset),
                      "seconds": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads()}
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            with RESULTS.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    write_report()


def write_report() -> None:
    records = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    by_digest: dict[str, dict[str, dict]] = {}
    for r in records:
        by_digest.setdefault(r["digest"], {})[r["dtype"]] = r
    groups: dict[tuple[str, str], list[dict[str, dict]]] = {}
    for per_dtype in by_digest.values():
        if "float32" in per_dtype:
            first = per_dtype["float32"]
            groups.setdefault((first["task"], first["method"]), []).append(per_dtype)
    dtypes = [d for d in ("bfloat16", "float16", "int8") if any(d in g for gs in groups.values() for g in gs)]
    lines = ["# Quality under reduced precision (generated by `benchmarks/studies/precision.py`)", "",
             "Each task artifact of the study registry evaluated on its task's full GLUE dev split with the shared "
             "encoder in each precision (task terms in the activations' precision, heads in float32). Change = metric "
             "in that precision − float32, in points (×100), mean over the artifacts (seeds, rates) of the row; "
             "worst = the largest |change| of one artifact.", "",
             "| task | method | artifacts | metric, float32 | " + " | ".join(f"{d}: mean change | {d}: worst"
                                                                       for d in dtypes) + " |",
             "|---|---|---|---|" + "---|---|" * len(dtypes)]
    for (task, method), members in sorted(groups.items()):
        cells = [task, method, str(len(members)),
                 f"{statistics.mean(m['float32']['metric'] for m in members):.4f} ({members[0]['float32']['metric_name']})"]
        for dtype in dtypes:
            changes = [100 * (m[dtype]["metric"] - m["float32"]["metric"]) for m in members if dtype in m]
            cells += [f"{statistics.mean(changes):+.2f}", f"{max(changes, key=abs):+.2f}"] if changes else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    discussion = HERE / "precision_discussion.md"
    REPORT.write_text("\n".join(lines) + "\n\n" + (discussion.read_text() if discussion.exists() else ""))


if __name__ == "__main__":
    main()
