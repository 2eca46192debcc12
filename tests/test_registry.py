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

from ticketserve.core.errors import CorruptArtifact, InvalidArgument, NotFound, StorageError
from ticketserve.core.tasks import get_task
from ticketserve.registry import BackboneRef, HeadConfig, Manifest, Reference, open_store
from ticketserve.registry.store import DEFAULT_TAG

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


@pytest.mark.parametrize("text", ["Demo", "a/b", "x:1:2", "../etc", "demo:Latest", "", "demo\n", "demo:1\n",
                                  "demo:²", "demo:①", "demo:٣", "demo:𝟏", "demo:" + "1" * 5000, "d" * 129])
def test_malformed_references_are_invalid(text):
    with pytest.raises(InvalidArgument) as info:
        Reference.parse(text)
    assert len(str(info.value)) < 300  # a long input is echoed as a short excerpt


def test_versions_are_ascii_digits_and_unicode_digits_never_resolve(store):
    store.publish(manifest(), {"p": b"x"})
    assert store.resolve("demo:1").version == 1
    for selector in ("٣", "𝟏", "²"):
        with pytest.raises(InvalidArgument):
            Reference.of("demo", selector)
    assert Reference.of("demo", "1").pinned and not Reference.of("demo", "prod").pinned


def test_resolving_while_publishing_never_misses_the_version_a_tag_names(store):
    """A publish lands between reading a name's versions and its tags: `latest` must still resolve."""
    import threading

    store.publish(manifest(), {"p": b"0"}, tags=("prod",))
    done, misses = threading.Event(), []

    def resolve_all_the_time() -> None:
        while not done.is_set():
            for ref in ("demo", "demo:prod", "demo:latest"):
                try:
                    store.resolve(ref)
                except NotFound as exc:
                    misses.append(str(exc))

    reader = threading.Thread(target=resolve_all_the_time)
    reader.start()
    for i in range(150):
        store.publish(manifest(metrics={"f1": float(i)}), {"p": str(i).encode()}, tags=("prod",))
    done.set()
    reader.join()
    assert not misses, misses[:3]
    newest = store.resolve("demo:prod")
    assert store.resolve(f"demo:prod@{newest.digest}") == newest == store.resolve(f"demo:151@{newest.digest}")


def test_full_disk_while_committing_leaves_no_new_version(store, monkeypatch):
    """The version pointer is staged, `latest` hits ENOSPC: the publish fails, nothing new is visible."""
    import errno

    import ticketserve.registry.local

    v1 = store.publish(manifest(), {"p": b"one"})
    original = ticketserve.registry.local.os.write

    def full_on_the_tag(fd, data):
        if data == b"2":  # the `latest` tag's content, staged after the version pointer
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(fd, data)

    monkeypatch.setattr(ticketserve.registry.local.os, "write", full_on_the_tag)
    with pytest.raises(StorageError, match="disk full"):
        store.publish(manifest(metrics={"f1": 1.0}), {"p": b"two"})
    monkeypatch.undo()
    assert store.versions("demo") == {1: v1.digest} and store.resolve("demo") == v1
    assert not list((Path(store.url) / "tmp").iterdir())
    assert store.publish(manifest(metrics={"f1": 1.0}), {"p": b"two"}).version == 2


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs; needs root), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_really_full_disk_fails_the_publish_with_latest_unchanged(small_disk):
    store = open_store(str(small_disk / "registry"))
    again = manifest(metrics={"f1": 0.5})
    v1 = store.publish(again, {"p": b"payload"})
    stat = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * ((stat.f_bavail - 1) * stat.f_bsize))  # one block left
    assert os.statvfs(small_disk).f_bavail == 1
    with pytest.raises(StorageError, match="disk full"):  # blobs exist already; pointer + tag need 2 blocks
        store.publish(again, {"p": b"payload"})
    assert store.versions("demo") == {1: v1.digest}
    assert store.resolve("demo") == v1 and store.tags("demo") == {"latest": 1}
    (small_disk / "filler").unlink()
    assert store.publish(again, {"p": b"payload"}).version == 2


def test_garbage_tag_or_version_file_is_a_clear_error_naming_it(store):
    store.publish(manifest(), {"p": b"x"})
    store.publish(manifest(name="other"), {"p": b"y"})
    refs = Path(store.url) / "refs"
    (refs / "demo" / "tags" / "latest").write_text("")
    with pytest.raises(CorruptArtifact, match=r"tag file .*demo/tags/latest holds ''"):
        store.resolve("demo")
    assert store.resolve("demo:1").version == 1  # pinned versions still resolve
    (refs / "other" / "versions" / "1").write_text("garbage")
    with pytest.raises(CorruptArtifact, match=r"version file .*other/versions/1 holds 'garbage'"):
        store.resolve("other:1")
    assert store.names() == ["demo", "other"]  # listing names survives both


