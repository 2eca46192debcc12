"""Listing an S3 registry of many names, as `registry list` and a server's `tasks --all` do:
one paginated LIST and batched concurrent GETs (Store.listing + Store.manifests) against
reading name by name (the base Store's way, which S3 used before: a LIST per name for its
versions, another for its tags, a GET per pointer, tag and manifest, one after another).

    python -m benchmarks.system.s3_listing [--names 1000]

The S3 API is moto's server on 127.0.0.1 (the tests' S3), a Python process on the same cores,
so its own request rate bounds both ways; a real bucket answers concurrent GETs in parallel.
Every way starts from a fresh store with an empty blob cache, as a new replica or CLI does.
Results: benchmarks/results/s3_listing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=1000)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "TICKETSERVE_S3_ENDPOINT": endpoint})
    import s3fs

    from ticketserve.core.tasks import get_task
    from ticketserve.registry import BackboneRef, HeadConfig, Manifest, open_store
    from ticketserve.registry.store import Store

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir("bench")
    url = "s3://bench/registry"
    backbone = BackboneRef(name="b", fingerprint="sha256:" + "1" * 64, model_type="bert", num_layers=1, hidden_size=4)

    def fresh():
        os.environ["TICKETSERVE_S3_CACHE"] = tempfile.mkdtemp(prefix="ts-bench-s3-cache-")
        return open_store(url)

    store = fresh()
    started = time.perf_counter()
    for i in range(args.names):
        manifest = Manifest(name=f"t{i:05d}", kind="row_delta", method="bench", task=get_task("sst2"),
                            head=HeadConfig(), backbone=backbone)
        store.publish(manifest, {"payload.safetensors": f"payload {i}".encode()}, tags=("prod",) if i % 2 else ())
    record = {"run": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": common.cpu_name(), "cpu_count": os.cpu_count(),
              "names": args.names, "publish_s": round(time.perf_counter() - started, 1)}

    def names_name_by_name(st):  # what names() did: a LIST of the names, then one of each name's versions
        return [n for n in st._names_under("refs") if any(st._names_under("refs", n, "versions"))]

    def batched(st):
        listed = st.listing()
        return st.manifests([refs.newest() for refs in listed])

    def name_by_name(st):
        return [st.manifest(refs.newest()) for refs in Store.listing(st)]

    ways = {"names_one_list": lambda st: st.names(), "names_name_by_name": names_name_by_name,
            "listing_batched": batched, "listing_name_by_name": name_by_name}
    for way, run in ways.items():
        st = fresh()
        started = time.perf_counter()
        found = run(st)
        record[f"{way}_s"] = round(time.perf_counter() - started, 2)
        assert len(found) == args.names, (way, len(found))
        print(json.dumps({way: record[f"{way}_s"]}), flush=True)
    server.stop()
    path = common.RESULTS / "s3_listing.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
