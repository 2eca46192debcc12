"""Dominant winning tickets (Gong et al.; docs/concepts/methods.md#dominant-tickets): the L1
ticket search, Dominant-k training on a ticket's top rows, and the Random-k control with the
same shape."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from torch import nn

from ticketserve.core import artifact
from ticketserve.core.backbone import dense_matrices
from ticketserve.core.kinds.ticket import counts_of, to_tensors
from ticketserve.core.model import TaskModel
from ticketserve.trainers import tickets
from ticketserve.trainers.base import RunContext, register_method
from ticketserve.trainers.full import FullFineTuning
from ticketserve.trainers.rows import RowMethod, matrix_sizes
from ticketserve.trainers.run import train
from ticketserve.trainers.single import ArtifactMethod
from ticketserve.trainers.ticket_sources import auto_ticket

# the study's cut (benchmarks/studies/dominant.md): 1 % of the parameters out-weighted; an absolute σ
# depends on the backbone, the rate and the training length
DEFAULT_SIGMA_QUANTILE = 0.99
# benchmarks/results/lambda-pilot.jsonl (MRPC, 1 epoch): at 100 the search learns as plain fine-tuning
# does (F1 0.853 vs 0.842 at λ 0), at 1,000 it loses 2 points; the first study's pull (1e-3 on the sum,
# ≈ 10,600 on the mean here) pinned almost every weight and ended at the majority class
LAMBDA_MEAN = 100.0


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lambda_mean: float = Field(
        LAMBDA_MEAN, ge=0, json_schema_extra={"flag": "--lambda-mean"},
        description="weight of the L1 pull on the mean |θ − θ0| over the six matrices (the sum divided by their "
                    "parameter count: each parameter feels λ/N)")
    sigma: float | None = Field(None, gt=0, description="out-weighted threshold on |Δ| (absolute)")
    sigma_quantile: float = Field(DEFAULT_SIGMA_QUANTILE, gt=0, lt=1,
                                  description="σ as this quantile of |Δ| (unless --sigma is given)")

    @model_validator(mode="after")
    def _one_sigma(self) -> SearchOptions:
        if self.sigma is not None and "sigma_quantile" in self.model_fields_set:
            raise ValueError("give sigma or sigma_quantile, not both")
        return self


@register_method
class TicketSearch(ArtifactMethod):
    """L1-regularised full fine-tuning → Δ → out-weighted counts per dimension (kind `ticket`)."""

    name = "ticket-search"
    kind = "ticket"
    default_lr = FullFineTuning.default_lr  # the search is full fine-tuning with an L1 pull
    description = "L1-regularised fine-tuning; publishes per-dimension out-weighted counts (a ticket)"
    Options = SearchOptions

    def trainable(self, model: TaskModel, context: RunContext) -> list[nn.Parameter]:
        self.matrices = dense_matrices(model.encoder)
        self.reference = {name: (m.weight.detach().clone(), m.bias.detach().clone()) for name, m in self.matrices.items()}
        self.theta0 = {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
        return list(model.parameters())

    def penalty(self, model: TaskModel) -> torch.Tensor | None:
        if not self.options.lambda_mean:
            return None
        total = sum((m.weight - w0).abs().sum() + (m.bias - b0).abs().sum()
                    for m, (w0, b0) in zip(self.matrices.values(), self.reference.values()))
        count = sum(w0.numel() + b0.numel() for w0, b0 in self.reference.values())
        return self.options.lambda_mean * total / count

    def export(self, model: TaskModel) -> dict[str, torch.Tensor]:
        deltas = {name: tickets.delta_tilde(m, self.theta0, name) for name, m in self.matrices.items()}
        opts = self.options
        self.sigma = opts.sigma or tickets.sigma_from_quantile(list(deltas.values()), opts.sigma_quantile)
        counts = {name: tickets.count_outweighted(d, self.sigma) for name, d in deltas.items()}
        self.outweighted = int(sum(c.sum() for c in counts.values()))
        self.total = sum(d.numel() for d in deltas.values())
        return to_tensors(counts)

    def restore_theta0(self, model: TaskModel) -> None:
        """Put the pre-trained weights back (the search fine-tuned the shared encoder in place)."""
        model.encoder.load_state_dict(self.theta0)

    def details(self) -> dict:
        return super().details() | {"sigma_used": self.sigma, "outweighted": self.outweighted,
                                    "outweighted_fraction": self.outweighted / self.total}


class DominantOptions(SearchOptions):
    k: int = Field(1, gt=0, description="dimensions per matrix (at most)")
    ticket: str = Field("auto", description="a ticket's registry name; auto: the ticket shipped for this backbone, "
                                            "else the registry's newest found on it, else a search; search: search "
                                            "one on this task first")


@register_method
class Dominant(RowMethod):
    name = "dominant"
    description = "Dominant-k: train the top-k out-weighted rows of each matrix of a ticket (+ head)"
    Options = DominantOptions
    option_scope = {name: "if searching a ticket" for name in SearchOptions.model_fields}  # --ticket search, or auto with none

    def rows(self, model: TaskModel, context: RunContext) -> dict[str, list[int]]:
        ref, self.ticket_source = self.options.ticket, "named"
        if ref == "auto":
            chosen = auto_ticket(context.store, context.backbone)
            ref, self.ticket_source = chosen or (None, "searched")
            if chosen is None and context.show_progress:
                Console(stderr=True).print(
                    f"no ticket for backbone {context.backbone.name} in {context.store.url}: searching one on "
                    f"{context.task.name} first (L1-regularised fine-tuning of every weight for {context.config.epochs} "
                    f"epoch(s), about the cost of `--method full`); later runs on this backbone reuse it")
        elif ref == "search":
            ref, self.ticket_source = None, "searched"
        if ref is None:
            counts = self._search(model, context)
        else:
            found = artifact.load(context.store, ref, context.backbone, expect_kind="ticket")
            self.ticket = f"{found.version}@{found.version.digest}"
            self.ticket_task = ",".join(found.manifest.details.get("tasks", [found.manifest.task.name]))
            counts = counts_of(found.tensors)
        return tickets.top_k(counts, self.options.k)

    def _search(self, model: TaskModel, context: RunContext) -> dict[str, torch.Tensor]:
        search_options = SearchOptions(**self.options.model_dump(include=set(SearchOptions.model_fields), exclude_unset=True))
        config = context.config.model_copy(update={"lr": None})  # the search's own rate, not the rows'
        outcome = train("ticket-search", context.spec, context.backbone, config, context.store,
                        context.data_dir, name=f"{context.spec.name}-ticket", show_progress=context.show_progress,
                        options=search_options.model_dump(), phase=f"ticket search {context.spec.name} 1/2")
        context.phase = f"train {context.spec.name} 2/2"
        outcome.method.restore_theta0(model)
        version = outcome.version
        self.ticket = f"{version}@{version.digest}" if version else None  # None off the main process
        self.ticket_task = context.spec.name
        return counts_of(outcome.tensors)

    def resolved(self) -> dict[str, str]:
        version = self.ticket.partition("@")[0] if self.ticket else None  # name:version@digest
        return {"ticket": version, "ticket_source": self.ticket_source}

    def details(self) -> dict:
        return {"k": self.options.k, "ticket": self.ticket, "ticket_task": self.ticket_task,
                "ticket_source": self.ticket_source} | {
            key: value for key, value in super().details().items() if key in ("rows", "matrices_with_rows")}


class RandomOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(1, gt=0, description="dimensions per matrix, drawn uniformly (seeded by --seed)")


@register_method
class RandomK(RowMethod):
    name = "random"
    description = "Random-k: k uniformly drawn rows of each matrix (+ head); the control for Dominant-k"
    Options = RandomOptions

    def rows(self, model: TaskModel, context: RunContext) -> dict[str, list[int]]:
        self.row_seed = context.config.seed
        return tickets.random_k(matrix_sizes(model.encoder), self.options.k, self.row_seed)

    def details(self) -> dict:
        return super().details() | {"row_seed": self.row_seed}
