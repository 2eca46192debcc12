"""The `ticketserve` command: train, eval, predict, and the registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from ticketserve.errors import InvalidArgument, TicketserveError

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_show_locals=False)
registry_app = typer.Typer(help="Inspect and manage the artifact registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
ticket_app = typer.Typer(help="Inspect and compare dominant tickets.", no_args_is_help=True)
app.add_typer(ticket_app, name="ticket")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

RegistryOpt = Annotated[Optional[str], typer.Option("--registry", envvar="TICKETSERVE_REGISTRY",
                                                    help="registry URL or directory (default: user cache)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
BackboneOpt = Annotated[Optional[str], typer.Option("--backbone", help="BERT/RoBERTa hub id or path; default: bundled MiniLM (for eval/predict: the artifact's)")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="directory with <split>.jsonl/.csv/.tsv, or 'sample' for the bundled sample")]


def _emit(as_json: bool, payload: Any, human) -> None:
    if as_json:
        out.print_json(json.dumps(payload, default=str))
    else:
        human()


def _store(url: str | None):
    from registry import open_store

    return open_store(url)


def _artifact_for(ref: str, registry: str | None, backbone: str | None):
    """The artifact's backbone (or the one given), and the artifact checked against it."""
    from ticketserve import artifact
    from ticketserve.backbone import load_backbone

    store = _store(registry)
    version = store.resolve(ref)
    loaded_backbone = load_backbone(backbone or store.manifest(version).backbone.name, store)
    return loaded_backbone, artifact.load(store, version, loaded_backbone)


def _runtime_for(ref: str, registry: str | None, backbone: str | None):
    """A runtime on the artifact's backbone (or the one given) serving the artifact."""
    from ticketserve.runtime import Runtime

    loaded_backbone, found = _artifact_for(ref, registry, backbone)
    runtime = Runtime(loaded_backbone)
    return runtime, runtime.add(found)


