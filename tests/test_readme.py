"""The README and the docs run verbatim. Every line of their bash blocks either runs here, as
written, in a checkout that has been through `make demo` (the venv and `.demo/registry`), or is
listed in NOT_RUN with the reason; a new or changed line fails this test until it is one or the
other. The README runs first, then the docs pages in the order of the site's table of contents.
Training lines run with QUICK appended (a couple of steps on a few examples): the command, its
flags and the artifact it names are the page's; only the run is shorter."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = " --train-samples 32 --eval-samples 32 --max-steps 2"
NOT_RUN = {  # line prefix → why this test cannot run it here
    "make demo": "the set-up itself: this test starts from its result",
    "make test": "the set-up itself: it runs this test",
    "ticketserve train --method bitfit --task sst2 --train-samples": "GLUE from the hub: no network here",
    "ticketserve train --method full   --task mrpc": "GLUE from the hub: no network here",
    "make image-cuda": "a container build (tests/test_image.py runs the CPU image)",
    "ticketserve registry import ADAPTER_DIR": "needs your PEFT adapter (tests/test_peft_import.py imports stock ones)",
    "ticketserve registry import CLASSIFIER_DIR": "needs your fine-tuned classifier (tests/test_hf_import.py imports "
                                                  "stock ones, from a directory and through the hub cache)",
    "kubectl ": "needs a cluster (tests/test_deploy.py renders and validates the manifests)",
    "TICKETSERVE_REGISTRY=s3://BUCKET": "needs your bucket (tests/test_s3_store.py runs the S3 store on moto)",
}


def pages() -> list[Path]:
    """The README, then every page of the docs in the order of the site's table of contents."""
    index = (ROOT / "docs" / "index.md").read_text()
    names = [line.strip() for block in re.findall(r"```\{toctree\}\n(.*?)```", index, re.S)
             for line in block.splitlines() if line.strip() and not line.startswith(":")]
    return [ROOT / "README.md", *(ROOT / "docs" / f"{name}.md" for name in names)]


def lines_of(text: str) -> list[str]:
    """Each command of the bash blocks (continuation lines, ending in a backslash, joined) and
    each python block whole, run by `python` from a heredoc, in the page's order."""
    commands = []
    for language, block in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        if language == "python":
            commands.append(f"python - <<'PY'\n{block}PY")
        else:
            commands += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def all_lines() -> list[str]:
    return [line for page in pages() if page.exists() for line in lines_of(page.read_text())]


def runnable(line: str) -> bool:
    return not any(line.strip().startswith(prefix) for prefix in NOT_RUN)


def test_every_line_is_run_or_says_why_not():
    readme = lines_of((ROOT / "README.md").read_text())
    assert "source .venv/bin/activate" in " ".join(readme) and "export TICKETSERVE_REGISTRY=" in " ".join(readme)
    lines = all_lines()
    for prefix in NOT_RUN:  # no stale exemptions
        assert any(line.strip().startswith(prefix) for line in lines), prefix


def test_readme_and_docs_run_verbatim_after_the_demo(tmp_path):
    checkout = tmp_path / "checkout"  # what a checkout holds after `make demo`: .venv and .demo/registry
    checkout.mkdir()
    (checkout / ".venv").symlink_to(Path(sys.executable).parent.parent)
    subprocess.run([str(Path(sys.executable).parent / "ticketserve"), "train", "--method", "bitfit", "--task", "sst2",
                    "--data-dir", "sample", "--registry", str(checkout / ".demo" / "registry"), *QUICK.split()],
                   check=True, capture_output=True, timeout=600)
    script = ["set -euo pipefail"]
    for line in filter(runnable, all_lines()):
        command = line if line.startswith("python - <<") else line.split("  #")[0].rstrip()
        script.append(f"{command}{QUICK}" if command.startswith("ticketserve train ") else command)
    env = {k: v for k, v in os.environ.items() if k not in ("TICKETSERVE_REGISTRY", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # no ticketserve on it until the README's activation
    # its own process group: whatever it leaves running (a server, when a line fails) is killed
    run = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=checkout, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = run.communicate(timeout=1200)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    for expected in ("sst2-tour:1", "sst2-dominant:1", "sst2-bitfit:stable", '"artifact":"sst2-dominant:1"',
                     '"model_name":"sst2-bitfit"', "[b'"):  # …, the JSON API, v2 REST, tritonclient
        assert expected in result.stdout, expected
    assert (checkout / "fig.png").stat().st_size and (checkout / "s.png").stat().st_size
    assert (checkout / "adapter" / "adapter_config.json").exists()
