"""Commands that use tasks: evaluate and predict in process, serve, and ask a server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ticketserve.cli.common import (
    BackboneOpt,
    DataDirOpt,
    DtypeOpt,
    JsonOpt,
    QuantizeOpt,
    RegistryOpt,
    emit,
    out,
    rpc,
    runtime_for,
)
from ticketserve.core.errors import InvalidArgument, TicketserveError

commands = typer.Typer()


@commands.command("eval")
def evaluate_cmd(
    artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT", help="NAME[:VERSION|:TAG]")],
    data_dir: DataDirOpt = None,
    split: Annotated[Optional[str], typer.Option(help="default: the task's evaluation split")] = None,
    eval_samples: Optional[int] = None,
    seed: int = 42,
    backbone: BackboneOpt = None,
    dtype: DtypeOpt = "float32",
    quantize: QuantizeOpt = "none",
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a published artifact on a task split (applied exactly as the server applies it)."""
    from ticketserve.core.data import load_split
    from ticketserve.runtime.evaluate import evaluate

    runtime, task = runtime_for(artifact_ref, registry, backbone, dtype, quantize)
    spec = task.spec
    dataset = load_split(spec, split or spec.eval_split, data_dir, eval_samples, seed)
    metrics = evaluate(runtime, task, dataset)
    result = {"artifact": str(task.version), "task": spec.name, "split": split or spec.eval_split,
              "examples": len(dataset), "dtype": dtype, "quantize": quantize, "metrics": metrics}
    emit(as_json, result, lambda: out.print(
        f"{result['artifact']} on {spec.name} ({result['split']}, {len(dataset)} examples): "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), markup=False))


