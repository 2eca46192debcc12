"""Sphinx extension: writes the reference pages from the code before each build — the HTTP API
from the server's OpenAPI document, the gRPC APIs from the .proto files (with their comments),
the metrics from the server's metric registry, the artifact kinds from the kind registry, and
the command line from the typer app's command tree (every command and flag, as `--help` has
them; typer carries its own copy of click, which sphinx-click does not take), and the module
map from the package tree and its docstrings. The Results page
is written from benchmarks/results/ by benchmarks/results.py (committed, checked
current by the tests). Generated pages are not committed (.gitignore)."""

from __future__ import annotations

import inspect
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent
ROOT = DOCS.parent


def setup(app):
    app.connect("builder-inited", lambda _app: write_pages())
    return {"parallel_read_safe": True}


def write_pages() -> None:
    pages = {"cli": cli_page, "http": http_page, "grpc": grpc_page, "metrics": metrics_page, "kinds": kinds_page,
             "modules": modules_page}
    (DOCS / "reference").mkdir(exist_ok=True)  # every page in it is generated: a fresh clone has none
    for name, page in pages.items():
        path, text = DOCS / "reference" / f"{name}.md", page()
        if not path.exists() or path.read_text() != text:  # unchanged pages keep their mtime: no rebuild
            path.write_text(text)


def cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


# -- the command line ---------------------------------------------------------------------

def cli_page() -> str:
    from cli_command import command, walk

    lines = ["# Command line", "", "Generated from the `ticketserve` command itself: every command, argument and flag "
             "with its default, as `ticketserve COMMAND --help` prints them. `ticketserve train` takes the flags of "
             "every method, each saying which methods take it; `ticketserve methods` lists them per method.", ""]
    for path, cmd, ctx in walk():
        if path == ("ticketserve",):
            continue
        lines += [f"## `{' '.join(path)}`", "", cmd.help.strip() if cmd.help else "", ""]
        params = cmd.get_params(ctx)
        arguments = [p for p in params if p.param_type_name == "argument"]
        options = [p for p in params if p.param_type_name == "option" and not p.hidden and p.name != "help"]
        if hasattr(cmd, "commands"):
            lines += ["| command | |", "|---|---|"]
            lines += [f"| `{' '.join((*path, name))}` | {cell(sub.get_short_help_str(limit=120))} |"
                      for name, sub in sorted(cmd.commands.items()) if not sub.hidden]
            lines.append("")
        if arguments:
            lines += [f"Arguments: {', '.join(f'`{a.name.upper()}`' for a in arguments)}", ""]
        if options:
            lines += ["| flag | default | |", "|---|---|---|"]
            for option in options:
                flags = " / ".join(f"`{o}`" for o in [*option.opts, *option.secondary_opts])
                default = "" if option.default in (None, (), []) or option.is_flag and option.default is False \
                    else f"`{option.default}`"
                lines.append(f"| {flags} | {default} | {cell(option.help)} |")
            lines.append("")
    return "\n".join(lines)


# -- HTTP ---------------------------------------------------------------------------------------

def schema_name(schema: dict) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f"[{name}](#{name.lower()})"
    if schema.get("type") == "array":
        return f"array of {schema_name(schema.get('items', {}))}"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(schema_name(s) for s in schema[key])
    return schema.get("type", "any")


