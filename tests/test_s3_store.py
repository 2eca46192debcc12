"""The S3 store against a real S3 API server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import collections
import time

import pytest

from tests.test_registry import assert_concurrent_publishers_lose_nothing, manifest
from ticketserve.core.errors import CorruptArtifact, NotFound
from ticketserve.registry import open_store

pytest.importorskip("moto")


def test_publish_resolve_tags_remove_and_gc(s3_url):
    store = open_store(s3_url)
    v1 = store.publish(manifest(), {"payload.safetensors": b"one" * 100})
    v2 = store.publish(manifest(metrics={"accuracy": 0.5}), {"payload.safetensors": b"two" * 100}, tags=("prod",))
    assert (v1.version, v2.version) == (1, 2)
    assert store.resolve("demo") == v2 == store.resolve("demo:prod") and store.resolve("demo:1") == v1
    assert store.read_file(v1, store.manifest(v1), "payload.safetensors") == b"one" * 100
    store.set_tag("demo", "prod", 1)
    assert store.resolve("demo:prod") == v1
    store.remove(v2)
    assert store.resolve("demo") == v1 and store.names() == ["demo"]
    assert store.gc(min_age_seconds=0)["blobs_removed"] == 2
    store.verify("demo:1")
    with pytest.raises(NotFound):
        store.resolve("demo:2")


def test_a_tag_that_cannot_be_written_takes_its_version_back(s3_url, monkeypatch):
    from ticketserve.core.errors import StorageError
    from ticketserve.registry.s3 import S3Store

    store = open_store(s3_url)
    v1 = store.publish(manifest(), {"p": b"one"}, tags=("prod",))
    original = S3Store._put

    def full_on_tags(self, data, *parts, exclusive=False):
        if "tags" in parts:
            raise StorageError("cannot write the tag: quota exceeded")
        return original(self, data, *parts, exclusive=exclusive)

    with monkeypatch.context() as patched, pytest.raises(StorageError):
        patched.setattr(S3Store, "_put", full_on_tags)
        store.publish(manifest(metrics={"f1": 1.0}), {"p": b"two"}, tags=("prod",))
    fresh = open_store(s3_url)
    assert fresh.versions("demo") == {1: v1.digest} and fresh.resolve("demo:prod") == v1 == fresh.resolve("demo")


def test_concurrent_publishers_from_several_processes_lose_nothing(s3_url):
    assert_concurrent_publishers_lose_nothing(s3_url, workers=4, each=4)


def test_a_listing_is_one_list_and_batched_gets_and_reads_what_name_by_name_reads(s3_url):
    """`registry list` and `tasks --all` on S3: a few dozen round trips at 10,000 names instead of
    four per name, with the answer of reading name by name, broken entries included."""
    from ticketserve.registry.store import Store

    store = open_store(s3_url)
    for i in range(6):
        store.publish(manifest(f"n{i}"), {"p": b"x%d" % i}, tags=("prod",) if i % 2 else ())
    store.publish(manifest("n1"), {"p": b"again"})
    refs = f"{store.bucket}/{store.prefix}/refs"
    store.fs.pipe(f"{refs}/n3/tags/prod", b"not a version")
    store.fs.pipe(f"{refs}/n4/versions/1", f"sha256:{'0' * 64}".encode())  # its manifest is missing
    fresh = open_store(s3_url)
    calls = collections.Counter()
    for method in ("ls", "find", "cat", "cat_file", "info", "exists"):
        def counted(*args, _method=getattr(fresh.fs, method), _name=method, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)
        setattr(fresh.fs, method, counted)
    listed = fresh.listing()
    manifests = fresh.manifests([r.newest() for r in listed if not r.error])
    assert dict(calls) == {"find": 1, "cat": 2}  # the refs' LIST, their GETs, the manifests' GETs
    assert listed == Store.listing(open_store(s3_url))
    assert [r.name for r in listed] == [f"n{i}" for i in range(6)] and [r.name for r in listed if r.error] == ["n3"]
    assert listed[1].tags == {"prod": 1, "latest": 2} and listed[1].newest().version == 2
    assert [type(m).__name__ for m in manifests] == ["Manifest"] * 3 + ["NotFound", "Manifest"]


def test_corrupt_blob_is_refused_and_never_cached(s3_url):
    store = open_store(s3_url)
    version = store.publish(manifest(), {"payload.safetensors": b"weights" * 100})
    sha = store.manifest(version).files["payload.safetensors"].sha256
    store.fs.pipe(f"{store.bucket}/{store.prefix}/blobs/sha256/{sha[:2]}/{sha}", b"weightz" * 100)
    with pytest.raises(CorruptArtifact, match="checksum mismatch"):
        store.verify(version)
    assert not (store.cache / sha).exists()


def test_read_through_cache_serves_pulled_blobs(s3_url):
    store = open_store(s3_url)
    version = store.publish(manifest(), {"payload.safetensors": b"cached" * 100})
    manifest_ = store.manifest(version)
    assert store.read_file(version, manifest_, "payload.safetensors") == b"cached" * 100
    sha = manifest_.files["payload.safetensors"].sha256
    store.fs.rm(f"{store.bucket}/{store.prefix}/blobs/sha256/{sha[:2]}/{sha}")  # gone from the bucket...
    assert open_store(s3_url).read_file(version, manifest_, "payload.safetensors") == b"cached" * 100  # ...not from the cache


def test_bundles_move_between_local_and_s3(s3_url, tmp_path):
    local = open_store(str(tmp_path / "local"))
    version = local.publish(manifest(), {"payload.safetensors": b"moved" * 10})
    local.export_bundle(version, tmp_path / "bundle.tar")
    imported = open_store(s3_url).import_bundle(tmp_path / "bundle.tar")
    assert imported.digest == version.digest


def test_replicas_sharing_an_s3_registry_converge_without_restarts(s3_url, tiny_checkpoints):
    from tests.helpers import TEXTS, publish_row_task
    from ticketserve.core.backbone import load_backbone
    from ticketserve.runtime.client import Client
    from ticketserve.runtime.server.main import BackgroundServer, ServeConfig

    store = open_store(s3_url)
    path = str(tiny_checkpoints["bert"])
    backbone = load_backbone(path)
    publish_row_task(store, backbone, "shared", 1)
    config = ServeConfig(port=0, registry=s3_url, backbone=path, watch_seconds=0.3)
    with BackgroundServer(config) as one, BackgroundServer(config) as two:
        clients = [Client(f"127.0.0.1:{server.port}") for server in (one, two)]
        assert [c.predict("shared", TEXTS[:1]).artifact for c in clients] == ["shared:1", "shared:1"]
        publish_row_task(store, backbone, "shared", 2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if [c.predict("shared", TEXTS[:1]).artifact for c in clients] == ["shared:2", "shared:2"]:
                break
            time.sleep(0.2)
        answers = [c.predict("shared", TEXTS[:1]) for c in clients]
        for client in clients:
            client.close()
    assert [a.artifact for a in answers] == ["shared:2", "shared:2"]
    assert answers[0].predictions == answers[1].predictions
