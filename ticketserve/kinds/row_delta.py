"""Kind `row_delta`: per matrix, a few rows of W̃ = [Wᵀ; b] replaced by W̃ + Δ (DESIGN.md §1).

Row j < in is input feature j, row `in` is the bias. Applying it needs no dense copy:
    y = x·W + b + x[..., idx_in]·D_in + D_bias
so the base matrices stay shared and each example adds only its own task's rows.
Payload: `<matrix>.index` int32[k'] and `<matrix>.delta` float[k', out] for every matrix
with at least one row (BitFit: the bias row only; Dominant-k: at most k rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ticketserve.backbone import dense_matrices
from ticketserve.errors import CorruptArtifact
from ticketserve.kinds import Kind, Tensors, register_kind
from ticketserve.kinds.routing import DEFAULT_SLOT, Routing, current


class RowDelta(nn.Module):
    """One task's rows for one matrix: input rows (index + delta) and an optional bias delta."""

    def __init__(self, in_index: torch.Tensor, in_delta: torch.Tensor | None,
                 bias_delta: torch.Tensor | None, trainable: bool = False):
        super().__init__()
        self.register_buffer("in_index", in_index.long(), persistent=False)
        if trainable:
            self.in_delta = nn.Parameter(in_delta) if in_delta is not None else None
            self.bias_delta = nn.Parameter(bias_delta) if bias_delta is not None else None
        else:
            self.register_buffer("in_delta", in_delta, persistent=False)
            self.register_buffer("bias_delta", bias_delta, persistent=False)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x·W + b with this task's rows, fused: the bias delta rides in the GEMM's bias and the
        input rows accumulate into its output in place (no full-size temporaries or adds)."""
        if self.bias_delta is not None:
            bias = self.bias_delta.to(x.dtype) if bias is None else bias + self.bias_delta.to(x.dtype)
        y = nn.functional.linear(x, weight, bias)
        if self.in_delta is not None:
            picked = x.index_select(-1, self.in_index)
            y.view(-1, y.shape[-1]).addmm_(picked.reshape(-1, picked.shape[-1]), self.in_delta.to(x.dtype))
        return y

    def to_payload(self, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices, rows = [], []
        if self.in_delta is not None:
            indices.append(self.in_index)
            rows.append(self.in_delta.detach())
        if self.bias_delta is not None:
            indices.append(torch.tensor([in_features], device=self.in_index.device))
            rows.append(self.bias_delta.detach().unsqueeze(0))
        return torch.cat(indices).int().cpu(), torch.cat(rows).cpu().contiguous()

    @classmethod
    def from_payload(cls, index: torch.Tensor, delta: torch.Tensor, in_features: int,
                     trainable: bool = False) -> RowDelta:
        index = index.long()
        is_bias = index == in_features
        in_index = index[~is_bias]
        in_delta = delta[~is_bias].clone() if in_index.numel() else None
        bias_delta = delta[is_bias][0].clone() if is_bias.any() else None
        return cls(in_index, in_delta, bias_delta, trainable)


@dataclass
class StackedRows:
    """Every resident task's rows of one matrix, padded to the widest: table row 0 is "no
    task" (all zero), so a mixed batch needs one lookup + gather + batched matmul per matrix.
    `delta[:, K]` is each task's bias delta: a constant-1 input column picks it up in the same
    matmul as the input rows."""

    row_of: dict[int, int]  # slot → table row
    index: torch.Tensor  # (tasks + 1, K) input rows (0 where padded)
    delta: torch.Tensor  # (tasks + 1, K + 1, out) row deltas (0 where padded), then the bias delta

    def for_batch(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self.row_of.get(s, 0) for s in routing.slot_list], device=self.index.device)
        return self.index[rows], self.delta[rows]


class RowDeltaLinear(nn.Linear):
    """A shared linear layer (same weight and bias Parameters, same state-dict names) plus
    per-slot row deltas, applied per example according to the current routing."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.tasks = nn.ModuleDict()
        self._stacked: StackedRows | None = None

    def set_task(self, slot: int, rows: RowDelta) -> None:
        self.tasks[str(slot)] = rows
        self._stacked = None

    def drop_task(self, slot: int) -> None:
        if str(slot) in self.tasks:
            del self.tasks[str(slot)]
        self._stacked = None

    def stacked(self) -> StackedRows:
        """The padded table of all tasks' rows (rebuilt after any task changes)."""
        if self._stacked is None:
            entries = list(self.tasks.items())
            width = max([e.in_index.numel() for _, e in entries], default=0) or 1
            device = self.weight.device
            index = torch.zeros(len(entries) + 1, width, dtype=torch.long, device=device)
            delta = torch.zeros(len(entries) + 1, width + 1, self.out_features, device=device)
            with torch.no_grad():
                for row, (_, entry) in enumerate(entries, start=1):
                    k = entry.in_index.numel()
                    if entry.in_delta is not None:
                        index[row, :k], delta[row, :k] = entry.in_index, entry.in_delta
                    if entry.bias_delta is not None:
                        delta[row, width] = entry.bias_delta
            self._stacked = StackedRows({int(slot): row for row, (slot, _) in enumerate(entries, start=1)}, index, delta)
        return self._stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = current()
        uniform = DEFAULT_SLOT if routing is None else routing.uniform
        if uniform is not None or not self.tasks:  # one task (or training): its own rows only
            rows = self.tasks[str(uniform)] if str(uniform) in self.tasks else None
            return super().forward(x) if rows is None else rows.linear(x, self.weight, self.bias)
        index, delta = self.stacked().for_batch(routing)
        picked = torch.gather(x, -1, index.unsqueeze(1).expand(-1, x.shape[1], -1))  # (B, S, K)
        picked = torch.cat([picked, picked.new_ones(*picked.shape[:2], 1)], dim=-1)  # + the bias column
        y = super().forward(x)
        return y.baddbmm_(picked, delta.to(x.dtype))  # one in-place pass: y += rows·Δ + bias Δ


