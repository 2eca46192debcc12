"""Kind `lora`: per matrix, a low-rank update W + s·B·A (the adapters PEFT trains, LoRA).

Payload, for every matrix the adapter changes: `<matrix>.lora_A` float[r, in],
`<matrix>.lora_B` float[out, r] and `<matrix>.scaling` float[] (PEFT's alpha / r). Ranks may
differ between matrices and between tasks. Applying it needs no merged copy:
    y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ
added into the shared product in place, per example: a term of the shared encoder's matrices
(`LoraFactors`), so it mixes with every other kind that shares the backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.core import kernels
from ticketserve.core.backbone import dense_matrices
from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds.base import GraphInputs, Kind, Tensors, register_kind
from ticketserve.core.routing import DEFAULT_SLOT, Routing
from ticketserve.core.shared_encoder import SharedEncoder, Terms
from ticketserve.core.slot_table import Column, SlotTable

SUFFIXES = (".lora_A", ".lora_B", ".scaling")


class LoraFactors(Terms):
    """Every served task's factors on one shared encoder: per matrix one `SlotTable` padded to
    the largest rank among them, in the layouts the batched matmuls read fastest: A (rows, R,
    in) as PEFT stores it (x·Aᵀ reads it transposed: 2× faster than a stored Aᵀ for R ≪ in,
    measured) and (s·B)ᵀ (rows, R, out), the scaling folded in."""

    def __init__(self, shared: SharedEncoder):
        self.tables = {name: SlotTable(Column((layer.in_features,)), Column((layer.out_features,)))
                       for name, layer in shared.matrices.items()}

    def put(self, slot: int, matrix: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Serve `slot` with factors a (r, in) and b (out, r), b already scaled."""
        self.tables[matrix].put(slot, a.shape[0], (a, b.T))

    def drop(self, slot: int) -> None:
        for table in self.tables.values():
            table.drop(slot)

    def for_batch(self, matrix: str, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's Aᵀ (B, in, R) and (s·B)ᵀ (B, R, out), zero for examples without factors."""
        table_a, table_b = self.tables[matrix].for_batch(routing)
        return table_a.transpose(1, 2), table_b

    def add(self, matrix: str, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        """y += s·(x·Aᵀ)·Bᵀ in place, each example with its own task's factors (none: nothing)."""
        table = self.tables[matrix]
        if not table:
            return y
        if routing is None or routing.uniform is not None:
            found = table.row(DEFAULT_SLOT if routing is None else routing.uniform)
            if found is not None:
                (row, rank), (table_a, table_b) = found, table.tensors
                low = x.reshape(-1, x.shape[-1]) @ table_a[row, :rank].T.to(x.dtype)
                y.view(-1, y.shape[-1]).addmm_(low, table_b[row, :rank].to(x.dtype))
            return y
        rows = table.rows_of(routing)
        mine = [i for i, row in enumerate(rows) if row]
        if not mine:
            return y
        if gather_free(x, y):
            add_in_place(y, x, table.tensors, rows, routing.lengths)
            return y
        factor_a, factor_b = table.gather([rows[i] for i in mine])
        factor_a, factor_b = factor_a.to(x.dtype), factor_b.to(x.dtype)  # A (n, R, in), (s·B)ᵀ (n, R, out)
        if len(mine) == len(rows):  # every example has factors: accumulate into y in place
            return y.baddbmm_(low_rank(factor_a, x), factor_b)
        examples = torch.tensor(mine, device=x.device)
        return y.index_add_(0, examples, torch.bmm(low_rank(factor_a, x[examples]), factor_b))


def gather_free(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the compiled kernel takes this product: float32 on CPU, nothing to differentiate."""
    return (y.device.type == "cpu" and y.dtype == x.dtype == torch.float32 and x.dim() == 3 and y.is_contiguous()
            and not (x.requires_grad or y.requires_grad) and kernels.available())


def add_in_place(y: torch.Tensor, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], rows: list[int],
                 lengths: list[int] | None, level: int | None = None) -> None:
    """y[e] += (x[e]·A_eᵀ)·(s·B_e)ᵀ over each example's real tokens (`lengths`; None: all), the
    factors read in place from the tables at the example's row (0: none) by the compiled kernel
    (core/kernels/lora_gather_free.cpp; `level` forces its dispatch level, for tests)."""
    table_a, table_b = tables
    lengths = lengths if lengths is not None else [x.shape[1]] * len(rows)
    torch.ops.ticketserve.lora_add(y, x.contiguous(), table_a, table_b, torch.tensor(rows, dtype=torch.int64),
                                   torch.tensor(lengths, dtype=torch.int64),
                                   kernels.best_level() if level is None else level)


def low_rank(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x·Aᵀ per example (n, T, R), computed as (A·xᵀ)ᵀ: R ≪ T·in, and the batched matmul with
    the factor on the left runs about twice as fast on CPU (0.07 against 0.16 ms for 32 × 32
    tokens, in 384, R 8; measured) — the transposed view goes into the next product as it is."""
    return torch.bmm(a, x.transpose(1, 2)).transpose(1, 2)


def factors_on(shared: SharedEncoder) -> LoraFactors:
    return shared.state(LoraKind.name, LoraFactors)


def matrices(tensors: Tensors) -> set[str]:
    return {key.rsplit(".", 1)[0] for key in tensors}


def update(tensors: Tensors, name: str) -> torch.Tensor:
    """s·B·A of one matrix: the dense update the factors stand for."""
    return tensors[f"{name}.scaling"].float() * (tensors[f"{name}.lora_B"].float() @ tensors[f"{name}.lora_A"].float())


@register_kind
class LoraKind(Kind):
    name = "lora"
    in_graph = True

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        dense = dense_matrices(encoder)
        names = matrices(tensors)
        if not names:
            raise CorruptArtifact("a lora artifact changes at least one matrix")
        for name in names:
            if name not in dense:
                raise CorruptArtifact(f"lora names matrix {name!r}, which this backbone does not have")
            if any(f"{name}{suffix}" not in tensors for suffix in SUFFIXES):
                raise CorruptArtifact(f"lora for {name} needs exactly {', '.join(SUFFIXES)}")
        if len(tensors) != len(SUFFIXES) * len(names):
            raise CorruptArtifact(f"lora tensors are {', '.join(SUFFIXES)} per matrix, nothing else")
        for name in names:
            a, b, scaling = (tensors[f"{name}{suffix}"] for suffix in SUFFIXES)
            linear = dense[name]
            if not (a.is_floating_point() and b.is_floating_point() and scaling.is_floating_point()):
                raise CorruptArtifact(f"lora {name}: factors and scaling must be floating point")
            if a.dim() != 2 or b.dim() != 2 or scaling.dim() != 0 or a.shape[0] < 1 or a.shape[0] != b.shape[1] \
                    or a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
                raise CorruptArtifact(f"lora {name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                                      f"[r, {linear.in_features}] and [{linear.out_features}, r] (scaling: a scalar)")
            if not torch.isfinite(scaling) or not torch.isfinite(a).all() or not torch.isfinite(b).all():
                raise CorruptArtifact(f"lora {name}: factors and scaling must be finite")

    def attach(self, shared: SharedEncoder, slot: int, tensors: Tensors) -> nn.Module:
        state, device = factors_on(shared), shared.device
        state.drop(slot)
        for name in sorted(matrices(tensors)):
            a = tensors[f"{name}.lora_A"].to(device, torch.float32)
            b = tensors[f"{name}.lora_B"].to(device, torch.float32) * tensors[f"{name}.scaling"].float()
            state.put(slot, name, a, b)
        return shared.module

    def detach(self, shared: SharedEncoder, slot: int) -> None:
        factors_on(shared).drop(slot)

    def feed_graph(self, shared: SharedEncoder, routing: Routing, inputs: GraphInputs) -> None:
        state = factors_on(shared)
        for name, table in state.tables.items():
            if table:
                inputs.add_low_rank(name, *state.for_batch(name, routing))

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        return {f"{name}.weight": (encoder.get_submodule(name).weight.detach().float() + update(tensors, name))
                for name in sorted(matrices(tensors))}
