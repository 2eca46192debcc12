"""LoRA (Hu et al.): per chosen matrix, W + s·B·A with A [r, in], B [out, r] trained, s =
alpha / r; everything else frozen but the head. Publishes a `lora` artifact, which serves
mixed with every other kind and exports to a stock PEFT adapter.

The factors train as Parameters of the task model, applied as a term of the shared encoder's
matrices (as the serving kind applies them; autograd-friendly: `y + delta`, not in place); the
term goes when the artifact is exported. A is PEFT's initialisation (Kaiming-uniform), B
starts at zero, so training starts from the backbone's own function.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ticketserve.core.backbone import MATRICES, dense_matrices
from ticketserve.core.model import TaskModel
from ticketserve.core.routing import Routing
from ticketserve.core.shared_encoder import SharedEncoder, Terms
from ticketserve.trainers.base import RunContext, register_method
from ticketserve.trainers.single import ArtifactMethod

SHORT = {suffix.split(".")[-1] if suffix.startswith("attention.self") else suffix.removesuffix(".dense").replace(".", "_"):
         suffix for suffix in MATRICES}  # query, key, value, attention_output, intermediate, output


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, le=256, description="rank of every factor pair")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: s = alpha / r")
    target: str = Field("query,value", description=f"matrices of every block, comma-separated: {', '.join(SHORT)}")

    @field_validator("target")
    @classmethod
    def _known(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = [n for n in names if n not in SHORT]
        if not names or unknown:
            raise ValueError(f"unknown matrix {unknown[0] if unknown else '(none)'}; choose from {', '.join(SHORT)}")
        return ",".join(names)


class LoraFactors(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


TRAINING = "lora-training"  # the term's name on the shared encoder


class TrainingFactors(Terms):
    """y + s·(x·Aᵀ)·Bᵀ on the matrices being trained (every example: training has one task)."""

    def __init__(self, factors: nn.ModuleDict, scaling: float):
        self.factors, self.scaling = factors, scaling

    def add(self, matrix: str, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        key = matrix.replace(".", "/")
        if key not in self.factors:
            return y
        factors = self.factors[key]
        return y + self.scaling * ((x @ factors.A.T) @ factors.B.T)


@register_method
class Lora(ArtifactMethod):
    name = "lora"
    kind = "lora"
    # benchmarks/studies/lora.md: on query,value (the default target) 2e-3 beats 5e-4 on every task
    default_lr = 2e-3
    description = "LoRA factors on chosen matrices + head (lora artifact; PEFT-compatible)"
    Options = LoraOptions

    def trainable(self, model: TaskModel, context: RunContext) -> list[nn.Parameter]:
        suffixes = {SHORT[n] for n in self.options.target.split(",")}
        chosen = {name: linear for name, linear in dense_matrices(model.encoder).items()
                  if name.split(".", 3)[3] in suffixes}  # encoder.layer.N.<suffix>
        model.lora = nn.ModuleDict({name.replace(".", "/"): LoraFactors(linear.in_features, linear.out_features,
                                                                         self.options.r)
                                    for name, linear in chosen.items()})
        self.scaling = self.options.alpha / self.options.r
        self.shared = SharedEncoder(model.encoder)
        self.shared.state(TRAINING, lambda shared: TrainingFactors(model.lora, self.scaling))
        for parameter in model.encoder.parameters():
            parameter.requires_grad_(False)
        return [*model.lora.parameters(), *model.head.parameters()]

    def export(self, model: TaskModel) -> dict[str, torch.Tensor]:
        self.shared.release(TRAINING)
        for parameter in model.encoder.parameters():
            parameter.requires_grad_(True)
        tensors = {}
        for key, factors in model.lora.items():
            name = key.replace("/", ".")
            tensors[f"{name}.lora_A"] = factors.A.detach().cpu().contiguous()
            tensors[f"{name}.lora_B"] = factors.B.detach().cpu().contiguous()
            tensors[f"{name}.scaling"] = torch.tensor(self.scaling)
        del model.lora
        return tensors
