"""Quality benchmark: train methods on tasks and append one record per run to
benchmarks/results/quality.jsonl (task, method, k, seed, train_samples, metric, trainable
params, artifact bytes, train seconds, backbone). Each run is a separate `ticketserve train`
process, exactly what a user runs.

    python -m benchmarks.studies.quality --tasks sst2 --methods full,bitfit --train-samples 8000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import common

HERE = Path(__file__).parent
RESULTS = common.RESULTS
QUALITY = RESULTS / "quality.jsonl"
DATA_ROOT = common.GLUE
REGISTRY = common.STUDY_REGISTRY
# each method's default rate when the first studies ran, before the studies' own choices became
# the defaults (#22): their records hold these rates, and their reports keep reading them as the
# first point of each grid
FIRST_DEFAULT_LR = {"full": 5e-5, "bitfit": 1e-3, "dominant": 1e-3, "random": 1e-3, "ticket-search": 5e-5, "lora": 5e-4}


def cli(*args: str) -> dict:
    """Run `ticketserve ARGS --json` and return its JSON output."""
    completed = subprocess.run([sys.executable, "-m", "ticketserve.cli", *args, "--json"],
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"ticketserve {' '.join(args)} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout)


def train_record(task: str, method: str, seed: int, *, name: str, train_samples: int | None = None,
                 epochs: int = 3, lr: float | None = None, options: dict | None = None,
                 backbone: str | None = None, data_root: Path = DATA_ROOT, registry: Path = REGISTRY) -> dict:
    """Train one artifact and describe it as a quality.jsonl record."""
    args = ["train", "--method", method, "--task", task, "--data-dir", str(Path(data_root) / task),
            "--epochs", str(epochs), "--seed", str(seed), "--name", name, "--registry", str(registry)]
    args += ["--train-samples", str(train_samples)] if train_samples else []
    args += ["--lr", str(lr)] if lr else []
    args += ["--backbone", backbone] if backbone else []
    for key, value in (options or {}).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    started = time.perf_counter()
    summary = cli(*args)
    manifest = cli("registry", "show", summary["artifact"], "--registry", str(registry))["manifest"]
    metric_name = manifest["task"]["metric"]
    details = manifest["details"]
    return {
        "task": task, "method": method, "k": (options or {}).get("k"), "seed": seed,
        "train_samples": details["train_examples"], "eval_examples": details["eval_examples"],
        "metric_name": metric_name, "metric": summary["metrics"][metric_name], "metrics": summary["metrics"],
        "trainable_params": summary["trainable_params"], "artifact_bytes": summary["payload_bytes"],
        "train_seconds": summary["train_seconds"], "wall_seconds": round(time.perf_counter() - started, 1),
        "seconds_per_step": details.get("seconds_per_step"), "torch_threads": details.get("torch_threads"),
        "optimizer_state_bytes": details.get("optimizer_state_bytes"),
        "epochs": epochs, "lr": manifest["hyperparameters"]["lr"], "ticket": details.get("ticket"),
        "backbone": manifest["backbone"]["name"], "backbone_fingerprint": manifest["backbone"]["fingerprint"],
        "artifact": summary["artifact"],
    }


def read_jsonl(path: Path) -> list[dict]:
    """The records of a results file (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def matching(path: Path, **match) -> list[dict]:
    """The records of a results file whose fields have these values (what a resumable study has done)."""
    return [r for r in read_jsonl(path) if all(r.get(k) == v for k, v in match.items())]


def mean_sd(values: list[float]) -> str:
    """mean ± sd (runs), as the studies' tables give a result over seeds."""
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread} ({len(values)})"


_APPEND = threading.Lock()


def run_stage(jobs: int, runs) -> list:
    """Run a study stage's independent runs (callables), `jobs` at a time; their results in
    order. The threads only wait on `ticketserve` processes; each of those gets cores / jobs
    torch threads (set once by `set_jobs`)."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda run: run(), list(runs)))


def set_jobs(jobs: int) -> None:
    """Thread budget for the `ticketserve` processes a study starts (they inherit it); on 2
    cores two 1-thread processes train ~15 % more runs per hour than one 2-thread process."""
    if jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))


def append(path: Path, record: dict) -> None:
    """One line per record; a lock, because studies may train several runs at a time."""
    with _APPEND:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--methods", default="full,bitfit")
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--registry", type=Path, default=REGISTRY)
    args = parser.parse_args()
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            for seed in map(int, args.seeds.split(",")):
                append(QUALITY, train_record(task, method, seed, name=f"bench-{task}-{method}-s{seed}",
                                             train_samples=args.train_samples, epochs=args.epochs,
                                             backbone=args.backbone, data_root=args.data_root, registry=args.registry))


if __name__ == "__main__":
    main()