def test_temp_files_of_killed_writers_are_found_and_collected(store):
    root = Path(store.url)
    script = textwrap.dedent("""
        import os, signal, sys
        import ticketserve.registry.local
        from ticketserve.registry import open_store
        store = open_store(sys.argv[1])
        original = ticketserve.registry.local.os.fsync
        def die_after_writing(fd):   # the blob's bytes are in its locked temp file: die before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        ticketserve.registry.local.os.fsync = die_after_writing
        store._put_blob(b"x" * 5_000_000)
    """)
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", script, store.url], cwd=Path(__file__).parent.parent)
        assert result.returncode == -signal.SIGKILL
    live = store._stage(b"a live writer's file")  # still locked by this process
    try:
        for path in (root / "tmp").iterdir():
            os.utime(path, (time.time() - 60, time.time() - 60))  # past the creation grace
        found = store.leftovers()
        assert len(found) == 3 and sum(size for _, size in found) == 15_000_000
        assert store.gc() == {"blobs_removed": 0, "tmp_removed": 3, "blobs_kept": 0}  # default age: no need to wait an hour
        assert [p.name for p in (root / "tmp").iterdir()] == [live.path.name]
    finally:
        live.drop()


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


def test_a_names_stamp_moves_with_each_publish_tag_move_and_removal_and_only_then(store, monkeypatch):
    """The watch's listing: settled folders are stamped by two stats each; a folder changed
    within the racy window also file by file, so a second change in the same tick of the file
    system's clock (simulated: its mtime put back) still moves the stamp."""
    from ticketserve.registry import local

    store.publish(manifest(), {"p": b"one"})
    store.publish(manifest("other"), {"p": b"two"})
    monkeypatch.setattr(local, "RECENT_SECONDS", 0.0)  # every folder counts as settled
    seen = store.ref_stamps()
    assert store.ref_stamps() == seen and set(seen) == {"demo", "other"}

    def moved(change) -> bool:
        nonlocal seen
        time.sleep(0.02)  # a later tick than the last change (the settled case)
        change()
        now = store.ref_stamps()
        assert now["other"] == seen["other"]  # only the name that changed
        was, seen = seen["demo"], now
        return now["demo"] != was

    assert moved(lambda: store.publish(manifest(), {"p": b"three"}))
    assert moved(lambda: store.set_tag("demo", "prod", 1))
    assert moved(lambda: store.set_tag("demo", "prod", 2))
    assert moved(lambda: store.remove(store.resolve("demo:2")))

    tags = store.root / "refs" / "demo" / "tags"
    store.set_tag("demo", "prod", 1)
    mtime = os.stat(tags).st_mtime_ns

    def demo_stamp(window: float) -> str:
        monkeypatch.setattr(local, "RECENT_SECONDS", window)
        return store.ref_stamps()["demo"]

    before = {window: demo_stamp(window) for window in (0.0, 3600.0)}
    store.set_tag("demo", "prod", 1)  # rewritten (a new file) in the same tick: the folder's mtime is unchanged
    os.utime(tags, ns=(mtime, mtime))
    assert demo_stamp(0.0) == before[0.0]  # what two stats alone cannot see
    assert demo_stamp(3600.0) != before[3600.0]  # what the racy window sees


def test_the_local_listing_reads_what_name_by_name_reads(store):
    from ticketserve.registry.store import Store

    for i in range(4):
        store.publish(manifest(f"n{i}"), {"p": b"x%d" % i}, tags=("prod",) if i % 2 else ())
    store.publish(manifest("n1"), {"p": b"again"})
    (store.root / "refs" / "n2" / "tags" / "prod").write_bytes(b"not a version")
    (store.root / "refs" / "empty" / "versions").mkdir(parents=True)  # no version: not a name
    listed = store.listing()
    assert listed == Store.listing(store)
    assert [r.name for r in listed] == ["n0", "n1", "n2", "n3"] and "n2/tags/prod" in listed[2].error
    assert listed[1].tags == {"latest": 2, "prod": 1} and listed[1].newest().version == 2


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
    import ticketserve.registry.local
    from ticketserve.registry import open_store
    from tests.test_registry import manifest
    store = open_store(sys.argv[1])
    original = os.replace
    def crash_on_version_pointer(source, target):
        if "versions" in str(target):   # blobs are in place, pointer and tags staged: die before they appear
            os.kill(os.getpid(), signal.SIGKILL)
        original(source, target)
    ticketserve.registry.local.os.replace = crash_on_version_pointer
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
    from ticketserve.registry import open_store
    from ticketserve.core.errors import StorageError
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
