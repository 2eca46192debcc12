"""What the command groups share: consoles, common options, JSON-or-table output, and the
registry/artifact/runtime a command works on."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ticketserve.core.errors import TicketserveError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
# --help: rich panels on a terminal; in a pipe plain text (rich cuts long names to fit 80 columns)
HELP_MARKUP = "rich" if sys.stdout.isatty() else None

RegistryOpt = Annotated[Optional[str], typer.Option("--registry", envvar="TICKETSERVE_REGISTRY",
                                                    help="registry URL or directory (default: user cache)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
BackboneOpt = Annotated[Optional[str], typer.Option("--backbone", help="BERT/RoBERTa hub id or path; default: bundled MiniLM (for eval/predict: the artifact's)")]
DtypeOpt = Annotated[str, typer.Option(help="precision of the shared encoder: float32 | bfloat16 | float16 "
                                          "(task terms follow it; heads run in float32)")]
QuantizeOpt = Annotated[str, typer.Option(help="none | int8: the shared dense products in int8 on the CPU (task "
                                              "terms stay exact; needs --dtype float32)")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="directory with <split>.jsonl/.csv/.tsv, or 'sample' for the bundled sample")]


def emit(as_json: bool, payload: Any, human) -> None:
    """`--json`: the payload as plain JSON on stdout, for programs (rich's print_json re-parses
    and highlights it: seconds for a 10,000-entry listing); else the `human` rendering."""
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        human()


def store_at(url: str | None):
    from ticketserve.registry import open_store

    return open_store(url)


def artifact_for(ref: str, registry: str | None, backbone: str | None):
    """The artifact's backbone (or the one given), and the artifact checked against it."""
    from ticketserve.core import artifact
    from ticketserve.core.backbone import load_backbone

    store = store_at(registry)
    version = store.resolve(ref)
    loaded_backbone = load_backbone(backbone or store.manifest(version).backbone.name, store)
    return loaded_backbone, artifact.load(store, version, loaded_backbone)


def runtime_for(ref: str, registry: str | None, backbone: str | None, dtype: str = "float32", quantize: str = "none"):
    """A runtime on the artifact's backbone (or the one given), in `dtype` (and `quantize`),
    serving the artifact."""
    from ticketserve.core.backbone import dtype_named
    from ticketserve.runtime.executor import Runtime

    precision = dtype_named(dtype)  # a typo fails before the backbone loads
    loaded_backbone, found = artifact_for(ref, registry, backbone)
    runtime = Runtime(loaded_backbone, dtype=precision, quantize=quantize)
    return runtime, runtime.add(found)


def rpc(call):
    """Run a client call; its typed errors become one-line user errors naming the status."""
    import grpc

    try:
        return call()
    except grpc.RpcError as exc:  # the client's typed errors are RpcErrors too
        raise TicketserveError(f"server said {exc.code().name}: {exc.details()}") from None