@commands.command()
def predict(
    args: Annotated[list[str], typer.Argument(metavar="[ARTIFACT] TEXT...", help="in-process: ARTIFACT then texts; with --server: texts")],
    server: Annotated[Optional[str], typer.Option(help="HOST:PORT of a running `ticketserve serve`")] = None,
    task: Annotated[Optional[str], typer.Option(help="with --server: the task (artifact name) to ask")] = None,
    version: Annotated[Optional[str], typer.Option(help="with --server: a version or tag (default: latest)")] = None,
    pair: Annotated[Optional[list[str]], typer.Option(help="second text, once per text (pair tasks)")] = None,
    token: Annotated[Optional[str], typer.Option(envvar="TICKETSERVE_TOKEN", help="with --server: bearer token")] = None,
    tls_ca: Annotated[Optional[Path], typer.Option(help="with --server: CA certificate for TLS")] = None,
    backbone: BackboneOpt = None,
    dtype: DtypeOpt = "float32",
    quantize: QuantizeOpt = "none",
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict labels for texts: in-process with a published artifact, or from a server."""
    if server:
        if not task:
            raise InvalidArgument("--server needs --task")
        from ticketserve.runtime.client import Client

        with Client(server, token=token, tls_ca=tls_ca) as client:
            result = rpc(lambda: client.predict(task, args, pair, version))
        artifact_name, results, regression = result.artifact, result.predictions, not result.predictions[0].label
        texts = args
    else:
        if len(args) < 2:
            raise InvalidArgument("give an ARTIFACT and at least one text (or --server HOST:PORT --task NAME)")
        runtime, loaded = runtime_for(args[0], registry, backbone, dtype, quantize)
        texts = args[1:]
        if loaded.spec.takes_pairs and not pair:
            raise InvalidArgument(f"task {loaded.spec.name} takes text pairs: give --pair once per text")
        results = runtime.predict([loaded] * len(texts), texts, pair)
        artifact_name, regression = str(loaded.version), loaded.spec.is_regression
    rows = [{"text": t, "label": r.label, "score": r.score, "probabilities": r.probabilities}
            | ({"embedding": r.embedding} if r.embedding is not None else {}) for t, r in zip(texts, results)]

    def table() -> None:
        if "embedding" in rows[0]:  # an embedding task: its width and leading values
            grid = Table("text", "embedding", title=artifact_name)
            for row in rows:
                vector = row["embedding"]
                grid.add_row(row["text"], f"[{', '.join(f'{x:.4f}' for x in vector[:4])}, …] ({len(vector)} dimensions)")
            return out.print(grid)
        grid = Table("text", "value" if regression else "label", "score", title=artifact_name)
        for row in rows:
            grid.add_row(row["text"], row["label"] or f"{row['score']:.4f}", f"{row['score']:.4f}")
        out.print(grid)

    emit(as_json, {"artifact": artifact_name, "predictions": rows}, table)


@commands.command()
def serve(
    registry: RegistryOpt = None,
    backbone: Annotated[Optional[str], typer.Option(help="BERT/RoBERTa hub id or path; default: bundled MiniLM")] = None,
    host: str = "127.0.0.1",
    port: int = 50051,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda when available)")] = None,
    backend: Annotated[str, typer.Option(help="torch | onnx (ONNX Runtime; exported once per backbone, cached)")] = "torch",
    dtype: DtypeOpt = "float32",
    quantize: QuantizeOpt = "none",
    cache_bytes: Annotated[int, typer.Option(help="resident task artifacts; LRU beyond")] = 1 << 30,
    preload: Annotated[Optional[list[str]], typer.Option(help="task (NAME[:VERSION]) to load at start; repeatable")] = None,
    watch_seconds: Annotated[float, typer.Option(help="registry poll interval for new versions and tag moves")] = 5.0,
    max_batch_size: int = 32,
    max_batch_tokens: int = 8192,
    max_queue_delay_ms: float = 5.0,
    queue_ms_per_token: Annotated[float, typer.Option(help="queue order: a request's turn comes this much later per padded token (0: first come, first served)")] = 1.0,
    max_queue_size: int = 256,
    max_texts_per_request: int = 32,
    max_tasks_per_request: Annotated[int, typer.Option(help="tasks one fan-out may name")] = 16,
    max_tokens_per_text: int = 256,
    max_text_bytes: Annotated[int, typer.Option(help="UTF-8 bytes per text; longer ones are refused (INVALID_ARGUMENT)")] = 256 * 1024,
    truncate: Annotated[bool, typer.Option("--truncate/--reject-long", help="truncate or refuse texts over the token limit")] = True,
    max_message_bytes: int = 4 << 20,
    token_file: Annotated[Optional[str], typer.Option(help="require this bearer token (first line of the file)")] = None,
    token_env: Annotated[Optional[str], typer.Option(help="require the bearer token in this environment variable")] = None,
    admin_token_file: Annotated[Optional[str], typer.Option(help="separate token for LoadTask/UnloadTask")] = None,
    admin_token_env: Optional[str] = None,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    http_port: Annotated[Optional[int], typer.Option(help="serve HTTP on this port: the Open Inference Protocol (KServe v2) "
                                                      "REST API under /v2 and the JSON API under /v1")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="serve Prometheus metrics on this port")] = None,
    metrics_task_series: Annotated[int, typer.Option(help="tasks with their own per-task metric series (the first loaded or served); the rest count as task=\"_other\"")] = 100,
    drain_seconds: Annotated[float, typer.Option(help="on SIGTERM, how long requests in flight may take (new ones get UNAVAILABLE)")] = 30.0,
    http_request_seconds: Annotated[float, typer.Option(help="HTTP: a request's head and body must arrive within this, or 408 and the connection closes")] = 30.0,
    http_max_connections: Annotated[int, typer.Option(help="HTTP: connections (and requests) at once; past it new requests get 503")] = 4096,
) -> None:
    """Serve every task in the registry from one shared backbone: gRPC (ours and the Open Inference Protocol), and HTTP with --http-port."""
    from ticketserve.runtime.engine import EngineConfig
    from ticketserve.runtime.server.main import ServeConfig
    from ticketserve.runtime.server.main import serve as run_server

    if bool(tls_cert) != bool(tls_key):
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    engine = EngineConfig(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                          max_queue_delay_ms=max_queue_delay_ms, queue_ms_per_token=queue_ms_per_token,
                          max_queue_size=max_queue_size,
                          max_texts_per_request=max_texts_per_request, max_tasks_per_request=max_tasks_per_request,
                          max_tokens_per_text=max_tokens_per_text,
                          max_text_bytes=max_text_bytes, truncate=truncate)
    run_server(ServeConfig(
        host=host, port=port, registry=registry, backbone=backbone, device=device, backend=backend, dtype=dtype,
        quantize=quantize, cache_bytes=cache_bytes,
        preload=preload or [], watch_seconds=watch_seconds, engine=engine, max_message_bytes=max_message_bytes,
        token_file=token_file, token_env=token_env, admin_token_file=admin_token_file, admin_token_env=admin_token_env,
        tls_cert=tls_cert, tls_key=tls_key, http_port=http_port, metrics_port=metrics_port,
        metrics_task_series=metrics_task_series,
        drain_seconds=drain_seconds, http_request_seconds=http_request_seconds,
        http_max_connections=http_max_connections))


@commands.command()
def openapi() -> None:
    """Print the OpenAPI document of the HTTP API (what `serve --http-port` serves at /openapi.json)."""
    from ticketserve.runtime.server.http import openapi_document

    typer.echo(json.dumps(openapi_document(), indent=2, sort_keys=True))


@commands.command()
def info(server: Annotated[str, typer.Option(help="HOST:PORT")],
         token: Annotated[Optional[str], typer.Option(envvar="TICKETSERVE_TOKEN")] = None,
         tls_ca: Optional[Path] = None, wait: Annotated[float, typer.Option(help="wait up to N seconds for the server")] = 0.0,
         as_json: JsonOpt = False) -> None:
    """A server's backbone, fingerprint, device and limits."""
    import time

    from google.protobuf.json_format import MessageToDict

    from ticketserve.runtime.client import Client

    deadline = time.monotonic() + wait
    with Client(server, token=token, tls_ca=tls_ca, timeout=5) as client:
        while True:
            try:
                response = rpc(client.server_info)
                break
            except TicketserveError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
    payload = MessageToDict(response, preserving_proto_field_name=True)
    emit(as_json, payload, lambda: out.print_json(json.dumps(payload)))


@commands.command()
def health(server: Annotated[str, typer.Option(help="HOST:PORT")],
           service: Annotated[str, typer.Option(help="a service name, or '' for the whole server")] = "",
           tls_ca: Optional[Path] = None, timeout: float = 5.0) -> None:
    """Exit 0 when the server's grpc.health.v1 check says SERVING (container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    credentials = grpc.ssl_channel_credentials(tls_ca.read_bytes()) if tls_ca else None
    with (grpc.secure_channel(server, credentials) if credentials else grpc.insecure_channel(server)) as channel:
        response = rpc(lambda: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout))
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    out.print(status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)


@commands.command()
def tasks(server: Annotated[str, typer.Option(help="HOST:PORT")],
          all_tasks: Annotated[bool, typer.Option("--all", help="also list registry artifacts not loaded")] = False,
          token: Annotated[Optional[str], typer.Option(envvar="TICKETSERVE_TOKEN")] = None,
          tls_ca: Optional[Path] = None, as_json: JsonOpt = False) -> None:
    """Tasks a server has loaded (or can load, with --all)."""
    from google.protobuf.json_format import MessageToDict

    from ticketserve.runtime.client import Client

    with Client(server, token=token, tls_ca=tls_ca) as client:
        listed = rpc(lambda: client.list_tasks(include_registry=all_tasks))
    rows = [MessageToDict(t, preserving_proto_field_name=True) for t in listed]

    def table() -> None:
        grid = Table("artifact", "state", "kind", "method", "task", "resident bytes", "error")
        for t in listed:
            grid.add_row(t.artifact, pb_state(t.state), t.kind, t.method, t.task, f"{t.resident_bytes:,}", t.error)
        out.print(grid)

    emit(as_json, rows, table)


def pb_state(state: int) -> str:
    from ticketserve.v1 import pb

    return pb.TaskState.Name(state).removeprefix("TASK_STATE_").lower()


