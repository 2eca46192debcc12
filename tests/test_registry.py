"""Local registry: naming, tags, integrity, concurrency, crashes and failed writes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from registry import BackboneRef, HeadConfig, Manifest, Reference, open_store
from registry.store import DEFAULT_TAG
from ticketserve.errors import CorruptArtifact, InvalidArgument, NotFound, StorageError
from ticketserve.tasks import get_task

BACKBONE = BackboneRef(name="b", fingerprint="sha256:" + "1" * 64, model_type="bert", num_layers=1, hidden_size=4)


def manifest(name: str = "demo", **extra) -> Manifest:
    return Manifest(name=name, kind="row_delta", method="test", task=get_task("sst2"), head=HeadConfig(),
                    backbone=BACKBONE, **extra)


def test_publish_resolve_and_tags(store):
    v1 = store.publish(manifest(), {"payload.safetensors": b"one"})
    v2 = store.publish(manifest(metrics={"accuracy": 0.5}), {"payload.safetensors": b"two"}, tags=("prod",))
    assert (v1.version, v2.version) == (1, 2)
    assert store.resolve("demo") == v2 == store.resolve("demo:latest") == store.resolve("demo:prod")
    assert store.resolve("demo:1") == v1
    assert store.resolve(f"demo@{v1.digest}") == v1
    store.set_tag("demo", "prod", 1)
    assert store.resolve("demo:prod") == v1
    assert store.manifest(v2).metrics == {"accuracy": 0.5}
    assert store.read_file(v1, store.manifest(v1), "payload.safetensors") == b"one"
    assert store.manifest(v2).payload_bytes == 3 and store.manifest(v2).files["payload.safetensors"].bytes == 3


def test_unknown_names_versions_and_tags_are_not_found(store):
    store.publish(manifest(), {"p": b"x"})
    for ref in ("other", "demo:7", "demo:canary", f"demo@sha256:{'a' * 64}"):
        with pytest.raises(NotFound):
            store.resolve(ref)
    with pytest.raises(NotFound):
        store.set_tag("demo", "prod", 9)


@pytest.mark.parametrize("text", ["Demo", "a/b", "x:1:2", "../etc", "demo:Latest", ""])
def test_malformed_references_are_invalid(text):
    with pytest.raises(InvalidArgument):
        Reference.parse(text)


def test_remove_moves_latest_back_and_gc_drops_only_unreferenced_blobs(store):
    v1 = store.publish(manifest(), {"p": b"shared"})
    v2 = store.publish(manifest(metrics={"f1": 1.0}), {"p": b"only-in-v2"}, tags=("prod",))
    store.remove(v2)
    assert store.resolve("demo") == v1
    with pytest.raises(NotFound):
        store.resolve("demo:prod")
    counts = store.gc(min_age_seconds=0)
    assert counts["blobs_removed"] == 2  # v2's payload and manifest
    assert store.verify("demo:1").name == "demo"


def test_flipped_byte_is_reported_and_never_loaded(store):
    version = store.publish(manifest(), {"payload.safetensors": b"abcdefgh" * 100})
    digest = store.manifest(version).files["payload.safetensors"].sha256
    blob = Path(store.url) / "blobs" / "sha256" / digest[:2] / digest
    data = bytearray(blob.read_bytes())
    data[17] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="checksum mismatch"):
        store.verify(version)
    with pytest.raises(CorruptArtifact):
        store.read_file(version, store.manifest(version), "payload.safetensors")


def test_tampered_manifest_is_reported(store):
    version = store.publish(manifest(), {"p": b"x"})
    hexdigest = version.digest.removeprefix("sha256:")
    path = Path(store.url) / "blobs" / "sha256" / hexdigest[:2] / hexdigest
    path.write_bytes(path.read_bytes().replace(b'"method": "test"', b'"method": "evil"'))
    with pytest.raises(CorruptArtifact):
        store.manifest(version)


def _publish_many(url: str, worker: int, count: int) -> None:
    store = open_store(url)
    for i in range(count):
        store.publish(manifest(metrics={"worker": worker, "i": i}), {"p": f"{worker}-{i}".encode() * 1000})


def assert_concurrent_publishers_lose_nothing(url: str, workers: int, each: int) -> None:
    """`workers` processes publish `each` versions of one name at once: every one survives."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_publish_many, args=(url, w, each)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
        assert process.exitcode == 0
    store = open_store(url)
    versions = store.versions("demo")
    assert sorted(versions) == list(range(1, workers * each + 1))
    seen = {(m.metrics["worker"], m.metrics["i"]) for m in (store.verify(f"demo:{v}") for v in versions)}
    assert seen == {(w, i) for w in range(workers) for i in range(each)}
    assert store.tags("demo")[DEFAULT_TAG] == workers * each