def http_page() -> str:
    from ticketserve.runtime.server.http import openapi_document

    doc = openapi_document()
    lines = ["# HTTP API", "", "Generated from the server's OpenAPI document (`ticketserve openapi` prints it; a running "
             "server serves it at `/openapi.json`). It is also [downloadable](../openapi.json). Every route below is "
             "on `serve --http-port`; the [protocols guide](../guides/protocols.md) says how the doors relate.", ""]
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            lines += [f"## `{method.upper()} {path}`", "", cell(op.get("summary")), ""]
            if op.get("description"):
                lines += [op["description"].strip(), ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | type | required |", "|---|---|---|---|"]
                lines += [f"| `{p['name']}` | {p['in']} | {schema_name(p.get('schema', {}))} | "
                          f"{'yes' if p.get('required') else 'no'} |" for p in params]
                lines.append("")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                lines += [f"Request body: {schema_name(body)}", ""]
            lines += ["| status | meaning | body |", "|---|---|---|"]
            for status, response in op.get("responses", {}).items():
                content = response.get("content", {}).get("application/json", {}).get("schema", {})
                lines.append(f"| {status} | {cell(response.get('description'))} | {schema_name(content) if content else ''} |")
            lines.append("")
    lines += ["## Schemas", ""]
    for name, schema in doc.get("components", {}).get("schemas", {}).items():
        lines += [f"### {name}", "", cell(schema.get("description")), ""]
        properties = schema.get("properties", {})
        if properties:
            required = set(schema.get("required", []))
            lines += ["| field | type | required | description |", "|---|---|---|---|"]
            lines += [f"| `{field}` | {schema_name(spec)} | {'yes' if field in required else 'no'} | "
                      f"{cell(spec.get('description') or spec.get('title'))} |" for field, spec in properties.items()]
            lines.append("")
    return "\n".join(lines)


# -- gRPC -----------------------------------------------------------------------------------------

def descriptors():
    """The FileDescriptorSet of our .proto files with their comments (grpc_tools' protoc)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    protos = ROOT / "protos"
    files = [str(p.relative_to(protos)) for p in sorted(protos.rglob("*.proto"))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        include = Path(protoc.__file__).parent / "_proto"
        code = protoc.main(["protoc", f"-I{protos}", f"-I{include}", "--include_source_info",
                            f"--descriptor_set_out={out}", *files])
        if code != 0:
            raise RuntimeError(f"protoc failed on {files}")
        result = descriptor_pb2.FileDescriptorSet()
        result.ParseFromString(out.read_bytes())
    return result


def _stream(streaming: bool, type_name: str) -> str:
    name = type_name.rsplit(".", 1)[1]
    return f"stream {name}" if streaming else name


def grpc_page() -> str:
    from google.protobuf.descriptor_pb2 import FieldDescriptorProto

    labels = {FieldDescriptorProto.LABEL_REPEATED: "repeated "}
    types = {v: k[len("TYPE_"):].lower() for k, v in FieldDescriptorProto.Type.items()}
    lines = ["# gRPC API", "", "Generated from the .proto files in `protos/` with their comments. The server also "
             "answers `grpc.health.v1.Health` and server reflection (`grpcurl -plaintext 127.0.0.1:50051 list`).", ""]
    for file in descriptors().file:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
        lines += [f"## `{file.package}` ({file.name})", ""]
        for s, service in enumerate(file.service):
            lines += [f"### service `{service.name}`", "", cell(comments.get((6, s))), "",
                      "| method | request | response | |", "|---|---|---|---|"]
            for m, method in enumerate(service.method):
                lines.append(f"| `{method.name}` | {_stream(method.client_streaming, method.input_type)} | "
                             f"{_stream(method.server_streaming, method.output_type)} | {cell(comments.get((6, s, 2, m)))} |")
            lines.append("")
        lines += ["### Messages", ""]

        def message(prefix: str, path: tuple, msg) -> None:
            lines.extend([f"#### `{prefix}{msg.name}`", "", cell(comments.get(path)), ""])
            if msg.field:
                lines.extend(["| field | type | description |", "|---|---|---|"])
                for f, field in enumerate(msg.field):
                    kind = field.type_name.rsplit(".", 1)[-1] if field.type_name else types[field.type]
                    lines.append(f"| `{field.name}` | {labels.get(field.label, '')}{kind} | {cell(comments.get((*path, 2, f)))} |")
                lines.append("")
            for n, nested in enumerate(msg.nested_type):
                if not nested.options.map_entry:
                    message(f"{prefix}{msg.name}.", (*path, 3, n), nested)

        for i, msg in enumerate(file.message_type):
            message("", (4, i), msg)
        for e, enum in enumerate(file.enum_type):
            lines += [f"#### enum `{enum.name}`", "", cell(comments.get((5, e))), "",
                      ", ".join(f"`{v.name}` = {v.number}" for v in enum.value), ""]
    return "\n".join(lines)


# -- metrics and kinds --------------------------------------------------------------------------

def metrics_page() -> str:
    from prometheus_client.metrics import MetricWrapperBase

    from ticketserve.runtime.server.metrics import Metrics, ResidencyCollector

    lines = ["# Metrics", "", "Generated from the server's metric registry: what `serve --metrics-port` exposes for "
             "Prometheus (the [operating guide](../guides/operating.md) says how to use them). Counters carry the "
             "`_total` suffix, histograms `_bucket`/`_sum`/`_count`.", "",
             "| metric | type | labels | meaning |", "|---|---|---|---|"]
    for collector in vars(Metrics()).values():
        if isinstance(collector, MetricWrapperBase | ResidencyCollector):
            names = collector._labelnames if isinstance(collector, MetricWrapperBase) else collector.labels
            for family in collector.describe():
                labels = ", ".join(f"`{label}`" for label in names)
                lines.append(f"| `{family.name}` | {family.type} | {labels} | {cell(family.documentation)} |")
    return "\n".join(lines) + "\n"


def kinds_page() -> str:
    from ticketserve.core.kinds import kinds

    lines = ["# Artifact kinds", "", "Generated from the kind registry: every kind an artifact may have, from the "
             "docstring of the module that implements it. The [artifact format](../concepts/artifact-format.md) says "
             "how an artifact is stored.", "",
             "| kind | a task? | on the ONNX backend | module |", "|---|---|---|---|"]
    registered = kinds()
    for name, kind in sorted(registered.items()):
        module = type(kind).__module__
        lines.append(f"| [`{name}`](#kind-{name.replace('_', '-')}) | {'yes' if kind.is_task else 'no'} | "
                     f"{'yes' if kind.in_graph else 'no'} | `{module}` |")
    lines.append("")
    for name, kind in sorted(registered.items()):
        doc = inspect.getdoc(sys.modules[type(kind).__module__]) or ""
        lines += [f"(kind-{name.replace('_', '-')})=", f"## `{name}`", "", "```text", doc, "```", ""]
    return "\n".join(lines)


# -- the module map ------------------------------------------------------------------------

def modules_page() -> str:
    """Every package and module of the tree with the first paragraph of its docstring."""
    import ast

    lines = ["# Module map", "", "Generated from the tree: every package and module of `ticketserve`, with the "
             "first paragraph of its docstring. [The architecture](../concepts/architecture.md) says how they fit.", ""]
    package = ROOT / "ticketserve"
    for directory in sorted(p for p in [package, *package.rglob("*")] if (p / "__init__.py").is_file()):
        modules = sorted(directory.glob("*.py"))
        if not any(m.name != "__init__.py" for m in modules) and directory != package:
            continue
        lines += [f"## `{directory.relative_to(ROOT).as_posix()}/`", "", "| module | |", "|---|---|"]
        for module in modules:
            doc = ast.get_docstring(ast.parse(module.read_text())) or ""
            lines.append(f"| `{module.name}` | {cell(doc.split(chr(10) + chr(10))[0])} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    write_pages()
