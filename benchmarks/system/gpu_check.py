"""The GPU check: one prepared command for a GPU machine with no network and its own Python
(`make gpu-check OUT=DIR`; DEVELOPERS.md says how to run it there). It writes to OUT:

  environment.json   torch, CUDA, the device's name
  gpu-tests.xml/.txt the CUDA tests (tests/test_gpu.py: every kind on the device equals the
                     CPU in float32 and bfloat16 in mixed batches; the server on the device;
                     no host sync in a mixed batch's forward)
  serving.jsonl/.md  `python -m benchmarks.system.serving --parts precision` on a BERT-base-sized random
                     encoder, float32 and bfloat16, batches of 32 and 256: plain backbone,
                     1 task, 100 Dominant-1 / structure masks / LoRA mixed, 100 supermasks,
                     peft LoRA mixed

`--device cpu --quick` is the dry run (tests/test_gpu_check.py runs it): the same steps on a
tiny random encoder, so the check cannot fail on the GPU machine for a typo. Exit status: the
tests' (the serving rows are written either way)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny encoder, small batches, one round (dry run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = os.environ | {"TICKETSERVE_GPU_TEST_DEVICE": args.device, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    device = torch.device(args.device)
    (args.out / "environment.json").write_text(json.dumps({
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": sys.version.split()[0]}, indent=2) + "\n")

    with (args.out / "gpu-tests.txt").open("w") as log:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                f"--junitxml={args.out / 'gpu-tests.xml'}", "tests/test_gpu.py"],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"CUDA tests: exit {tests.returncode} ({time.monotonic() - started:.0f} s)", flush=True)

    backbone = tiny_checkpoint(args.out) if args.quick else None
    serving = [sys.executable, "-m", "benchmarks.system.serving", "--parts", "precision", "--device", args.device,
               "--dtypes", "float32,bfloat16", "--results", str(args.out / "serving.jsonl")]
    if args.quick:
        serving += ["--backbone", str(backbone), "--rounds", "1", "--bert-base-batches", "1"]
    else:
        serving += ["--backbone", str(bert_base_checkpoint()), "--bert-base-batches", "4"]
    for batch in (8, 16) if args.quick else (32, 256):
        with (args.out / "serving.log").open("a") as log:
            done = subprocess.run([*serving, "--batch", str(batch)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"serving rows, batch {batch}: exit {done.returncode} ({time.monotonic() - started:.0f} s)", flush=True)
    return tests.returncode


def tiny_checkpoint(out: Path) -> Path:
    from tests.conftest import (
        write_tiny_checkpoint,  # run from the repository root (python -m)
    )

    return write_tiny_checkpoint(out / "tiny-bert", "bert")


def bert_base_checkpoint() -> Path:
    from benchmarks.common import bert_base_like

    return bert_base_like()


if __name__ == "__main__":
    sys.exit(main())
