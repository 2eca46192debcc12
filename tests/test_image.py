"""The CPU container image run as the Kubernetes manifests run it: uid 10001, read-only root,
no capabilities, only /tmp and ~/.cache writable, the bearer tokens mounted read-only. From a
local registry (mounted read-only) and from an S3 registry (moto on 127.0.0.1): health turns
SERVING, a prediction (over gRPC and over HTTP) equals in-process prediction, a new version
published from outside is served without a restart, SIGTERM drains the requests in flight and
exits 0.

Slow, and needs podman and a built image: `make image-smoke` builds it and runs this file.
Without the image the tests skip, unless TICKETSERVE_IMAGE_REQUIRED=1 (the make target) makes
that a failure."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import TEXTS, ByName, free_port, publish_row_task
from ticketserve.core import artifact
from ticketserve.core.errors import Unavailable
from ticketserve.registry import open_store
from ticketserve.runtime.client import Client
from ticketserve.runtime.executor import Runtime

pytestmark = pytest.mark.slow

IMAGE = os.environ.get("TICKETSERVE_IMAGE", "localhost/ticketserve:cpu")
TOKEN = "smoke-token"
AS_A_CLUSTER_RUNS_IT = ["--user", "10001", "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL",
                        "--security-opt", "no-new-privileges", "--ulimit", "nofile=4096:4096",
                        "--ulimit", "nproc=4096:4096", "--tmpfs", "/tmp",
                        "--tmpfs", "/home/ticketserve/.cache:rw,mode=1777"]


@pytest.fixture(scope="module")
def podman() -> list[str]:
    exe = shutil.which("podman")
    found = exe is not None and subprocess.run([exe, "image", "exists", IMAGE]).returncode == 0
    if not found:
        message = f"no podman or no image {IMAGE} (make image-smoke builds it)"
        if os.environ.get("TICKETSERVE_IMAGE_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    # crun refuses hosts with hybrid cgroups (as these VMs have); runc runs wherever podman does
    return [exe, *(["--runtime", "runc"] if shutil.which("runc") else [])]


def readable_dir() -> Path:
    """A folder uid 10001 may read (pytest's tmp folders are private to their owner)."""
    path = Path(tempfile.mkdtemp(prefix="ticketserve-smoke-"))
    path.chmod(0o755)
    return path


@contextmanager
def container(podman: list[str], port: int, http_port: int, env: dict[str, str], volumes: dict[Path, str],
              preload: str):
    secrets = readable_dir()
    (secrets / "token").write_text(TOKEN + "\n")
    (secrets / "admin-token").write_text("smoke-admin\n")
    name = f"ticketserve-smoke-{uuid.uuid4().hex[:8]}"
    command = [*podman, "run", "--detach", "--name", name, "--network", "host", *AS_A_CLUSTER_RUNS_IT,
               "--volume", f"{secrets}:/etc/ticketserve:ro",
               *[a for host, inside in volumes.items() for a in ("--volume", f"{host}:{inside}")],
               *[a for key, value in env.items() for a in ("--env", f"{key}={value}")],
               IMAGE, "serve", "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port),
               "--metrics-port", str(free_port()),
               "--watch-seconds", "0.5", "--preload", preload, "--max-queue-delay-ms", "1500", "--drain-seconds", "40",
               "--token-file", "/etc/ticketserve/token", "--admin-token-file", "/etc/ticketserve/admin-token"]
    started = subprocess.run(command, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    try:
        yield name
    finally:
        logs = subprocess.run([*podman, "logs", name], capture_output=True, text=True)
        print(logs.stdout, logs.stderr)
        subprocess.run([*podman, "rm", "--force", name], capture_output=True)
        shutil.rmtree(secrets, ignore_errors=True)


def wait_serving(podman: list[str], name: str, port: int) -> float:
    """Seconds until the image's own health check (`ticketserve health`, run inside it) passes."""
    started = time.monotonic()
    while True:
        check = subprocess.run([*podman, "exec", name, "ticketserve", "health", "--server", f"127.0.0.1:{port}",
                                "--timeout", "2"], capture_output=True, text=True)
        if check.returncode == 0:
            assert "SERVING" in check.stdout
            return time.monotonic() - started
        state = subprocess.run([*podman, "inspect", "--format", "{{.State.Running}}", name],
                               capture_output=True, text=True).stdout.strip()
        assert state == "true", f"container exited: {check.stdout}{check.stderr}"
        assert time.monotonic() - started < 240, "not SERVING after 240 s"
        time.sleep(1)


def in_process(store, backbone, ref: str) -> list:
    runtime = ByName(Runtime(backbone, device="cpu"))
    runtime.add(artifact.load(store, ref, backbone), name="task")
    return runtime.predict(["task"] * len(TEXTS), TEXTS)


def assert_same(served, expected) -> None:
    assert [p.label for p in served] == [p.label for p in expected]
    for got, want in zip(served, expected):
        for label, prob in want.probabilities.items():
            assert got.probabilities[label] == pytest.approx(prob, abs=1e-5)


def serve_swap_and_drain(podman, minilm, store, env: dict[str, str], volumes: dict[Path, str]) -> None:
    publish_row_task(store, minilm, "smoke", 1)
    port, http_port = free_port(), free_port()
    with container(podman, port, http_port, env, volumes, preload="smoke") as name:
        startup = wait_serving(podman, name, port)
        print(f"SERVING after {startup:.1f} s")
        maps = subprocess.run([*podman, "exec", name, "cat", "/proc/1/maps"], capture_output=True, text=True).stdout
        assert "libjemalloc.so.2" in maps  # the server's malloc in the image (runtime/server/memory.py)
        with Client(f"127.0.0.1:{port}", token=TOKEN, timeout=60) as client:
            info = client.server_info()
            assert info.fingerprint == minilm.fingerprint
            first = client.predict("smoke", TEXTS)
            assert first.artifact == "smoke:1"
            assert_same(first.predictions, in_process(store, minilm, "smoke:1"))
            request = urllib.request.Request(  # HTTP too: the JSON API, with the same token
                f"http://127.0.0.1:{http_port}/v1/predict", data=json.dumps({"task": "smoke", "inputs": TEXTS}).encode(),
                headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            assert answer["artifact"] == "smoke:1"
            assert [p["label"] for p in answer["predictions"]] == [p.label for p in first.predictions]

            publish_row_task(store, minilm, "smoke", 2)  # hot swap: the server's watch finds it
            deadline = time.monotonic() + 60
            while (swapped := client.predict("smoke", TEXTS)).artifact != "smoke:2":
                assert time.monotonic() < deadline, "version 2 not served within 60 s"
                time.sleep(0.5)
            assert_same(swapped.predictions, in_process(store, minilm, "smoke:2"))

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                in_flight = [pool.submit(client.predict, "smoke", [text]) for text in TEXTS[:4]]
                time.sleep(0.5)  # queued, waiting out the 1.5 s batching delay
                subprocess.run([*podman, "kill", "--signal", "TERM", name], check=True, capture_output=True)
                results = [f.result(timeout=60) for f in in_flight]
            assert all(r.artifact == "smoke:2" for r in results)
            with pytest.raises(Unavailable), Client(f"127.0.0.1:{port}", token=TOKEN, timeout=5, retries=1) as late:
                late.server_info()  # after the drain, nothing listens
        exit_code = subprocess.run([*podman, "wait", name], capture_output=True, text=True, timeout=90).stdout.strip()
        assert exit_code == "0"
        logs = subprocess.run([*podman, "logs", name], capture_output=True, text=True)
        assert "drained: all requests served" in logs.stdout + logs.stderr


def test_image_serves_from_a_local_registry_mounted_read_only(podman, minilm):
    root = readable_dir()
    try:
        store = open_store(str(root / "registry"))
        serve_swap_and_drain(podman, minilm, store, env={}, volumes={root / "registry": "/registry:ro"})
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_image_serves_from_an_s3_registry(podman, minilm, s3_url, s3_endpoint):
    store = open_store(s3_url)
    env = {"TICKETSERVE_REGISTRY": s3_url, "TICKETSERVE_S3_ENDPOINT": s3_endpoint,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    serve_swap_and_drain(podman, minilm, store, env=env, volumes={})


IMAGE_CHECK = """
import torch
from ticketserve.core import kernels
from ticketserve.core.sparse_correction import MaskedPositions, subtract
from ticketserve.trainers.ticket_sources import SHIPPED
assert kernels.available() and kernels.best_level() >= 0 and torch.ops.ticketserve.kernels_parallel()
weight, x = torch.randn(64, 48), torch.randn(3, 20, 48)
keep = torch.rand(64, 48) >= 0.05
y = x @ weight.T
subtract(y, x, weight, [MaskedPositions.of(keep)], [0, 0, 0])
torch.testing.assert_close(y, x @ (weight * keep).T, atol=1e-5, rtol=1e-5)
assert any(SHIPPED.glob("*.tar"))
print("level", kernels.best_level())
"""


def test_image_carries_the_compiled_kernels_and_the_shipped_ticket(podman):
    """Built in the build stage, loaded in the final one (no compiler there), as uid 10001 on a
    read-only root: the supermask correction runs compiled, on torch's threads."""
    check = subprocess.run([*podman, "run", "--rm", "--network", "none", *AS_A_CLUSTER_RUNS_IT,
                            "--entrypoint", "python3", IMAGE, "-W", "error::RuntimeWarning", "-c", IMAGE_CHECK],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "level" in check.stdout
