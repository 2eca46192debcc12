"""The registry watch costs one listing per poll, however many aliases are resident, and still
follows every tag move — on a local registry and on S3 (moto server on 127.0.0.1); and the
event loop's way to a resident task and back never waits for the cache nor walks it."""

from __future__ import annotations

import collections
import threading

import pytest

from tests.helpers import publish_row_task
from ticketserve.core.backbone import load_backbone
from ticketserve.registry import local, open_store
from ticketserve.runtime.executor import Runtime
from ticketserve.runtime.server.loader import TaskLoader

CALLS = ("resolve", "tags", "versions", "names", "manifest", "ref_stamps")


def _counted(store) -> collections.Counter:
    """Count the store's calls (the store itself, instrumented in place)."""
    counts = collections.Counter()
    for name in CALLS:
        method = getattr(store, name)

        def counting(*args, _method=method, _name=name, **kwargs):
            counts[_name] += 1
            return _method(*args, **kwargs)

        setattr(store, name, counting)
    return counts


@pytest.mark.parametrize("where", ["local", "local-settled", "s3"])
def test_a_poll_lists_the_registry_once_and_follows_what_moved(where, tmp_path, tiny_bert, request, monkeypatch):
    # a local folder's stamp changes form when it leaves the racy window (one spurious look at
    # that name, harmless); fixed windows keep this test's counts exact on a slow machine
    monkeypatch.setattr(local, "RECENT_SECONDS", 0.0 if where == "local-settled" else 3600.0)
    url = request.getfixturevalue("s3_url") if where == "s3" else str(tmp_path / "registry")
    store = open_store(url)
    backbone = load_backbone(tiny_bert)
    names = [f"w{i:02d}" for i in range(12)]
    for seed, name in enumerate(names):
        publish_row_task(store, backbone, name, seed)
    loader = TaskLoader(store, Runtime(backbone, device="cpu"), cache_bytes=1 << 30)
    for name in names:
        loader.preload(name)
    counts = _counted(store)
    loader.refresh()
    loader.refresh()
    assert dict(counts) == {"ref_stamps": 2}, dict(counts)  # nothing moved: one listing per poll, no resolve

    publish_row_task(store, backbone, "w03", 99)  # w03:2 becomes latest
    counts.clear()
    loader.refresh()
    assert counts["ref_stamps"] == 1 and counts["resolve"] == 1, dict(counts)  # only the alias that moved
    served = {str(row.alias): str(row.version) for row in loader.describe()[0] if row.alias}
    assert served["w03:latest"] == "w03:2" and served["w04:latest"] == "w04:1"


def test_the_event_loops_acquire_never_waits_and_never_loads(tmp_path, tiny_bert):
    store = open_store(str(tmp_path / "registry"))
    backbone = load_backbone(tiny_bert)
    for seed, name in enumerate(("hot", "cold")):
        publish_row_task(store, backbone, name, seed)
    loader = TaskLoader(store, Runtime(backbone, device="cpu"), cache_bytes=1 << 30)
    loader.preload("hot")
    assert loader.acquire_resident("cold") is None and not loader.serves("cold")  # loading is a worker's job
    handle = loader.acquire_resident("hot", "1")
    assert str(handle.version) == "hot:1" and handle.refs == 1  # held, as acquire's are
    loader.release(handle)

    busy, done = threading.Event(), threading.Event()

    def hold_the_cache():
        with loader._lock:
            busy.set()
            done.wait(10)

    holder = threading.Thread(target=hold_the_cache)
    holder.start()
    busy.wait(10)
    try:
        assert loader.acquire_resident("hot") is None  # the cache is busy: no wait on the event loop
    finally:
        done.set()
        holder.join()
    handle = loader.acquire_resident("hot")
    assert handle is not None and handle.refs == 1


class _Walked(collections.OrderedDict):
    """The cache's resident map, counting walks over it."""

    walks = 0

    def __iter__(self):
        type(self).walks += 1
        return super().__iter__()


def test_a_release_within_budget_never_walks_the_cache(tmp_path, tiny_bert):
    store = open_store(str(tmp_path / "registry"))
    backbone = load_backbone(tiny_bert)
    publish_row_task(store, backbone, "hot", 0)
    loader = TaskLoader(store, Runtime(backbone, device="cpu"), cache_bytes=1 << 30)
    loader.preload("hot")
    loader.resident = _Walked(loader.resident)
    for _ in range(3):
        loader.release(loader.acquire_resident("hot"))
    assert _Walked.walks == 0  # every request releases: a walk over 10,000 resident tasks cost a fifth of QPS