@app.command()
def train(
    method: Annotated[str, typer.Option(help="see `ticketserve methods`; also superticket, ticketshare")],
    task: Annotated[Optional[str], typer.Option(help="GLUE task name, or a name for your own task")] = None,
    backbone: BackboneOpt = None,
    data_dir: DataDirOpt = None,
    text_field: Annotated[Optional[str], typer.Option(help="custom task: the text column")] = None,
    text_pair_field: Annotated[Optional[str], typer.Option(help="custom task: the second text column")] = None,
    label_field: Annotated[str, typer.Option(help="custom task: the label column")] = "label",
    labels: Annotated[Optional[str], typer.Option(help="custom task: comma-separated label names (default: from the data; 'regression' for a value)")] = None,
    metric: Annotated[Optional[str], typer.Option(help="custom task: accuracy|f1|matthews|pearson|spearman")] = None,
    train_samples: Annotated[Optional[int], typer.Option(help="random subset of the training split")] = None,
    eval_samples: Annotated[Optional[int], typer.Option(help="random subset of the evaluation split")] = None,
    epochs: int = 3,
    max_steps: Optional[int] = None,
    lr: Annotated[Optional[float], typer.Option(help="default: the method's")] = None,
    batch_size: int = 32,
    max_length: int = 128,
    eval_steps: Annotated[Optional[int], typer.Option(help="evaluate every N steps (default: each epoch)")] = None,
    patience: Annotated[Optional[int], typer.Option(help="early stop after N evaluations without improvement")] = None,
    seed: int = 42,
    pooling: str = "mean",
    k: Annotated[Optional[int], typer.Option("--k", help="dominant/random: rows per matrix")] = None,
    ticket: Annotated[Optional[str], typer.Option(help="dominant: a published ticket to train on (default: search one first)")] = None,
    lambda_l1: Annotated[Optional[float], typer.Option("--lambda", help="ticket search: L1 weight (default 1e-3)")] = None,
    sigma: Annotated[Optional[float], typer.Option(help="ticket search: out-weighted threshold on |Δ| (default 5e-5)")] = None,
    sigma_quantile: Annotated[Optional[float], typer.Option(help="ticket search: σ as this quantile of |Δ|")] = None,
    init_sparsity: Annotated[Optional[float], typer.Option(help="supermask: share of smallest weights starting masked")] = None,
    layers: Annotated[Optional[str], typer.Option(help="supermask: all | no-key | no-deep")] = None,
    deep_blocks: Annotated[Optional[int], typer.Option(help="supermask no-deep: last blocks left unmasked")] = None,
    mask_embeddings: Annotated[Optional[bool], typer.Option("--mask-embeddings", help="supermask: mask word embeddings too")] = None,
    samples: Annotated[Optional[int], typer.Option(help="supermask: also score N Bernoulli-sampled masks")] = None,
    head_lr: Annotated[Optional[float], typer.Option(help="supermask: the task head's learning rate (--lr is the scores')")] = None,
    levels: Annotated[str, typer.Option(help="superticket: pruning levels in percent")] = "0,10,20,30,40,50",
    ticket_type: Annotated[str, typer.Option(help="superticket: winning | random | losing")] = "winning",
    importance: Annotated[Optional[str], typer.Option(help="superticket: a published importance entry to prune by")] = None,
    resume: Annotated[bool, typer.Option(help="superticket: continue a killed sweep of the same --name from its last finished level")] = False,
    tasks: Annotated[Optional[str], typer.Option(help="ticketshare: comma-separated tasks")] = None,
    superticket: Annotated[Optional[list[str]], typer.Option(help="ticketshare: TASK=SWEEP (its best level's mask); repeatable")] = None,
    plain: Annotated[bool, typer.Option(help="ticketshare: plain multi-task learning, every gate open")] = False,
    data_root: Annotated[Optional[str], typer.Option(help="ticketshare: directory with one data dir per task")] = None,
    structure: Annotated[Optional[str], typer.Option(help="gated-full: fine-tune one task of a Ticket-Share run further, from its structure_mask artifact (task, shared encoder, head and mask from it)")] = None,
    name: Annotated[Optional[str], typer.Option(help="artifact name (default: TASK-METHOD)")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="extra tags to move to this version")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a task artifact and publish it to the registry."""
    from ticketserve.backbone import load_backbone
    from ticketserve.data import check_labels, infer_labels
    from ticketserve.tasks import custom_task, get_task
    from trainers.config import TrainConfig
    from trainers.run import train as run_training

    config = TrainConfig(
        epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, max_length=max_length,
        eval_steps=eval_steps, patience=patience, seed=seed, train_samples=train_samples,
        eval_samples=eval_samples, pooling=pooling,
    )
    if method == "ticketshare":
        _ticketshare(tasks, superticket or [], plain, data_root, data_dir, backbone, config, registry, name, levels,
                     ticket_type, as_json)
        return
    if structure is not None:
        if method != "gated-full":
            raise InvalidArgument("--structure starts a per-task fine-tuning: use it with --method gated-full")
        store = _store(registry)
        start = store.manifest(store.resolve(structure))
        task, backbone = task or start.task.name, backbone or start.backbone.name
    if task is None:
        raise InvalidArgument("--task is required")
    if structure is not None and task == start.task.name:
        spec = start.task  # a custom task's spec travels with its artifacts
    elif text_field:
        if data_dir is None:
            raise InvalidArgument("a custom task (--text-field) needs --data-dir")
        if labels is None:
            names = infer_labels(data_dir, label_field)
        else:
            names = [] if labels == "regression" else [n.strip() for n in labels.split(",")]
            check_labels(data_dir, label_field, names)
        spec = custom_task(task, text_field, text_pair_field, label_field, names, metric)
    else:
        spec = get_task(task)
    if method == "superticket":
        from trainers.supertickets import sweep

        version = sweep(spec, load_backbone(backbone), config, _store(registry), data_dir, _levels(levels), ticket_type,
                        importance, name, show_progress=not as_json, resume=resume)
        curve = _store(registry).manifest(version).details
        _emit(as_json, {"artifact": str(version), "digest": version.digest, **curve}, lambda: out.print(
            f"published [bold]{version}[/]: best level {curve['best_level']:.0%}; "
            + ", ".join(f"{p['level']:.0%} → {p['metric']:.4f}" for p in curve["levels"])))
        return
    given = {"k": k, "ticket": ticket, "lambda_l1": lambda_l1, "sigma": sigma, "sigma_quantile": sigma_quantile,
             "init_sparsity": init_sparsity, "layers": layers, "deep_blocks": deep_blocks,
             "embeddings": mask_embeddings, "samples": samples, "head_lr": head_lr, "structure": structure}
    options = {key: value for key, value in given.items() if value is not None}
    outcome = run_training(method, spec, load_backbone(backbone, _store(registry)), config, _store(registry), data_dir, name,
                           tuple(tag or ()), show_progress=not as_json, options=options)
    if outcome.version is None:  # a non-main process of a distributed run
        return
    m = outcome.manifest
    summary = {
        "artifact": str(outcome.version), "digest": outcome.version.digest, "kind": m.kind, "task": spec.name,
        "method": method, "metrics": m.metrics, "trainable_params": m.trainable_params,
        "payload_bytes": _store(registry).manifest(outcome.version).payload_bytes,
        "train_seconds": round(outcome.fit.train_seconds, 1), "steps": outcome.fit.steps,
    }
    metric_text = ", ".join(f"{k} {v:.4f}" for k, v in m.metrics.items())
    _emit(as_json, summary, lambda: out.print(
        f"published [bold]{summary['artifact']}[/] ({m.kind}, {summary['payload_bytes']:,} bytes, "
        f"{m.trainable_params:,} trainable params): {metric_text} in {summary['train_seconds']}s"))


def _levels(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) / 100 for v in text.split(","))
    except ValueError:
        raise InvalidArgument(f"--levels takes percentages like 0,10,20 (got {text!r})") from None
    if not all(0 <= v < 1 for v in values):
        raise InvalidArgument("--levels must lie in [0, 100)")
    return values


def _ticketshare(tasks, supertickets, plain, data_root, data_dir, backbone, config, registry, name, levels, ticket_type,
                 as_json) -> None:
    from ticketserve import artifact
    from ticketserve.backbone import load_backbone
    from ticketserve.tasks import get_task
    from trainers.supertickets import keep_masks, sweep
    from trainers.ticketshare import train_ticketshare

    if not tasks:
        raise InvalidArgument("ticketshare needs --tasks a,b,...")
    specs = [get_task(t) for t in tasks.split(",")]
    dirs = {s.name: (str(Path(data_root) / s.name) if data_root else data_dir) for s in specs}
    given = dict(item.split("=", 1) for item in supertickets)
    store, loaded = _store(registry), load_backbone(backbone)
    masks = None
    if not plain:
        masks = {}
        for spec in specs:
            ref = given.get(spec.name) or str(sweep(spec, loaded, config, store, dirs[spec.name], _levels(levels),
                                                    ticket_type, show_progress=not as_json))
            found = artifact.load(store, ref, loaded, expect_kind="superticket")
            masks[spec.name] = keep_masks(found.tensors, found.manifest.details["best_level"])
    outcome = train_ticketshare(specs, loaded, config, store, dirs, masks, name or ("mtl" if plain else "ticketshare"),
                                show_progress=not as_json)
    if outcome.backbone is None:
        return
    result = {"backbone": str(outcome.backbone), "tasks": {k: str(v) for k, v in outcome.tasks.items()},
              "metrics": outcome.metrics, "train_seconds": round(outcome.train_seconds, 1)}
    _emit(as_json, result, lambda: out.print(
        f"published shared encoder [bold]{outcome.backbone}[/] and " + ", ".join(
            f"{v} ({next(iter(outcome.metrics[k].values())):.4f})" for k, v in outcome.tasks.items())))


@app.command()
def methods(as_json: JsonOpt = False) -> None:
    """The training methods: artifact kind, default learning rate, what each trains."""
    from trainers import methods as registered

    rows = [{"method": name, "kind": cls.kind, "default_lr": cls.default_lr, "description": cls.description}
            for name, cls in sorted(registered().items())]

    def table() -> None:
        grid = Table("method", "kind", "default lr", "what it trains")
        for row in rows:
            grid.add_row(row["method"], row["kind"], f"{row['default_lr']:g}", row["description"])
        out.print(grid)

    _emit(as_json, rows, table)


@app.command("eval")
def evaluate_cmd(
    artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT", help="NAME[:VERSION|:TAG]")],
    data_dir: DataDirOpt = None,
    split: Annotated[Optional[str], typer.Option(help="default: the task's evaluation split")] = None,
    eval_samples: Optional[int] = None,
    seed: int = 42,
    backbone: BackboneOpt = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a published artifact on a task split (applied exactly as the server applies it)."""
    from ticketserve.data import load_split
    from ticketserve.evaluate import evaluate

    runtime, task = _runtime_for(artifact_ref, registry, backbone)
    spec = task.spec
    dataset = load_split(spec, split or spec.eval_split, data_dir, eval_samples, seed)
    metrics = evaluate(runtime, task.name, dataset)
    result = {"artifact": str(task.version), "task": spec.name, "split": split or spec.eval_split,
              "examples": len(dataset), "metrics": metrics}
    _emit(as_json, result, lambda: out.print(
        f"{result['artifact']} on {spec.name} ({result['split']}, {len(dataset)} examples): "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), markup=False))


