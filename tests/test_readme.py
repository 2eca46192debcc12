"""The README's commands that a new user runs after `make demo` work as written: its set-up
lines (activate the venv, point TICKETSERVE_REGISTRY at the demo's registry) and then its
in-process examples, verbatim, in bash, on a registry the demo would have made."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SETUP = ["source .venv/bin/activate", "export TICKETSERVE_REGISTRY=$PWD/.demo/registry"]
AFTER_DEMO = ("ticketserve eval sst2-bitfit", "ticketserve predict sst2-bitfit")  # what needs only the demo's artifact


def _bash_lines() -> list[str]:
    return [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S)
            for line in block.splitlines()]


def test_readme_examples_run_verbatim_after_the_demo(tmp_path):
    lines = _bash_lines()
    setup = [line for line in lines if line in SETUP]
    examples = [line for line in lines if line.startswith(AFTER_DEMO)]
    assert setup == SETUP, "the README must tell users how to reach `ticketserve` and the demo's registry"
    assert [e.split(" ")[1:3] for e in examples] == [a.split(" ")[1:3] for a in AFTER_DEMO], examples

    checkout = tmp_path / "checkout"  # what a checkout holds after `make demo`: .venv and .demo/registry
    checkout.mkdir()
    (checkout / ".venv").symlink_to(Path(sys.executable).parent.parent)
    venv_bin = Path(sys.executable).parent
    subprocess.run([str(venv_bin / "ticketserve"), "train", "--method", "bitfit", "--task", "sst2", "--data-dir", "sample",
                    "--train-samples", "32", "--eval-samples", "32", "--max-steps", "2", "--json",
                    "--registry", str(checkout / ".demo" / "registry")], check=True, capture_output=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k not in ("TICKETSERVE_REGISTRY", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # no ticketserve on it until the README's activation
    for example in examples:
        script = " && ".join([*SETUP, example])
        result = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (example, result.stderr[-2000:])
        assert "sst2-bitfit:1" in result.stdout
