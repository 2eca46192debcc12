"""Before/after a refactor over gRPC: the same registry of 100 Dominant-1 tasks served by each
checkout's server in turn (order alternating per round), driven by the same client load
(serving.py's `drive`, 16 clients); one JSON line per measurement:

    python benchmarks/ab/grpc_trees.py ROUNDS SECONDS OLD_TREE NEW_TREE
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import serving  # noqa: E402  (benchmarks/serving.py)

from ticketserve.core.backbone import load_backbone
from ticketserve.registry import open_store

rounds, seconds, trees = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:5]
texts = [json.loads(l)["sentence"] for l in serving.SST2_DEV.read_text().splitlines()]
backbone = load_backbone()
registry = tempfile.mkdtemp(prefix="ts-ab-grpc-")
names = [f"grpc-d1-{i:03d}" for i in range(serving.TASKS)]
serving.publish(open_store(registry), backbone, "row_delta", names)
for r in range(rounds):
    for tree in (trees if r % 2 == 0 else trees[::-1]):
        env = os.environ | {"PYTHONPATH": tree}
        server = subprocess.Popen([sys.executable, "-m", "ticketserve.cli", "serve", "--registry", registry, "--port", "50191",
                                   *sum((["--preload", n] for n in names), [])], stderr=subprocess.DEVNULL, env=env, cwd="/tmp")
        try:
            subprocess.run([sys.executable, "-m", "ticketserve.cli", "info", "--server", "127.0.0.1:50191", "--wait", "300"],
                           check=True, capture_output=True)
            for clients in (16,):
                result = serving.drive("127.0.0.1:50191", names, texts, clients, seconds)
                print(json.dumps({"tree": tree, "round": r, "clients": clients, **result}), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