@app.command()
def predict(
    args: Annotated[list[str], typer.Argument(metavar="[ARTIFACT] TEXT...", help="in-process: ARTIFACT then texts; with --server: texts")],
    server: Annotated[Optional[str], typer.Option(help="HOST:PORT of a running `ticketserve serve`")] = None,
    task: Annotated[Optional[str], typer.Option(help="with --server: the task (artifact name) to ask")] = None,
    version: Annotated[Optional[str], typer.Option(help="with --server: a version or tag (default: latest)")] = None,
    pair: Annotated[Optional[list[str]], typer.Option(help="second text, once per text (pair tasks)")] = None,
    token: Annotated[Optional[str], typer.Option(envvar="TICKETSERVE_TOKEN", help="with --server: bearer token")] = None,
    tls_ca: Annotated[Optional[Path], typer.Option(help="with --server: CA certificate for TLS")] = None,
    backbone: BackboneOpt = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict labels for texts: in-process with a published artifact, or from a server."""
    if server:
        if not task:
            raise InvalidArgument("--server needs --task")
        from ticketserve.client import Client

        with Client(server, token=token, tls_ca=tls_ca) as client:
            result = _rpc(lambda: client.predict(task, args, pair, version))
        artifact_name, results, regression = result.artifact, result.predictions, not result.predictions[0].label
        texts = args
    else:
        if len(args) < 2:
            raise InvalidArgument("give an ARTIFACT and at least one text (or --server HOST:PORT --task NAME)")
        runtime, loaded = _runtime_for(args[0], registry, backbone)
        texts = args[1:]
        if loaded.spec.text_pair_field and not pair:
            raise InvalidArgument(f"task {loaded.spec.name} takes text pairs: give --pair once per text")
        results = runtime.predict([loaded.name] * len(texts), texts, pair)
        artifact_name, regression = str(loaded.version), loaded.spec.is_regression
    rows = [{"text": t, "label": r.label, "score": r.score, "probabilities": r.probabilities} for t, r in zip(texts, results)]

    def table() -> None:
        grid = Table("text", "value" if regression else "label", "score", title=artifact_name)
        for row in rows:
            grid.add_row(row["text"], row["label"] or f"{row['score']:.4f}", f"{row['score']:.4f}")
        out.print(grid)

    _emit(as_json, {"artifact": artifact_name, "predictions": rows}, table)


def _rpc(call):
    """Run a client call; gRPC errors become one-line user errors."""
    import grpc

    try:
        return call()
    except grpc.RpcError as exc:
        raise TicketserveError(f"server said {exc.code().name}: {exc.details()}") from None


@app.command()
def serve(
    registry: RegistryOpt = None,
    backbone: Annotated[Optional[str], typer.Option(help="BERT/RoBERTa hub id or path; default: bundled MiniLM")] = None,
    host: str = "127.0.0.1",
    port: int = 50051,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda when available)")] = None,
    backend: Annotated[str, typer.Option(help="torch | onnx (ONNX Runtime; exported once per backbone, cached)")] = "torch",
    cache_bytes: Annotated[int, typer.Option(help="resident task artifacts; LRU beyond")] = 1 << 30,
    preload: Annotated[Optional[list[str]], typer.Option(help="task (NAME[:VERSION]) to load at start; repeatable")] = None,
    watch_seconds: Annotated[float, typer.Option(help="registry poll interval for new versions and tag moves")] = 5.0,
    max_batch_size: int = 32,
    max_batch_tokens: int = 8192,
    max_queue_delay_ms: float = 5.0,
    queue_ms_per_token: Annotated[float, typer.Option(help="queue order: a request's turn comes this much later per padded token (0: first come, first served)")] = 1.0,
    max_queue_size: int = 256,
    max_texts_per_request: int = 32,
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
    metrics_port: Annotated[Optional[int], typer.Option(help="serve Prometheus metrics on this port")] = None,
    drain_seconds: Annotated[float, typer.Option(help="on SIGTERM, how long requests in flight may take (new ones get UNAVAILABLE)")] = 30.0,
) -> None:
    """Serve every task in the registry over gRPC from one shared backbone."""
    from ticketserve.engine import EngineConfig
    from ticketserve.server.main import ServeConfig
    from ticketserve.server.main import serve as run_server

    if bool(tls_cert) != bool(tls_key):
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    engine = EngineConfig(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                          max_queue_delay_ms=max_queue_delay_ms, queue_ms_per_token=queue_ms_per_token,
                          max_queue_size=max_queue_size,
                          max_texts_per_request=max_texts_per_request, max_tokens_per_text=max_tokens_per_text,
                          max_text_bytes=max_text_bytes, truncate=truncate)
    run_server(ServeConfig(
        host=host, port=port, registry=registry, backbone=backbone, device=device, backend=backend, cache_bytes=cache_bytes,
        preload=preload or [], watch_seconds=watch_seconds, engine=engine, max_message_bytes=max_message_bytes,
        token_file=token_file, token_env=token_env, admin_token_file=admin_token_file, admin_token_env=admin_token_env,
        tls_cert=tls_cert, tls_key=tls_key, metrics_port=metrics_port, drain_seconds=drain_seconds))


@app.command()
def info(server: Annotated[str, typer.Option(help="HOST:PORT")],
         token: Annotated[Optional[str], typer.Option(envvar="TICKETSERVE_TOKEN")] = None,
         tls_ca: Optional[Path] = None, wait: Annotated[float, typer.Option(help="wait up to N seconds for the server")] = 0.0,
         as_json: JsonOpt = False) -> None:
    """A server's backbone, fingerprint, device and limits."""
    import time

    from google.protobuf.json_format import MessageToDict

    from ticketserve.client import Client

    deadline = time.monotonic() + wait
    with Client(server, token=token, tls_ca=tls_ca, timeout=5) as client:
        while True:
            try:
                response = _rpc(client.server_info)
                break
            except TicketserveError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
    payload = MessageToDict(response, preserving_proto_field_name=True)
    _emit(as_json, payload, lambda: out.print_json(json.dumps(payload)))


@app.command()
def health(server: Annotated[str, typer.Option(help="HOST:PORT")],
           service: Annotated[str, typer.Option(help="a service name, or '' for the whole server")] = "",
           tls_ca: Optional[Path] = None, timeout: float = 5.0) -> None:
    """Exit 0 when the server's grpc.health.v1 check says SERVING (container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    credentials = grpc.ssl_channel_credentials(tls_ca.read_bytes()) if tls_ca else None
    with (grpc.secure_channel(server, credentials) if credentials else grpc.insecure_channel(server)) as channel:
        response = _rpc(lambda: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout))
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    out.print(status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)


@app.command()
def tasks(server: Annotated[str, typer.Option(help="HOST:PORT")],
          all_tasks: Annotated[bool, typer.Option("--all", help="also list registry artifacts not loaded")] = False,
          token: Annotated[Optional[str], typer.Option(envvar="TICKETSERVE_TOKEN")] = None,
          tls_ca: Optional[Path] = None, as_json: JsonOpt = False) -> None:
    """Tasks a server has loaded (or can load, with --all)."""
    from google.protobuf.json_format import MessageToDict

    from ticketserve.client import Client

    with Client(server, token=token, tls_ca=tls_ca) as client:
        listed = _rpc(lambda: client.list_tasks(include_registry=all_tasks))
    rows = [MessageToDict(t, preserving_proto_field_name=True) for t in listed]

    def table() -> None:
        grid = Table("artifact", "state", "kind", "method", "task", "resident bytes", "error")
        for t in listed:
            grid.add_row(t.artifact, pb_state(t.state), t.kind, t.method, t.task, f"{t.resident_bytes:,}", t.error)
        out.print(grid)

    _emit(as_json, rows, table)


def pb_state(state: int) -> str:
    from ticketserve.v1 import pb

    return pb.TaskState.Name(state).removeprefix("TASK_STATE_").lower()


@registry_app.command("list")
def registry_list(registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Every artifact name with its versions and tags."""
    from registry import ArtifactVersion

    store = _store(registry)
    rows = []
    for name in store.names():  # a broken entry is listed as broken; it never hides the others
        try:
            tags, versions = store.tags(name), store.versions(name)
        except TicketserveError as exc:
            rows.append({"name": name, "version": None, "error": str(exc)})
            continue
        for version, digest in sorted(versions.items()):
            row = {"name": name, "version": version, "tags": sorted(t for t, v in tags.items() if v == version),
                   "digest": digest}
            try:
                manifest = store.manifest(ArtifactVersion(name, version, digest))
            except TicketserveError as exc:
                rows.append(row | {"error": str(exc)})
                continue
            rows.append(row | {"kind": manifest.kind, "method": manifest.method, "task": manifest.task.name,
                               "metrics": manifest.metrics, "payload_bytes": manifest.payload_bytes,
                               "backbone": manifest.backbone.name})

    def table() -> None:
        grid = Table(title=store.url)
        for column in ("artifact", "tags", "kind", "method", "task", "metric", "bytes", "backbone"):
            grid.add_column(column, overflow="fold")
        for r in rows:
            artifact = r["name"] if r["version"] is None else f"{r['name']}:{r['version']}"
            if "error" in r:
                grid.add_row(artifact, ",".join(r.get("tags", [])), "[red]broken[/]", "", "", r["error"], "", "")
                continue
            metric = ", ".join(f"{k} {v:.4f}" for k, v in list(r["metrics"].items())[:1])
            grid.add_row(artifact, ",".join(r["tags"]), r["kind"], r["method"], r["task"],
                         metric, f"{r['payload_bytes']:,}", Path(r["backbone"]).name)
        out.print(grid)

    _emit(as_json, rows, table)


@registry_app.command("show")
def registry_show(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")], registry: RegistryOpt = None,
                  as_json: JsonOpt = False) -> None:
    """The manifest of one version."""
    store = _store(registry)
    version = store.resolve(artifact_ref)
    manifest = store.manifest(version).model_dump(mode="json")
    payload = {"artifact": str(version), "digest": version.digest, "manifest": manifest}
    _emit(as_json, payload, lambda: out.print_json(json.dumps(payload)))


@registry_app.command("verify")
def registry_verify(artifact_refs: Annotated[Optional[list[str]], typer.Argument(metavar="[ARTIFACT]...", help="default: every version")] = None,
                    registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Re-hash manifests and payloads (exit 1 if anything is corrupt or missing); report temp
    files that writers which are gone left behind (`registry gc` removes them)."""
    store = _store(registry)
    results, refs = [], list(artifact_refs or [])
    if not artifact_refs:  # every version of every name; a name whose versions cannot be read is a failure
        for name in store.names():
            try:
                refs += [f"{name}:{v}" for v in sorted(store.versions(name))]
            except TicketserveError as exc:
                results.append({"artifact": name, "ok": False, "error": str(exc)})
    for ref in refs:
        try:
            store.verify(ref)
            results.append({"artifact": ref, "ok": True})
        except TicketserveError as exc:
            results.append({"artifact": ref, "ok": False, "error": str(exc)})
    leftovers = store.leftovers()
    payload = {"artifacts": results, "leftover_temp_files": len(leftovers),
               "leftover_temp_bytes": sum(size for _, size in leftovers)}

    def report() -> None:
        for r in results:
            out.print(f"{'[green]ok[/]' if r['ok'] else '[red]FAILED[/]'} {r['artifact']}" + (f": {r['error']}" if not r["ok"] else ""))
        if leftovers:
            out.print(f"[yellow]{len(leftovers)} temp files ({payload['leftover_temp_bytes']:,} bytes) left by writers "
                      "that are gone[/]: `ticketserve registry gc` removes them")

    _emit(as_json, payload, report)
    if not all(r["ok"] for r in results):
        raise typer.Exit(1)


@registry_app.command("rm")
def registry_rm(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")], registry: RegistryOpt = None,
                as_json: JsonOpt = False) -> None:
    """Remove one version (its bytes go at the next gc)."""
    store = _store(registry)
    version = store.resolve(artifact_ref)
    store.remove(version)
    _emit(as_json, {"removed": str(version)}, lambda: out.print(f"removed {version}"))


@registry_app.command("tag")
def registry_tag(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")], tag: str,
                 registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Point TAG of the artifact's name at this version."""
    store = _store(registry)
    version = store.resolve(artifact_ref)
    store.set_tag(version.name, tag, version.version)
    _emit(as_json, {"tag": f"{version.name}:{tag}", "version": version.version},
          lambda: out.print(f"{version.name}:{tag} → {version}"))


@registry_app.command("gc")
def registry_gc(min_age: Annotated[float, typer.Option(help="keep unreferenced files younger than this (seconds)")] = 3600,
                registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Delete blobs no version references and stale temporary files."""
    counts = _store(registry).gc(min_age)
    _emit(as_json, counts, lambda: out.print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())))


@registry_app.command("export")
def registry_export(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")],
                    output: Annotated[Path, typer.Option("-o", "--output", help="bundle file, or directory for --format peft")],
                    format: Annotated[str, typer.Option(help="bundle (single file for `registry import`) | peft (LoRA adapter dir)")] = "bundle",
                    backbone: BackboneOpt = None, registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Write one version as a verified single-file bundle, or a row_delta as a PEFT adapter."""
    if format == "bundle":
        version = _store(registry).export_bundle(artifact_ref, output)
    elif format == "peft":
        from ticketserve.peft_export import export_peft

        loaded_backbone, found = _artifact_for(artifact_ref, registry, backbone)
        export_peft(found, loaded_backbone, output)
        version = found.version
    else:
        raise InvalidArgument(f"unknown export format {format!r} (bundle, peft)")
    _emit(as_json, {"artifact": str(version), "format": format, "output": str(output)},
          lambda: out.print(f"exported {version} → {output} ({format})"))


@registry_app.command("import")
def registry_import(bundle: Path, tag: Annotated[Optional[list[str]], typer.Option(help="extra tags")] = None,
                    registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Publish a bundle written by `registry export`, checking every checksum."""
    if not bundle.is_file():
        raise InvalidArgument(f"no bundle file at {bundle}")
    version = _store(registry).import_bundle(bundle, tuple(tag or ()))
    _emit(as_json, {"artifact": str(version), "digest": version.digest}, lambda: out.print(f"imported {version}"))


@ticket_app.command("show")
def ticket_show(ticket_ref: Annotated[str, typer.Argument(metavar="TICKET")],
                k: Annotated[int, typer.Option("--k", help="dimensions per matrix")] = 3,
                registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Top dimensions per matrix per layer, with out-weighted counts (the paper's Table 1)."""
    from ticketserve.ticket_report import SHORT, load_ticket, top_table

    found, counts = load_ticket(_store(registry), ticket_ref)
    rows = top_table(counts, k)

    def table() -> None:
        grid = Table("layer", *SHORT.values(), title=f"{found.version}: top-{k} dimensions (out-weighted count)")
        for row in rows:
            grid.add_row(str(row["layer"]), *[" ".join(f"{d['dim']}({d['count']})" for d in row.get(c, []))
                                              for c in SHORT.values()])
        out.print(grid)
        details = found.manifest.details
        out.print(f"σ = {details.get('sigma_used'):.3g}, {details.get('outweighted'):,} out-weighted parameters "
                  f"({details.get('outweighted_fraction', 0):.3%}), λ = {details.get('lambda_l1')}")

    _emit(as_json, {"ticket": str(found.version), "k": k, "layers": rows, "details": found.manifest.details}, table)


@ticket_app.command("compare")
def ticket_compare(a: Annotated[str, typer.Argument(metavar="TICKET_A")], b: Annotated[str, typer.Argument(metavar="TICKET_B")],
                   k: Annotated[int, typer.Option("--k")] = 1, trials: int = 200,
                   registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Jaccard similarity of two tickets' (matrix, dimension) sets at k, and of random tickets."""
    from ticketserve import tickets
    from ticketserve.ticket_report import load_ticket, random_floor

    store = _store(registry)
    (found_a, counts_a), (found_b, counts_b) = load_ticket(store, a), load_ticket(store, b)
    if found_a.manifest.backbone.fingerprint != found_b.manifest.backbone.fingerprint:
        raise InvalidArgument(f"{found_a.version} and {found_b.version} were found on different backbones")
    top_a, top_b = tickets.top_k(counts_a, k), tickets.top_k(counts_b, k)
    sizes = {name: len(c) for name, c in counts_a.items()}
    result = {"a": str(found_a.version), "b": str(found_b.version), "k": k,
              "jaccard": tickets.jaccard(top_a, top_b), "random_jaccard": random_floor(top_a, top_b, sizes, trials)}
    _emit(as_json, result, lambda: out.print(
        f"Jaccard({result['a']}, {result['b']}) at k={k}: {result['jaccard']:.3f} "
        f"(random tickets of the same shape: {result['random_jaccard']:.3f})"))


@ticket_app.command("plot")
def ticket_plot(ticket_ref: Annotated[str, typer.Argument(metavar="TICKET")],
                output: Annotated[Path, typer.Option("-o", "--output", help="image file (.png, .pdf, .svg)")],
                registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Draw out-weighted parameters per dimension for every layer and matrix (the paper's Figure 2)."""
    from ticketserve.ticket_report import load_ticket, plot_counts

    found, counts = load_ticket(_store(registry), ticket_ref)
    plot_counts(counts, output, f"{found.version} ({found.manifest.task.name}, {found.manifest.backbone.name})")
    _emit(as_json, {"ticket": str(found.version), "figure": str(output)}, lambda: out.print(f"wrote {output}"))


@ticket_app.command("distance")
def ticket_distance(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")], backbone: BackboneOpt = None,
                    registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Per-matrix L1 and angular distance between a task's effective weights and its backbone."""
    from ticketserve.kinds import get_kind
    from ticketserve.ticket_report import distances

    loaded_backbone, found = _artifact_for(artifact_ref, registry, backbone)
    tuned = get_kind(found.manifest.kind).dense_state(loaded_backbone.model, found.kind_tensors)
    rows = distances(loaded_backbone.model.state_dict(), tuned)

    def table() -> None:
        grid = Table("tensor", "L1", "relative L1", "angular", title=f"{found.version} vs {loaded_backbone.name}")
        for row in rows:
            grid.add_row(row["tensor"], f"{row['l1']:.4g}", f"{row['relative_l1']:.3e}", f"{row['angular']:.3e}")
        out.print(grid)

    _emit(as_json, {"artifact": str(found.version), "distances": rows}, table)


@ticket_app.command("sparsity")
def ticket_sparsity(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")],
                    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="also draw it (.png, .pdf, .svg)")] = None,
                    registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Masked share per layer and matrix of a supermask artifact (the paper's Figure 4)."""
    from ticketserve.ticket_report import SHORT, plot_sparsity, sparsity_grid

    store = _store(registry)
    version = store.resolve(artifact_ref)
    manifest = store.manifest(version)
    if manifest.kind != "supermask":
        raise InvalidArgument(f"{version} is a {manifest.kind!r} artifact, not a supermask")
    grid = sparsity_grid(manifest.details["sparsity_per_matrix"])
    if output is not None:
        plot_sparsity(grid, output, f"{version}: masked weights per layer and matrix")

    def table() -> None:
        view = Table("layer", *SHORT.values(), "word", title=f"{version}: masked share (overall {manifest.details['sparsity']:.2%})")
        for row in grid:
            view.add_row(str(row["layer"]), *[f"{row[c]:.2%}" if c in row else "" for c in (*SHORT.values(), "word")])
        out.print(view)

    _emit(as_json, {"artifact": str(version), "overall": manifest.details["sparsity"], "layers": grid,
                    "figure": str(output) if output else None}, table)


@ticket_app.command("importance")
def ticket_importance(
    task: Annotated[str, typer.Option(help="GLUE task")],
    data_dir: DataDirOpt = None, backbone: BackboneOpt = None,
    train_samples: Optional[int] = None, epochs: int = 3, max_steps: Optional[int] = None, seed: int = 42,
    lr: Optional[float] = None, name: Optional[str] = None, registry: RegistryOpt = None, as_json: JsonOpt = False,
    fine_tuned: Annotated[Optional[str], typer.Option(
        help="score this published full fine-tuning of the task instead of fine-tuning again "
             "(its own settings apply; the training options above are not used)")] = None,
) -> None:
    """Fine-tune (or take --fine-tuned), then score every attention head and FFN (mean |dL/dgate|);
    publishes an importance entry."""
    from ticketserve.backbone import load_backbone
    from ticketserve.tasks import get_task
    from ticketserve.ticket_report import importance_rows
    from trainers.config import TrainConfig
    from trainers.run import train as run_training
    from trainers.supertickets import score_fine_tuned

    spec, loaded, store, name = get_task(task), load_backbone(backbone), _store(registry), name or f"{task}-importance"
    if fine_tuned:
        version, scores = score_fine_tuned(fine_tuned, spec, loaded, store, data_dir, name)
    else:
        config = TrainConfig(epochs=epochs, max_steps=max_steps, seed=seed, lr=lr, train_samples=train_samples)
        outcome = run_training("importance", spec, loaded, config, store, data_dir, name, show_progress=not as_json)
        if outcome.version is None:
            return
        version, scores = outcome.version, outcome.tensors
    rows = importance_rows(scores)

    def show() -> None:
        grid = Table("layer", "heads (L2-normalised per layer)", "FFN", title=f"published {version}")
        for row in rows:
            grid.add_row(str(row["layer"]), " ".join(f"{v:.2f}" for v in row["heads"]), f"{row['ffn']:.3g}")
        out.print(grid)

    _emit(as_json, {"artifact": str(version), "layers": rows}, show)


@ticket_app.command("plot-phase")
def ticket_plot_phase(runs: Annotated[list[str], typer.Argument(metavar="SWEEP...", help="superticket sweeps (e.g. winning, random, losing)")],
                      output: Annotated[Path, typer.Option("-o", "--output", help="image file")],
                      registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Dev metric against pruning level for super-ticket sweeps (the paper's phase transition)."""
    from ticketserve.ticket_report import plot_phase

    store = _store(registry)
    curves = []
    for ref in runs:
        version = store.resolve(ref)
        manifest = store.manifest(version)
        if manifest.kind != "superticket":
            raise InvalidArgument(f"{version} is a {manifest.kind!r} artifact, not a superticket sweep")
        curves.append({"run": str(version), "ticket_type": manifest.details["ticket_type"], "metric": manifest.task.metric,
                       "levels": manifest.details["levels"]})
    plot_phase(curves, output)
    _emit(as_json, {"figure": str(output), "curves": curves}, lambda: out.print(f"wrote {output}"))


def main() -> None:
    try:
        app()
    except TicketserveError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        err.print(f"[red]error:[/] invalid settings: {problems}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
