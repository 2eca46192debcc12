"""Shared fixtures: tiny random BERT/RoBERTa checkpoints on disk, the bundled MiniLM, a registry."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from ticketserve.core.backbone import load_backbone, tokenizer_source
from ticketserve.registry import open_store

REPO = Path(__file__).resolve().parent.parent

# Property tests drive a real server: no per-example deadline, module-scoped fixtures allowed.
# The default profile keeps the default run about a minute; `--hypothesis-profile fuzz-long` is 40× longer.
_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=False)
settings.register_profile("default", max_examples=150, **_FUZZ)
settings.register_profile("fuzz-long", max_examples=6000, **_FUZZ)
settings.load_profile("default")


def write_tiny_checkpoint(path: Path, arch: str, seed: int = 0) -> Path:
    """A 2-layer random encoder with non-zero biases and the MiniLM tokenizer."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, RobertaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source())
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = (BertConfig(max_position_embeddings=128, **common) if arch == "bert"
              else RobertaConfig(max_position_embeddings=130, pad_token_id=0, **common))
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, add_pooling_layer=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_checkpoint(root / arch, arch) for arch in ("bert", "roberta")}


@pytest.fixture(params=["bert", "roberta"])
def tiny_backbone(request, tiny_checkpoints):
    """A freshly loaded tiny backbone per test (tests may attach tasks to it)."""
    return load_backbone(str(tiny_checkpoints[request.param]))


@pytest.fixture(scope="session")
def minilm():
    """The bundled MiniLM, loaded once; tests must not attach anything to it."""
    return load_backbone()


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "registry"))


@pytest.fixture(scope="module")
def tiny_bert(tiny_checkpoints) -> str:
    return str(tiny_checkpoints["bert"])


@pytest.fixture
def registry(tmp_path, tiny_bert):
    """A registry for serving tests: alpha, beta, gamma (row deltas), masked (supermask), pairs (MRPC)."""
    from tests.helpers import ROW_TASKS, publish_mask_task, publish_row_task

    store = open_store(str(tmp_path / "registry"))
    backbone = load_backbone(tiny_bert)
    for seed, name in enumerate(ROW_TASKS):
        publish_row_task(store, backbone, name, seed)
    publish_mask_task(store, backbone, "masked", 7)
    publish_row_task(store, backbone, "pairs", 9, task="mrpc")
    return store


# An S3 API server (moto's server mode) on 127.0.0.1, one per test module, and a fresh bucket per test.
@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_url(s3_endpoint, monkeypatch, tmp_path):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "TICKETSERVE_S3_ENDPOINT": s3_endpoint, "TICKETSERVE_S3_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    bucket = f"ts-{uuid.uuid4().hex[:12]}"
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/registry"
