"""The `ticketserve` console script as users run it: real processes, JSON outputs, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(sys.executable).parent / "ticketserve")
SAMPLE = Path(__file__).resolve().parent.parent / "ticketserve" / "core" / "samples" / "sst2"  # 0/1 labels


def cli(*args: str, registry: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"TICKETSERVE_REGISTRY": str(registry)}
    result = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def as_json(result: subprocess.CompletedProcess):
    return json.loads(result.stdout)


def test_bitfit_on_minilm_through_the_cli(tmp_path):
    registry = tmp_path / "registry"
    trained = as_json(cli("train", "--method", "bitfit", "--task", "sst2", "--data-dir", "sample",
                          "--train-samples", "48", "--eval-samples", "64", "--batch-size", "16", "--epochs", "1",
                          "--lr", "5e-3", "--json", registry=registry))
    assert trained["artifact"] == "sst2-bitfit:1" and trained["kind"] == "row_delta"
    assert 0 < trained["payload_bytes"] < 200_000
    evaluated = as_json(cli("eval", "sst2-bitfit", "--data-dir", "sample", "--eval-samples", "64", "--json",
                            registry=registry))
    assert evaluated["metrics"] == trained["metrics"] and evaluated["examples"] == 64
    predicted = as_json(cli("predict", "sst2-bitfit", "an utter delight", "tedious", "--json", registry=registry))
    assert [p["label"] in ("negative", "positive") for p in predicted["predictions"]] == [True, True]


def test_registry_commands(tmp_path, tiny_checkpoints):
    registry = tmp_path / "registry"
    train = ["train", "--method", "bitfit", "--task", "sst2", "--backbone", str(tiny_checkpoints["bert"]),
             "--data-dir", "sample", "--train-samples", "16", "--eval-samples", "16", "--batch-size", "8",
             "--max-steps", "2", "--json"]
    cli(*train, registry=registry)
    cli(*train, "--seed", "7", "--tag", "candidate", registry=registry)
    listing = as_json(cli("registry", "list", "--json", registry=registry))
    assert [(r["version"], r["tags"]) for r in listing] == [(1, []), (2, ["candidate", "latest"])]
    shown = as_json(cli("registry", "show", "sst2-bitfit:1", "--json", registry=registry))
    assert shown["manifest"]["backbone"]["fingerprint"].startswith("sha256:")
    cli("registry", "tag", "sst2-bitfit:1", "prod", registry=registry)
    assert as_json(cli("registry", "show", "sst2-bitfit:prod", "--json", registry=registry))["artifact"] == "sst2-bitfit:1"
    assert all(r["ok"] for r in as_json(cli("registry", "verify", "--json", registry=registry))["artifacts"])

    bundle = tmp_path / "bundle.tar"
    cli("registry", "export", "sst2-bitfit:prod", "-o", str(bundle), registry=registry)
    imported = as_json(cli("registry", "import", str(bundle), "--json", registry=tmp_path / "other"))
    assert imported["artifact"] == "sst2-bitfit:1" and imported["digest"] == shown["digest"]
    predicted = as_json(cli("predict", "sst2-bitfit", "fine", "--json", registry=tmp_path / "other"))
    assert predicted["artifact"] == "sst2-bitfit:1"

    cli("registry", "rm", "sst2-bitfit:2", registry=registry)
    assert as_json(cli("registry", "gc", "--min-age", "0", "--json", registry=registry))["blobs_removed"] == 2
    assert as_json(cli("registry", "show", "sst2-bitfit", "--json", registry=registry))["artifact"] == "sst2-bitfit:1"


@pytest.mark.parametrize("args, message", [
    (["predict", "missing", "text"], "no artifact named 'missing'"),
    (["registry", "show", "Bad:Name"], "invalid artifact name"),
    (["train", "--method", "magic", "--task", "sst2", "--data-dir", "sample"], "unknown method 'magic'"),
    (["train", "--method", "bitfit", "--task", "rte"], "pass --data-dir"),
    (["train", "--method", "bitfit", "--task", "sst2", "--data-dir", "sample", "--batch-size", "0"], "batch_size"),
    (["train", "--method", "bitfit", "--task", "sst2", "--data-dir", "sample", "--k", "2"],
     "method bitfit takes no option --k"),
    (["train", "--method", "superticket", "--task", "sst2", "--levels", "0,120"], "levels must lie in [0, 100)"),
    (["train", "--method", "ticketshare", "--data-dir", "sample"], "tasks: Field required"),
    (["registry", "import", "/nonexistent.tar"], "no bundle file"),
    (["train", "--method", "bitfit", "--task", "moods", "--data-dir", str(SAMPLE), "--text-field", "sentence",
      "--labels", "neg,neu,pos"], "--labels names 3 classes (neg, neu, pos), but the labels in"),
    (["train", "--method", "bitfit", "--task", "moods", "--data-dir", str(SAMPLE), "--text-field", "sentence",
      "--labels", "regression", "--label-field", "sentence"], "--labels regression, but"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
    result = cli(*args, registry=tmp_path / "registry", check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_own_files_without_glue_field_names_say_which_flags_to_pass(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"body": "great", "stars": "good"}\n')
    result = cli("train", "--method", "bitfit", "--task", "moods", "--data-dir", str(tmp_path), registry=tmp_path / "r",
                 check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "has fields body, stars; name the text with --text-field (and --text-pair-field), or use GLUE's names" in result.stderr


def test_progress_off_a_terminal_names_its_phases_and_the_summary_the_whole_time(tmp_path, tiny_checkpoints):
    """Under make, nohup or CI (stderr not a terminal) training prints plain lines: a start, a
    line per evaluation and per tenth of the run with step, loss, metric, elapsed and ETA; a
    Dominant run without a ticket names its two phases; the summary gives the total time."""
    result = cli("train", "--method", "dominant", "--k", "1", "--task", "sst2", "--data-dir", "sample",
                 "--backbone", str(tiny_checkpoints["bert"]), "--train-samples", "48", "--eval-samples", "16",
                 "--batch-size", "8", "--epochs", "2", registry=tmp_path / "registry")
    lines = result.stderr.splitlines()
    search = [line for line in lines if line.startswith("ticket search sst2 1/2: ")]
    train = [line for line in lines if line.startswith("train sst2 2/2: ")]
    assert search and train and lines.index(search[-1]) < lines.index(train[0])
    assert any("step 6/12: loss" in line and "accuracy" in line and "ETA" in line for line in train), train
    assert train[-1].startswith("train sst2 2/2: done: 12 steps")
    assert "s in all" in result.stdout


def test_train_flags_come_from_the_options_of_every_method(tmp_path):
    """`train --help` shows each method's flags with the methods that take them and their defaults
    (from the Options models), and `methods --json` lists the same options."""
    from ticketserve.cli.options import flag
    from ticketserve.trainers import methods

    helped = subprocess.run([SCRIPT, "train", "--help"], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "COLUMNS"})  # a pipe, 80 columns
    assert helped.returncode == 0, helped.stderr
    assert "…" not in helped.stdout and "│" not in helped.stdout  # plain text in a pipe: nothing cut short
    text = " ".join(helped.stdout.split())
    for name, cls in methods().items():
        for field_name, field in cls.Options.model_fields.items():
            if (field.json_schema_extra or {}).get("cli", True):
                assert flag(field_name, field) in text, (name, field_name)
    assert "dominant (default 1)" in text and "--lambda" in text and "--mask-embeddings" in text
    assert "dominant if searching a ticket, ticket-search (default 0.99)" in text  # --sigma-quantile: its default, and when
    listed = {row["method"]: row["options"] for row in as_json(cli("methods", "--json", registry=tmp_path))}
    assert listed.keys() == methods().keys() and listed["dominant"]["--k"] == "default 1"
    assert {"superticket", "ticketshare", "gated-full"} <= listed.keys()


def test_corrupt_payload_fails_verify_and_predict(tmp_path, tiny_checkpoints):
    registry = tmp_path / "registry"
    cli("train", "--method", "bitfit", "--task", "sst2", "--backbone", str(tiny_checkpoints["roberta"]),
        "--data-dir", "sample", "--train-samples", "16", "--eval-samples", "16", "--max-steps", "1", registry=registry)
    shown = as_json(cli("registry", "show", "sst2-bitfit", "--json", registry=registry))
    sha = shown["manifest"]["files"]["payload.safetensors"]["sha256"]
    blob = registry / "blobs" / "sha256" / sha[:2] / sha
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    verify = cli("registry", "verify", registry=registry, check=False)
    assert verify.returncode == 1 and "checksum mismatch" in verify.stdout
    predict = cli("predict", "sst2-bitfit", "text", registry=registry, check=False)
    assert predict.returncode == 2 and "checksum mismatch" in predict.stderr


def test_two_process_gloo_training_publishes_one_artifact(tmp_path, tiny_checkpoints):
    registry = tmp_path / "registry"
    env = os.environ | {"TICKETSERVE_REGISTRY": str(registry), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "ticketserve.cli", "train", "--method", "bitfit", "--task", "sst2",
         "--backbone", str(tiny_checkpoints["bert"]), "--data-dir", "sample", "--train-samples", "64",
         "--eval-samples", "32", "--batch-size", "8", "--epochs", "1", "--json"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 4  # 64 examples / (8 per step × 2 processes)
    manifest = as_json(cli("registry", "show", "sst2-bitfit", "--json", registry=registry))["manifest"]
    assert manifest["hyperparameters"]["world_size"] == 2
    assert as_json(cli("registry", "list", "--json", registry=registry))[0]["version"] == 1  # only rank 0 published
