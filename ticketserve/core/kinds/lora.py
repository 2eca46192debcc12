"""Kind `lora`: per matrix, a low-rank update W + s·B·A (the adapters PEFT trains, LoRA).

Payload, for every matrix the adapter changes: `<matrix>.lora_A` float[r, in],
`<matrix>.lora_B` float[out, r] and `<matrix>.scaling` float[] (PEFT's alpha / r). Ranks may
differ between matrices and between tasks. Applying it needs no merged copy:
    y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ
added into the shared linear's output in place, per example, by a forward hook on the linear
(so it composes with the other kinds that share the backbone: row deltas wrap the same
layers, gates hook them). Served tasks of one matrix live in one `LoraTable`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ticketserve.core.backbone import dense_matrices
from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds.base import GraphInputs, Kind, Tensors, register_kind
from ticketserve.core.routing import DEFAULT_SLOT, Routing, current

SUFFIXES = (".lora_A", ".lora_B", ".scaling")


class LoraTable:
    """Every served task's factors of one matrix, padded to the largest rank among them, in the
    layouts the batched matmuls read fastest: A (rows, R, in) as PEFT stores it (x·Aᵀ reads it
    transposed: 2× faster than a stored Aᵀ for R ≪ in, measured) and (s·B)ᵀ (rows, R, out),
    the scaling folded in; row 0 is "no task" (zero). Loading writes one row in place (the
    table grows when full or when a larger rank arrives); tensors are swapped as one tuple, so
    a concurrent forward sees a whole table."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.slots: dict[int, tuple[int, int]] = {}  # slot → (table row, rank)
        self.free: list[int] = []
        self.tensors = (torch.zeros(1, 1, in_features), torch.zeros(1, 1, out_features))  # A, (s·B)ᵀ

    def __len__(self) -> int:
        return len(self.slots)

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Serve `slot` with factors a (r, in) and b (out, r), b already scaled."""
        self.drop(slot)
        rank = a.shape[0]
        table_a, table_b = self.tensors
        if rank > table_a.shape[1] or not self.free:
            grow = 0 if self.free else max(16, len(table_a) // 4)
            table_a, table_b = self._resized(max(table_a.shape[1], rank), len(table_a) + grow, a.device)
        row = self.free.pop()
        with torch.no_grad():
            table_a[row, :rank], table_b[row, :rank] = a, b.T
        self.slots[slot] = (row, rank)

    def _resized(self, rank: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        old_a, old_b = self.tensors
        table_a = torch.zeros(rows, rank, self.in_features, device=device)
        table_b = torch.zeros(rows, rank, self.out_features, device=device)
        table_a[:len(old_a), :old_a.shape[1]] = old_a.to(device)
        table_b[:len(old_b), :old_b.shape[1]] = old_b.to(device)
        self.free += range(rows - 1, len(old_a) - 1, -1)  # lowest first
        self.tensors = (table_a, table_b)
        return table_a, table_b

    def drop(self, slot: int) -> None:
        if slot in self.slots:
            row = self.slots.pop(slot)[0]
            table_a, table_b = self.tensors
            table_a[row], table_b[row] = 0, 0
            self.free.append(row)

    def rows_of(self, routing: Routing) -> list[int]:
        """Each example's table row (0: no factors here)."""
        return [self.slots[s][0] if s in self.slots else 0 for s in routing.slot_list]

    def for_batch(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's Aᵀ (B, in, R) and (s·B)ᵀ (B, R, out), zero for examples without factors."""
        table_a, table_b = self.tensors
        rows = torch.tensor(self.rows_of(routing), device=table_a.device)
        return table_a.index_select(0, rows).transpose(1, 2), table_b.index_select(0, rows)

    def add_into(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y += s·(x·Aᵀ)·Bᵀ in place, each example with its own task's factors (none: nothing)."""
        routing = current()
        table_a, table_b = self.tensors
        if routing is None or routing.uniform is not None:
            slot = DEFAULT_SLOT if routing is None else routing.uniform
            if slot in self.slots:
                row, rank = self.slots[slot]
                low = x.reshape(-1, x.shape[-1]) @ table_a[row, :rank].T.to(x.dtype)
                y.view(-1, y.shape[-1]).addmm_(low, table_b[row, :rank].to(x.dtype))
            return
        rows = self.rows_of(routing)
        mine = [i for i, row in enumerate(rows) if row]
        if not mine:
            return
        picked = torch.tensor([rows[i] for i in mine], device=table_a.device)
        # index_select, not table[picked]: the same gather at a third of aten::index's time on CPU (profiled)
        factor_a = table_a.index_select(0, picked).to(x.dtype).transpose(1, 2)  # Aᵀ
        factor_b = table_b.index_select(0, picked).to(x.dtype)  # (s·B)ᵀ
        if len(mine) == len(rows):  # every example has factors: accumulate into y in place
            y.baddbmm_(torch.bmm(x, factor_a), factor_b)
            return
        examples = torch.tensor(mine, device=x.device)
        y.index_add_(0, examples, torch.bmm(torch.bmm(x[examples], factor_a), factor_b))


_TABLES: weakref.WeakKeyDictionary[nn.Module, dict[str, LoraTable]] = weakref.WeakKeyDictionary()


def install(encoder: nn.Module) -> dict[str, LoraTable]:
    """Hook every dense matrix of the encoder once; returns its tables by matrix name. The hook
    holds its table, so it keeps working on a layer that another kind wraps later (row
    deltas copy a layer's hooks onto their wrapper)."""
    tables = _TABLES.get(encoder)
    if tables is None:
        tables = _TABLES[encoder] = {}
        for name, linear in dense_matrices(encoder).items():
            table = tables[name] = LoraTable(linear.in_features, linear.out_features)
            linear.register_forward_hook(_hook(table))
    return tables


def _hook(table: LoraTable):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor):
        if table:
            table.add_into(output, args[0])

    return hook


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

    def attach(self, encoder: nn.Module, slot: int, tensors: Tensors) -> nn.Module:
        changed = matrices(tensors)
        for name, table in install(encoder).items():
            if name in changed:
                weight = encoder.get_submodule(name).weight
                a = tensors[f"{name}.lora_A"].to(weight.device, torch.float32)
                b = tensors[f"{name}.lora_B"].to(weight.device, torch.float32) * tensors[f"{name}.scaling"].float()
                table.put(slot, a, b)
            else:
                table.drop(slot)
        return encoder

    def detach(self, encoder: nn.Module, slot: int) -> None:
        for table in install(encoder).values():
            table.drop(slot)

    def feed_graph(self, encoder: nn.Module, routing: Routing, inputs: GraphInputs) -> None:
        for name, table in install(encoder).items():
            if table:
                inputs.add_low_rank(name, *table.for_batch(routing))

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        return {f"{name}.weight": (encoder.get_submodule(name).weight.detach().float() + update(tensors, name))
                for name in sorted(matrices(tensors))}