def install(encoder: nn.Module) -> dict[str, RowDeltaLinear]:
    """Wrap every dense matrix of the encoder (once); returns the wrappers by matrix name."""
    wrapped = {}
    for name, module in dense_matrices(encoder).items():
        if not isinstance(module, RowDeltaLinear):
            parent_name, _, child = name.rpartition(".")
            module = RowDeltaLinear(module)
            encoder.get_submodule(parent_name).register_module(child, module)
        wrapped[name] = module
    return wrapped


def add_trainable(encoder: nn.Module, slot: int, rows: dict[str, list[int]]) -> list[nn.Parameter]:
    """Zero-initialised trainable deltas for the given rows (row `in` = bias) of each matrix.
    Only these rows get gradients and optimizer state: no dense masked tensors."""
    params = []
    for name, layer in install(encoder).items():
        chosen = sorted(set(rows.get(name, [])))
        if not chosen:
            continue
        index = torch.tensor(chosen, dtype=torch.long, device=layer.weight.device)
        delta = RowDelta.from_payload(index, torch.zeros(len(chosen), layer.out_features, device=index.device),
                                      layer.in_features, trainable=True)
        layer.set_task(slot, delta)
        params += [p for p in delta.parameters()]
    return params


def export(encoder: nn.Module, slot: int) -> Tensors:
    tensors: Tensors = {}
    for name, layer in install(encoder).items():
        if str(slot) in layer.tasks:
            index, delta = layer.tasks[str(slot)].to_payload(layer.in_features)
            tensors[f"{name}.index"], tensors[f"{name}.delta"] = index, delta
    return tensors


def materialize(encoder: nn.Module, tensors: Tensors) -> None:
    """Write the deltas into the dense weights in place (W̃[idx] += Δ) — the reference the
    on-the-fly path must equal, and the way to export to dense formats."""
    state = {}
    for name, linear in dense_matrices(encoder).items():
        state[f"{name}.weight"], state[f"{name}.bias"] = linear.weight, linear.bias
    _add_rows(state, tensors, {key.rsplit(".", 1)[0] for key in tensors})


def _add_rows(state: dict[str, torch.Tensor], tensors: Tensors, names: set[str]) -> None:
    """W̃[idx] += Δ on `<name>.weight` / `<name>.bias` tensors of a state dict, in place."""
    with torch.no_grad():
        for name in names:
            weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
            index, delta = tensors[f"{name}.index"].long(), tensors[f"{name}.delta"].to(weight.dtype)
            is_bias = index == weight.shape[1]
            weight[:, index[~is_bias]] += delta[~is_bias].T
            if is_bias.any():
                bias += delta[is_bias].sum(0)


@register_kind
class RowDeltaKind(Kind):
    name = "row_delta"

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        matrices = dense_matrices(encoder)
        names = {key.rsplit(".", 1)[0] for key in tensors}
        for name in names:
            if name not in matrices:
                raise CorruptArtifact(f"row_delta names matrix {name!r}, which this backbone does not have")
            index, delta = tensors.get(f"{name}.index"), tensors.get(f"{name}.delta")
            if index is None or delta is None or len(tensors) != 2 * len(names):
                raise CorruptArtifact(f"row_delta for {name} needs exactly .index and .delta tensors")
            linear = matrices[name]
            if index.dtype != torch.int32 or index.dim() != 1 or not delta.is_floating_point():
                raise CorruptArtifact(f"row_delta {name}: index must be int32[k], delta float[k, out]")
            if tuple(delta.shape) != (index.numel(), linear.out_features):
                raise CorruptArtifact(
                    f"row_delta {name}: delta shape {tuple(delta.shape)} != ({index.numel()}, {linear.out_features})"
                )
            if index.numel() and (index.min() < 0 or index.max() > linear.in_features or index.unique().numel() != index.numel()):
                raise CorruptArtifact(f"row_delta {name}: indices must be distinct and within 0..{linear.in_features}")

    def attach(self, encoder: nn.Module, slot: int, tensors: Tensors) -> nn.Module:
        wrapped = install(encoder)
        device = next(encoder.parameters()).device
        for name, layer in wrapped.items():
            layer.drop_task(slot)
            if f"{name}.index" in tensors:  # tensors moved first: no per-module .to()
                layer.set_task(slot, RowDelta.from_payload(tensors[f"{name}.index"].to(device),
                                                           tensors[f"{name}.delta"].to(device, torch.float32),
                                                           layer.in_features))
        return encoder

    def detach(self, encoder: nn.Module, slot: int) -> None:
        for layer in install(encoder).values():
            layer.drop_task(slot)

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        changed = {key.rsplit(".", 1)[0] for key in tensors}
        state = {}
        for name, linear in dense_matrices(encoder).items():
            if name in changed:
                state[f"{name}.weight"], state[f"{name}.bias"] = linear.weight.detach().clone(), linear.bias.detach().clone()
        _add_rows(state, tensors, changed)
        return state

