"""Small builders shared by tests (manifests, row-delta payloads, published tasks)."""

from __future__ import annotations

import socket

import torch

from ticketserve.core import artifact, synthetic
from ticketserve.core.artifact import Artifact
from ticketserve.core.backbone import Backbone
from ticketserve.core.kinds.supermask import encode_masks
from ticketserve.core.synthetic import row_delta as random_row_delta
from ticketserve.core.tasks import get_task
from ticketserve.registry import HeadConfig, Manifest
from ticketserve.registry.store import ArtifactVersion


def manifest_for(backbone: Backbone, name: str = "t", kind: str = "row_delta", task: str = "sst2") -> Manifest:
    return Manifest(name=name, kind=kind, method="test", task=get_task(task), head=HeadConfig(), backbone=backbone.ref())


def random_head(backbone: Backbone, outputs: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    hidden = backbone.config.hidden_size
    return {"head.weight": torch.randn(outputs, hidden, generator=generator), "head.bias": torch.randn(outputs, generator=generator)}


def in_memory_artifact(backbone: Backbone, name: str, tensors: dict, seed: int = 0, kind: str = "row_delta") -> Artifact:
    return Artifact(ArtifactVersion(name, 1, "sha256:" + "0" * 64), manifest_for(backbone, name, kind),
                    tensors | random_head(backbone, seed=seed))


TEXTS = ["a moving, funny film", "tedious and long", "I loved every minute", "not worth it", "fine", "meh, at best"]
ROW_TASKS = ["alpha", "beta", "gamma"]


def publish_row_task(store, backbone: Backbone, name: str, seed: int, task: str = "sst2"):
    tensors = random_row_delta(backbone, k=2, seed=seed, scale=0.5) | random_head(backbone, seed=seed)
    return artifact.publish(store, manifest_for(backbone, name, task=task), tensors)


def publish_mask_task(store, backbone: Backbone, name: str, seed: int):
    return artifact.publish(store, manifest_for(backbone, name, kind="supermask"),
                            encode_masks(synthetic.masks(backbone, 0.3, seed)) | random_head(backbone, seed=seed))


class ByName:
    """Test convenience over a `Runtime` (which keeps no map of tasks): its tasks by the names
    the test gives them (tasks themselves are taken too); adding a name again replaces (and
    removes) the task it named."""

    def __init__(self, runtime):
        self.runtime, self.tasks = runtime, {}

    def __getattr__(self, attribute):
        return getattr(self.runtime, attribute)

    def add(self, artifact, name=None):
        task = self.runtime.add(artifact, name)
        old, self.tasks[task.name] = self.tasks.get(task.name), task
        if old is not None:
            self.runtime.remove(old)
        return task

    def remove(self, name):
        self.runtime.remove(self.tasks.pop(name))

    def get(self, name):
        return self.tasks[name]

    def _tasks(self, names):
        return [self.tasks[n] if isinstance(n, str) else n for n in names]

    def logits(self, names, inputs):
        return self.runtime.logits(self._tasks(names), inputs)

    def predict(self, names, texts, pairs=None):
        return self.runtime.predict(self._tasks(names), texts, pairs)



def assert_serves_like_stock(manifest, tensors: dict, backbone: Backbone, expected: torch.Tensor, registry_dir) -> None:
    """An imported artifact, published, gives a stock model's logits on TEXTS (1e-5) alone and
    mixed in one batch with a row-delta task of ours; a token classifier's on each text's real
    tokens (the kernels leave padding positions without task terms: nothing reads them).
    1e-5 absolute plus 1e-5 relative: float32's error grows with the logits, and two float32
    orders of summation differ by it — with the large random LoRA factors of the token tests the
    stock float32 model is itself 1.1e-5 from its own float64 result, ours 1.0e-5 (measured)."""
    from ticketserve.registry import open_store
    from ticketserve.runtime.executor import Runtime

    store = open_store(str(registry_dir))
    artifact.publish(store, manifest, tensors)
    publish_row_task(store, backbone, "ours", 3)
    runtime = ByName(Runtime(backbone, device="cpu"))
    runtime.add(artifact.load(store, manifest.name, backbone), name="imported")
    runtime.add(artifact.load(store, "ours", backbone), name="ours")
    inputs = runtime.tokenize(TEXTS)
    lengths = inputs["attention_mask"].sum(1).tolist() if expected.dim() == 3 else [None] * len(TEXTS)
    alone = runtime.logits(["imported"] * len(TEXTS), inputs)
    mixed = runtime.logits((["imported", "ours"] * len(TEXTS))[:len(TEXTS)], inputs)
    for i, length in enumerate(lengths):
        torch.testing.assert_close(alone[i][:length], expected[i][:length], atol=1e-5, rtol=1e-5)
        if i % 2 == 0:
            torch.testing.assert_close(mixed[i][:length], expected[i][:length], atol=1e-5, rtol=1e-5)


def serve_and_predict(checkpoint: str, registry_dir, **config):
    """Publish a row-delta task `rows` on the checkpoint, serve the registry on 127.0.0.1 with
    ServeConfig(**config), ask it for TEXTS; returns (store, predictions, server info)."""
    from ticketserve.core.backbone import load_backbone
    from ticketserve.registry import open_store
    from ticketserve.runtime.client import Client
    from ticketserve.runtime.server.main import BackgroundServer, ServeConfig

    store = open_store(str(registry_dir))
    publish_row_task(store, load_backbone(checkpoint), "rows", 3)
    with BackgroundServer(ServeConfig(port=0, registry=store.url, backbone=checkpoint, **config)) as server:
        with Client(f"127.0.0.1:{server.port}") as client:
            return store, client.predict("rows", TEXTS).predictions, client.server_info()


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a server started as its own process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
