"""The GPU check's dry run: `make gpu-check`'s script, on the CPU with a tiny encoder, writes
every file it writes on a GPU machine — so a typo cannot waste a GPU lease."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_check_dry_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu-check"
    done = subprocess.run(["bash", "benchmarks/system/gpu_check.sh", str(out), "cpu", sys.executable, "--quick"], cwd=REPO,
                          env=os.environ | {"XDG_CACHE_HOME": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr + (out / "gpu-tests.txt").read_text()
    assert json.loads((out / "environment.json").read_text())["device"] == "cpu"
    assert "passed" in (out / "gpu-tests.txt").read_text()
    assert 'failures="0"' in (out / "gpu-tests.xml").read_text() and 'errors="0"' in (out / "gpu-tests.xml").read_text()
    records = [json.loads(line) for line in (out / "serving.jsonl").read_text().splitlines()]
    assert {r["batch"] for r in records} == {8, 16} and {r["dtype"] for r in records} == {"float32", "bfloat16"}
    workloads = {r["workload"] for r in records}
    for workload in ("plain backbone", "ours: 1 task (Dominant-1)", "ours: 100 Dominant-1 mixed",
                     "ours: 100 structure masks mixed", "ours: 100 LoRA r=8 mixed", "ours: 100 supermasks mixed (5% masked)",
                     "peft LoRA r=8 x100, adapter_names mixed"):
        assert f"{workload}, bfloat16" in workloads, workload
    assert "batches of 16" in (out / "serving.md").read_text()