def test_concurrent_publishers_from_several_processes_lose_nothing(tmp_path):
    assert_concurrent_publishers_lose_nothing(str(tmp_path / "registry"), workers=4, each=6)


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import registry.local
    from registry import open_store
    from tests.test_registry import manifest
    store = open_store(sys.argv[1])
    original = os.replace
    def crash_on_version_pointer(source, target):
        if "versions" in str(target):   # blobs are in place, pointer and tags staged: die before they appear
            os.kill(os.getpid(), signal.SIGKILL)
        original(source, target)
    registry.local.os.replace = crash_on_version_pointer
    store.publish(manifest(metrics={"crash": 1}), {"p": b"half-published" * 1000})
""")


def test_process_killed_mid_publish_leaves_previous_versions_intact(tmp_path):
    url = str(tmp_path / "registry")
    store = open_store(url)
    good = store.publish(manifest(), {"p": b"good"})
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, url], cwd=Path(__file__).parent.parent)
    assert result.returncode == -signal.SIGKILL
    assert store.versions("demo") == {1: good.digest}
    assert store.resolve("demo") == good
    assert len(store.leftovers(0)) == 2  # the staged version pointer and `latest`, no longer locked
    assert store.gc(min_age_seconds=0) == {"blobs_removed": 2, "tmp_removed": 2, "blobs_kept": 2}
    store.verify(good)
    assert store.publish(manifest(), {"p": b"next"}).version == 2  # the lock died with the process


def test_random_time_kills_never_expose_a_partial_version(tmp_path):
    url = str(tmp_path / "registry")
    script = "import sys; from tests.test_registry import _publish_many; _publish_many(sys.argv[1], 0, 1000)"
    for delay in (0.5, 1.0, 1.5):
        process = subprocess.Popen([sys.executable, "-c", script, url], cwd=Path(__file__).parent.parent)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    store = open_store(url)
    assert store.versions("demo"), "the publisher was killed before it published anything"
    for version in store.versions("demo"):
        store.verify(f"demo:{version}")  # every visible version is complete


FULL_DISK_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    from registry import open_store
    from ticketserve.errors import StorageError
    from tests.test_registry import manifest
    store = open_store(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # writes past 64 KiB fail
    try:
        store.publish(manifest(metrics={"big": 1}), {"p": b"x" * 1_000_000})
    except StorageError as exc:
        print(exc)
        sys.exit(3)
""")


def test_failed_write_raises_storage_error_and_publishes_nothing(tmp_path):
    url = str(tmp_path / "registry")
    store = open_store(url)
    good = store.publish(manifest(), {"p": b"good"})
    result = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, url], cwd=Path(__file__).parent.parent,
                            capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "cannot write" in result.stdout
    assert store.versions("demo") == {1: good.digest}
    assert not list((Path(url) / "tmp").iterdir())  # the partial temp file was removed


def test_bundle_round_trip_between_registries(tmp_path, store):
    version = store.publish(manifest(), {"payload.safetensors": b"weights" * 100}, tags=("prod",))
    bundle = tmp_path / "demo.tar"
    store.export_bundle("demo:prod", bundle)
    other = open_store(str(tmp_path / "other"))
    imported = other.import_bundle(bundle, tags=("staging",))
    assert imported.digest == version.digest
    assert other.resolve("demo:staging") == imported
    assert other.read_file(imported, other.manifest(imported), "payload.safetensors") == b"weights" * 100


def test_tampered_or_foreign_bundles_are_refused(tmp_path, store):
    store.publish(manifest(), {"payload.safetensors": b"weights" * 100})
    bundle = tmp_path / "demo.tar"
    store.export_bundle("demo", bundle)
    data = bundle.read_bytes().replace(b"weights", b"WEIGHTS", 1)
    bundle.write_bytes(data)
    with pytest.raises(CorruptArtifact):
        open_store(str(tmp_path / "other")).import_bundle(bundle)
    not_a_bundle = tmp_path / "x.tar"
    not_a_bundle.write_bytes(b"hello")
    with pytest.raises(CorruptArtifact):
        open_store(str(tmp_path / "other")).import_bundle(not_a_bundle)
    assert open_store(str(tmp_path / "other")).names() == []


def test_default_registry_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TICKETSERVE_REGISTRY", str(tmp_path / "env-registry"))
    assert open_store().url == str((tmp_path / "env-registry").resolve())
    with pytest.raises(InvalidArgument):
        open_store("ftp://nowhere/registry")
