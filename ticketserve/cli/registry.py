"""`ticketserve registry`: inspect and manage the artifact registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ticketserve.cli.common import HELP_MARKUP, BackboneOpt, JsonOpt, RegistryOpt, artifact_for, emit, out, store_at
from ticketserve.core.errors import InvalidArgument, TicketserveError

registry_app = typer.Typer(help="Inspect and manage the artifact registry.", no_args_is_help=True,
                           rich_markup_mode=HELP_MARKUP)


@registry_app.command("list")
def registry_list(registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Every artifact name with its versions and tags."""
    from ticketserve.registry import ArtifactVersion

    store = store_at(registry)
    rows = []
    listed = store.listing()  # a broken entry is listed as broken; it never hides the others
    versions = [ArtifactVersion(refs.name, version, digest) for refs in listed
                for version, digest in sorted(refs.versions.items())]
    manifests = dict(zip(versions, store.manifests(versions)))
    for refs in listed:
        if refs.error:
            rows.append({"name": refs.name, "version": None, "error": refs.error})
        for version, digest in sorted(refs.versions.items()):
            row = {"name": refs.name, "version": version, "tags": sorted(t for t, v in refs.tags.items() if v == version),
                   "digest": digest}
            manifest = manifests[ArtifactVersion(refs.name, version, digest)]
            if isinstance(manifest, TicketserveError):
                rows.append(row | {"error": str(manifest)})
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

    emit(as_json, rows, table)


@registry_app.command("show")
def registry_show(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")], registry: RegistryOpt = None,
                  as_json: JsonOpt = False) -> None:
    """The manifest of one version."""
    store = store_at(registry)
    version = store.resolve(artifact_ref)
    manifest = store.manifest(version).model_dump(mode="json")
    payload = {"artifact": str(version), "digest": version.digest, "manifest": manifest}
    emit(as_json, payload, lambda: out.print_json(json.dumps(payload)))


