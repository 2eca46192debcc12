"""A new user's first own task, as docs/getting-started/first-task.md shows it: a directory of
JSONL files with GLUE's field names and word labels → `train` (no field flags) → `eval` → `serve` → predict over HTTP,
with HOME an empty read-only directory (an operator's service account) and the registry
elsewhere: nothing may need to write there, and the run must say what it resolved."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port

SCRIPT = str(Path(sys.executable).parent / "ticketserve")
KINDS = {"billing": ["I was charged twice for {}", "refund my {} payment", "my invoice for {} is wrong"],
         "bug": ["the {} page crashes", "{} shows an error", "cannot open {} since the update"],
         "praise": ["love the new {}", "{} works great, thanks", "the {} is so much faster now"]}
THINGS = ["export", "search", "dashboard", "mobile app", "March", "team plan", "settings", "upload"]


def write_task(directory: Path) -> None:
    rows = [{"sentence": t.format(x), "label": k} for k, ts in KINDS.items() for t in ts for x in THINGS]
    random.Random(0).shuffle(rows)
    directory.mkdir()
    for split, part in (("train", rows[:54]), ("validation", rows[54:])):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


@pytest.fixture
def user(tmp_path):
    """The user's environment: a read-only empty HOME, no cache directory of their own."""
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "HF_", "TICKETSERVE_"))}
    yield env | {"HOME": str(home), "HF_HUB_OFFLINE": "1"}
    home.chmod(0o755)


def run(env, *args, cwd):
    result = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_first_own_task_from_jsonl_files_to_http(tmp_path, user):
    write_task(tmp_path / "tickets")
    registry = str(tmp_path / "registry")
    trained = run(user, "train", "--method", "dominant", "--task", "tickets", "--data-dir", "tickets", "--max-steps", "2",
                  "--train-samples", "40", "--registry", registry, cwd=tmp_path)
    first = trained.stderr.splitlines()[:4]
    assert first[0] == ("task tickets: text field sentence, label field label; labels billing, bug, praise: the values "
                        "in the data; name them with --labels NAME,... or a labels.txt beside it")
    assert first[1].startswith("train tickets: lr 0.003 (dominant's default), 3 epochs, at most 2 steps, batch 32, seed 42")
    assert first[2] == "  data tickets: train 40 of 54 (random subset, seed 42), validation 18 of 18 (all)"
    assert first[3] == "  ticket minilm-glue-ticket:1, ticket source shipped"
    assert "ticket minilm-glue-ticket:1, ticket source shipped): accuracy" in trained.stdout

    summary = json.loads(run(user, "train", "--method", "dominant", "--task", "tickets", "--data-dir", "tickets",
                             "--max-steps", "1", "--name", "tickets-again", "--registry", registry, "--json",
                             cwd=tmp_path).stdout)
    assert summary["choices"]["ticket"] == "minilm-glue-ticket:1" and summary["choices"]["ticket_source"] == "shipped"
    assert summary["choices"]["lr_from"] == "dominant's default" and summary["choices"]["splits"]["train"] == {
        "examples": 54, "of": 54, "drawn": "all"}
    assert summary["task_fields"]["labels"] == ["billing", "bug", "praise"]

    scored = json.loads(run(user, "eval", "tickets-dominant", "--data-dir", "tickets", "--registry", registry, "--json",
                            cwd=tmp_path).stdout)
    assert scored["examples"] == 18 and 0 <= scored["metrics"]["accuracy"] <= 1
    texts = ["I was charged twice this month", "the upload page crashes"]
    local = json.loads(run(user, "predict", "tickets-dominant", *texts, "--registry", registry, "--json", cwd=tmp_path).stdout)
    assert {p["label"] for p in local["predictions"]} <= set(KINDS)

    port, http_port = free_port(), free_port()
    server = subprocess.Popen([SCRIPT, "serve", "--registry", registry, "--port", str(port), "--http-port", str(http_port)],
                              env=user, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        run(user, "info", "--server", f"127.0.0.1:{port}", "--wait", "120", cwd=tmp_path)
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/predict",
                                         data=json.dumps({"task": "tickets-dominant", "inputs": texts}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())
    finally:
        server.terminate()
        _, log = server.communicate(timeout=60)
    assert server.returncode == 0, log[-2000:]
    for expected, got in zip(local["predictions"], served["predictions"]):
        assert got["label"] == expected["label"] and got["score"] == pytest.approx(expected["score"], abs=1e-5)


def test_local_data_leaves_no_copy_outside_the_registry(tmp_path):
    """With a writable HOME, the run adds nothing of the data there (the `datasets` cache once
    kept Arrow copies of every file under ~/.cache/huggingface/datasets)."""
    write_task(tmp_path / "tickets")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "HF_", "TICKETSERVE_"))}
    run(env | {"HOME": str(home), "HF_HUB_OFFLINE": "1"}, "train", "--method", "bitfit", "--task", "tickets",
        "--data-dir", "tickets", "--max-steps", "1", "--registry", str(tmp_path / "registry"), cwd=tmp_path)
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    assert written in ([], [".cache/ticketserve/fingerprints.json"]), written  # the backbone's digest, not data
