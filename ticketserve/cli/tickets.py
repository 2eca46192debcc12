"""`ticketserve ticket`: inspect, compare and score tickets and structures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ticketserve.cli.common import HELP_MARKUP, BackboneOpt, JsonOpt, RegistryOpt, artifact_for, emit, out, store_at
from ticketserve.core.errors import InvalidArgument

ticket_app = typer.Typer(help="Inspect, compare and plot tickets, masks and super-ticket sweeps.", no_args_is_help=True,
                        rich_markup_mode=HELP_MARKUP)


@ticket_app.command("show")
def ticket_show(ticket_ref: Annotated[str, typer.Argument(metavar="TICKET")],
                k: Annotated[int, typer.Option("--k", help="dimensions per matrix")] = 3,
                registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Top dimensions per matrix per layer, with out-weighted counts (the paper's Table 1)."""
    from ticketserve.trainers.ticket_report import SHORT, load_ticket, top_table

    found, counts = load_ticket(store_at(registry), ticket_ref)
    rows = top_table(counts, k)

    def table() -> None:
        grid = Table("layer", *SHORT.values(), title=f"{found.version}: top-{k} dimensions (out-weighted count)")
        for row in rows:
            grid.add_row(str(row["layer"]), *[" ".join(f"{d['dim']}({d['count']})" for d in row.get(c, []))
                                              for c in SHORT.values()])
        out.print(grid)
        details = found.manifest.details
        if "sources" in details:
            out.print(f"consensus of {', '.join(details['sources'])}: {details['outweighted']:,} out-weighted counts")
        else:
            pull = (f"λ (mean) = {details['lambda_mean']}" if "lambda_mean" in details
                    else f"λ (sum) = {details.get('lambda_l1')}")
            out.print(f"σ = {details.get('sigma_used'):.3g}, {details.get('outweighted'):,} out-weighted parameters "
                      f"({details.get('outweighted_fraction', 0):.3%}), {pull}")

    emit(as_json, {"ticket": str(found.version), "k": k, "layers": rows, "details": found.manifest.details}, table)


@ticket_app.command("compare")
def ticket_compare(a: Annotated[str, typer.Argument(metavar="TICKET_A")], b: Annotated[str, typer.Argument(metavar="TICKET_B")],
                   k: Annotated[int, typer.Option("--k")] = 1, trials: int = 200,
                   registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Jaccard similarity of two tickets' (matrix, dimension) sets at k, and of random tickets."""
    from ticketserve.trainers import tickets
    from ticketserve.trainers.ticket_report import load_ticket, random_floor

    store = store_at(registry)
    (found_a, counts_a), (found_b, counts_b) = load_ticket(store, a), load_ticket(store, b)
    if found_a.manifest.backbone.fingerprint != found_b.manifest.backbone.fingerprint:
        raise InvalidArgument(f"{found_a.version} and {found_b.version} were found on different backbones")
    top_a, top_b = tickets.top_k(counts_a, k), tickets.top_k(counts_b, k)
    sizes = {name: len(c) for name, c in counts_a.items()}
    result = {"a": str(found_a.version), "b": str(found_b.version), "k": k,
              "jaccard": tickets.jaccard(top_a, top_b), "random_jaccard": random_floor(top_a, top_b, sizes, trials)}
    emit(as_json, result, lambda: out.print(
        f"Jaccard({result['a']}, {result['b']}) at k={k}: {result['jaccard']:.3f} "
        f"(random tickets of the same shape: {result['random_jaccard']:.3f})"))


@ticket_app.command("consensus")
def ticket_consensus(tickets: Annotated[list[str], typer.Argument(metavar="TICKET...", help="two or more tickets")],
                     name: Annotated[str, typer.Option(help="the new ticket's artifact name")],
                     registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Publish the consensus of tickets found on one backbone (out-weighted counts summed): a
    ticket for tasks none of them was searched on."""
    from ticketserve.trainers.ticket_sources import publish_consensus

    version = publish_consensus(store_at(registry), tickets, name)
    emit(as_json, {"artifact": str(version), "digest": version.digest, "sources": tickets},
         lambda: out.print(f"published {version}: consensus of {', '.join(tickets)}"))


@ticket_app.command("plot")
def ticket_plot(ticket_ref: Annotated[str, typer.Argument(metavar="TICKET")],
                output: Annotated[Path, typer.Option("-o", "--output", help="image file (.png, .pdf, .svg)")],
                registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Draw out-weighted parameters per dimension for every layer and matrix (the paper's Figure 2)."""
    from ticketserve.trainers.ticket_report import load_ticket, plot_counts

    found, counts = load_ticket(store_at(registry), ticket_ref)
    plot_counts(counts, output, f"{found.version} ({found.manifest.task.name}, {found.manifest.backbone.name})")
    emit(as_json, {"ticket": str(found.version), "figure": str(output)}, lambda: out.print(f"wrote {output}"))


@ticket_app.command("distance")
def ticket_distance(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")], backbone: BackboneOpt = None,
                    registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Per-matrix L1 and angular distance between a task's effective weights and its backbone."""
    from ticketserve.core.kinds import get_kind
    from ticketserve.trainers.ticket_report import distances

    loaded_backbone, found = artifact_for(artifact_ref, registry, backbone)
    tuned = get_kind(found.manifest.kind).dense_state(loaded_backbone.model, found.kind_tensors)
    rows = distances(loaded_backbone.model.state_dict(), tuned)

    def table() -> None:
        grid = Table("tensor", "L1", "relative L1", "angular", title=f"{found.version} vs {loaded_backbone.name}")
        for row in rows:
            grid.add_row(row["tensor"], f"{row['l1']:.4g}", f"{row['relative_l1']:.3e}", f"{row['angular']:.3e}")
        out.print(grid)

    emit(as_json, {"artifact": str(found.version), "distances": rows}, table)


@ticket_app.command("sparsity")
def ticket_sparsity(artifact_ref: Annotated[str, typer.Argument(metavar="ARTIFACT")],
                    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="also draw it (.png, .pdf, .svg)")] = None,
                    registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Masked share per layer and matrix of a supermask artifact (the paper's Figure 4)."""
    from ticketserve.trainers.ticket_report import SHORT, plot_sparsity, sparsity_grid

    store = store_at(registry)
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

    emit(as_json, {"artifact": str(version), "overall": manifest.details["sparsity"], "layers": grid,
                    "figure": str(output) if output else None}, table)


@ticket_app.command("plot-phase")
def ticket_plot_phase(runs: Annotated[list[str], typer.Argument(metavar="SWEEP...", help="superticket sweeps (e.g. winning, random, losing)")],
                      output: Annotated[Path, typer.Option("-o", "--output", help="image file")],
                      registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Dev metric against pruning level for super-ticket sweeps (the paper's phase transition)."""
    from ticketserve.trainers.ticket_report import plot_phase

    store = store_at(registry)
    curves = []
    for ref in runs:
        version = store.resolve(ref)
        manifest = store.manifest(version)
        if manifest.kind != "superticket":
            raise InvalidArgument(f"{version} is a {manifest.kind!r} artifact, not a superticket sweep")
        curves.append({"run": str(version), "ticket_type": manifest.details["ticket_type"], "metric": manifest.task.metric,
                       "levels": manifest.details["levels"]})
    plot_phase(curves, output)
    emit(as_json, {"figure": str(output), "curves": curves}, lambda: out.print(f"wrote {output}"))


