"""Quality benchmark: train methods on tasks and append one record per run to
benchmarks/results/quality.jsonl (task, method, k, seed, train_samples, metric, trainable
params, artifact bytes, train seconds, backbone). Each run is a separate `ticketserve train`
process, exactly what a user runs.

    python benchmarks/quality.py --tasks sst2 --methods full,bitfit --train-samples 8000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "quality.jsonl"


def run(task: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    name = f"bench-{task}-{method}-s{seed}"
    command = [
        sys.executable, "-m", "ticketserve.cli", "train", "--method", method, "--task", task,
        "--data-dir", str(Path(args.data_root) / task), "--epochs", str(args.epochs), "--seed", str(seed),
        "--name", name, "--registry", args.registry, "--json",
    ]
    if args.train_samples:
        command += ["--train-samples", str(args.train_samples)]
    if args.backbone:
        command += ["--backbone", args.backbone]
    started = time.perf_counter()
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    summary = json.loads(completed.stdout)
    manifest = json.loads(subprocess.run(
        [sys.executable, "-m", "ticketserve.cli", "registry", "show", summary["artifact"], "--registry",
         args.registry, "--json"], check=True, capture_output=True, text=True).stdout)["manifest"]
    metric_name = manifest["task"]["metric"]
    return {
        "task": task, "method": method, "k": None, "seed": seed, "train_samples": manifest["details"]["train_examples"],
        "eval_examples": manifest["details"]["eval_examples"], "metric_name": metric_name,
        "metric": summary["metrics"][metric_name], "metrics": summary["metrics"],
        "trainable_params": summary["trainable_params"], "artifact_bytes": summary["payload_bytes"],
        "train_seconds": summary["train_seconds"], "wall_seconds": round(time.perf_counter() - started, 1),
        "epochs": args.epochs, "lr": manifest["hyperparameters"]["lr"], "backbone": manifest["backbone"]["name"],
        "backbone_fingerprint": manifest["backbone"]["fingerprint"], "artifact": summary["artifact"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--methods", default="full,bitfit")
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--data-root", default=str(HERE.parent.parent / "shared" / "data" / "glue"))
    parser.add_argument("--registry", default=str(HERE / ".registry"))
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            for seed in map(int, args.seeds.split(",")):
                record = run(task, method, seed, args)
                with RESULTS.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