@registry_app.command("verify")
def registry_verify(artifact_refs: Annotated[Optional[list[str]], typer.Argument(metavar="[ARTIFACT]...", help="default: every version")] = None,
                    registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Re-hash manifests and payloads (exit 1 if anything is corrupt or missing); report temp
    files that writers which are gone left behind (`registry gc` removes them)."""
    store = store_at(registry)
    results, refs = [], list(artifact_refs or [])
    if not artifact_refs:  # every version of every name; a name whose versions cannot be read is a failure
        for listed in store.listing():
            if listed.error:
                results.append({"artifact": listed.name, "ok": False, "error": listed.error})
            refs += [f"{listed.name}:{v}" for v in sorted(listed.versions)]
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

    emit(as_json, payload, report)
    if not all(r["ok"] for r in results):
        raise typer.Exit(1)


@registry_app.command("rm")
def registry_rm(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")], registry: RegistryOpt = None,
                as_json: JsonOpt = False) -> None:
    """Remove one version (its bytes go at the next gc)."""
    store = store_at(registry)
    version = store.resolve(artifact_ref)
    store.remove(version)
    emit(as_json, {"removed": str(version)}, lambda: out.print(f"removed {version}"))


@registry_app.command("tag")
def registry_tag(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")], tag: str,
                 registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Point TAG of the artifact's name at this version."""
    store = store_at(registry)
    version = store.resolve(artifact_ref)
    store.set_tag(version.name, tag, version.version)
    emit(as_json, {"tag": f"{version.name}:{tag}", "version": version.version},
          lambda: out.print(f"{version.name}:{tag} → {version}"))


@registry_app.command("gc")
def registry_gc(min_age: Annotated[float, typer.Option(help="keep unreferenced files younger than this (seconds)")] = 3600,
                registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Delete blobs no version references and stale temporary files."""
    counts = store_at(registry).gc(min_age)
    emit(as_json, counts, lambda: out.print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())))


@registry_app.command("export")
def registry_export(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")],
                    output: Annotated[Path, typer.Option("-o", "--output", help="bundle file, or directory for --format peft")],
                    format: Annotated[str, typer.Option(help="bundle (single file for `registry import`) | peft (LoRA adapter dir)")] = "bundle",
                    backbone: BackboneOpt = None, registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Write one version as a verified single-file bundle, or a row_delta as a PEFT adapter."""
    if format == "bundle":
        version = store_at(registry).export_bundle(artifact_ref, output)
    elif format == "peft":
        from ticketserve.formats.peft import export_peft

        loaded_backbone, found = artifact_for(artifact_ref, registry, backbone)
        export_peft(found, loaded_backbone, output)
        version = found.version
    else:
        raise InvalidArgument(f"unknown export format {format!r} (bundle, peft)")
    emit(as_json, {"artifact": str(version), "format": format, "output": str(output)},
          lambda: out.print(f"exported {version} → {output} ({format})"))


@registry_app.command("import")
def registry_import(source: Annotated[Optional[str], typer.Argument(
                        metavar="[SOURCE]", help="a bundle file; with --format peft, hf or sentence-transformers a "
                        "directory or a Hugging Face hub id (sentence-transformers: default the backbone's own)")] = None,
                    format: Annotated[str, typer.Option(help="bundle (written by `registry export`) | peft (a LoRA "
                                                        "adapter written by PeftModel.save_pretrained) | hf (a "
                                                        "fine-tuned *ForSequenceClassification checkpoint) | "
                                                        "sentence-transformers (an embedding model)")] = "bundle",
                    task: Annotated[Optional[str], typer.Option(help="peft, hf: the task the classifier serves "
                                                                "(sst2, mrpc, …)")] = None,
                    name: Annotated[Optional[str], typer.Option(help="peft, hf, sentence-transformers: the artifact "
                                                                "name")] = None,
                    dimensions: Annotated[Optional[list[int]], typer.Option(
                        help="sentence-transformers: a smaller width the model was trained to be cut to "
                        "(Matryoshka); repeatable")] = None,
                    backbone: BackboneOpt = None,
                    tag: Annotated[Optional[list[str]], typer.Option(help="extra tags")] = None,
                    registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Publish a bundle written by `registry export` (every checksum checked); a PEFT LoRA
    adapter of a BERT/RoBERTa sequence classifier as a `lora` artifact; a fine-tuned
    Hugging Face sequence classifier as a `full` artifact; or a sentence-transformers model as
    an embedding task (`plain` on its own base model, else `full`)."""
    store = store_at(registry)
    if source is None and format != "sentence-transformers":
        raise InvalidArgument(f"--format {format} imports a SOURCE: name it")
    if format == "bundle":
        if not Path(source).is_file():
            raise InvalidArgument(f"no bundle file at {source}")
        version = store.import_bundle(Path(source), tuple(tag or ()))
    elif format in ("peft", "hf"):
        from ticketserve.core import artifact
        from ticketserve.core.backbone import load_backbone
        from ticketserve.core.tasks import get_task
        from ticketserve.formats.hf_import import read_classifier
        from ticketserve.formats.peft_import import read_peft

        if task is None or name is None:
            raise InvalidArgument(f"--format {format} needs --task (what the classifier predicts) and --name")
        read = read_peft if format == "peft" else read_classifier
        manifest, tensors = read(source, load_backbone(backbone, store), name, get_task(task))
        version = artifact.publish(store, manifest, tensors, tuple(tag or ()))
    elif format == "sentence-transformers":
        from ticketserve.core import artifact
        from ticketserve.core.backbone import load_backbone
        from ticketserve.formats.sentence_transformers import read_sentence_transformer

        if name is None:
            raise InvalidArgument("--format sentence-transformers needs --name (the embedding task's name)")
        model = load_backbone(backbone, store)
        manifest, tensors = read_sentence_transformer(source or model.source, model, name, dimensions)
        version = artifact.publish(store, manifest, tensors, tuple(tag or ()))
    else:
        raise InvalidArgument(f"unknown import format {format!r} (bundle, peft, hf, sentence-transformers)")
    emit(as_json, {"artifact": str(version), "digest": version.digest}, lambda: out.print(f"imported {version}"))


