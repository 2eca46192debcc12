"""Kind `row_delta`: per matrix, a few rows of W̃ = [Wᵀ; b] replaced by W̃ + Δ
(docs/concepts/methods.md#dominant-tickets).

Row j < in is input feature j, row `in` is the bias. Applying it needs no dense copy:
    y = x·W + b + x[..., idx_in]·D_in + D_bias
so the base matrices stay shared and each example adds only its own task's rows (a term of
the shared encoder's matrices, `RowDeltas`).
Payload: `<matrix>.index` int32[k'] and `<matrix>.delta` float[k', out] for every matrix
with at least one row (BitFit: the bias row only; Dominant-k: at most k rows).
"""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.core.backbone import dense_matrices
from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds.base import GraphInputs, Kind, Tensors, register_kind
from ticketserve.core.routing import DEFAULT_SLOT, Routing
from ticketserve.core.shared_encoder import SharedEncoder, Terms
from ticketserve.core.slot_table import Column, SlotTable


class RowDelta(nn.Module):
    """One task's rows for one matrix: input rows (index + delta) and an optional bias delta —
    as Parameters while a trainer trains them (served tasks live in `RowDeltas`' tables)."""

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

    def add_into(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return add_rows(x, y, self.in_index, self.in_delta, self.bias_delta)

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
        in_index, in_delta, bias_delta = split_payload(index, delta, in_features)
        return cls(in_index, None if in_delta is None else in_delta.clone(),
                   None if bias_delta is None else bias_delta.clone(), trainable)


def split_payload(index: torch.Tensor, delta: torch.Tensor, in_features: int):
    """(input rows, their deltas or None, the bias delta or None) of one matrix's payload."""
    index = index.long()
    is_bias = index == in_features
    in_index = index[~is_bias]
    return in_index, (delta[~is_bias] if in_index.numel() else None), (delta[is_bias][0] if is_bias.any() else None)


class RowDeltas(Terms):
    """Every task's rows on one shared encoder: served tasks in one `SlotTable` per matrix,
    which is their only copy, a task being trained in `trainable` (its rows are Parameters).
    A task's rows are its payload's, the bias row included (index `in`, last): in a mixed
    batch it meets a constant-1 input in the same matmul as the input rows, so a task without
    one stores no zeros for it (10,000 resident Dominant-1 tasks hold their payloads' bytes)."""

    def __init__(self, shared: SharedEncoder):
        # per matrix: index (rows, K) and delta (rows, K, out); a task's bias row, if any, last
        self.tables = {name: SlotTable(Column((), torch.long), Column((layer.out_features,)))
                       for name, layer in shared.matrices.items()}
        self.in_features = {name: layer.in_features for name, layer in shared.matrices.items()}
        self.trainable: dict[str, dict[int, RowDelta]] = {}  # matrix → slot → rows
        self.biased: set[tuple[str, int]] = set()  # (matrix, slot) whose rows include the bias row

    def serve(self, slot: int, matrix: str, index: torch.Tensor, delta: torch.Tensor) -> None:
        """Put a payload's rows (`.index`, `.delta`) into the matrix's table under `slot`."""
        self.drop(slot, matrix)
        in_features = self.in_features[matrix]
        in_index, in_delta, bias_delta = split_payload(index, delta, in_features)
        if bias_delta is not None:  # the bias row last, whatever the payload's order
            in_index = torch.cat([in_index, in_index.new_full((1,), in_features)])
            in_delta = torch.cat([in_delta if in_delta is not None else delta[:0], bias_delta.unsqueeze(0)])
            self.biased.add((matrix, slot))
        self.tables[matrix].put(slot, in_index.numel(), (in_index, in_delta if in_delta is not None else delta[:0]))

    def drop(self, slot: int, matrix: str | None = None) -> None:
        for name in [matrix] if matrix else list(self.tables):
            self.trainable.get(name, {}).pop(slot, None)
            self.tables[name].drop(slot)
            self.biased.discard((name, slot))

    def add(self, matrix: str, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        table = self.tables[matrix]
        uniform = DEFAULT_SLOT if routing is None else routing.uniform
        if uniform is not None:  # one task (or training): its own rows only
            if uniform in self.trainable.get(matrix, {}):
                return self.trainable[matrix][uniform].add_into(x, y)
            found = table.row(uniform)
            if found is None:
                return y
            (row, width), (index, delta) = found, table.tensors
            k = width - ((matrix, uniform) in self.biased)  # input rows; the bias row follows them
            return add_rows(x, y, index[row, :k], delta[row, :k] if k else None, delta[row, k] if k < width else None)
        rows = table.rows_of(routing)
        if not any(rows):
            return y
        index, delta = table.gather(rows)
        bias_row = index == self.in_features[matrix]  # (B, K): the row that meets the constant-1 input
        picked = torch.gather(x, -1, index.masked_fill(bias_row, 0).unsqueeze(1).expand(-1, x.shape[1], -1))  # (B, S, K)
        picked.masked_fill_(bias_row.unsqueeze(1), 1.0)
        return y.baddbmm_(picked, delta.to(x.dtype))  # one in-place pass: y += rows·Δ + bias Δ


def add_rows(x: torch.Tensor, y: torch.Tensor, in_index: torch.Tensor, in_delta: torch.Tensor | None,
              bias_delta: torch.Tensor | None) -> torch.Tensor:
    """y += x[..., in_index]·in_delta + bias_delta, in place (no full-size temporaries)."""
    if bias_delta is not None:
        y.add_(bias_delta.to(x.dtype))
    if in_delta is not None:
        picked = x.index_select(-1, in_index)
        y.view(-1, y.shape[-1]).addmm_(picked.reshape(-1, picked.shape[-1]), in_delta.to(x.dtype))
    return y


def rows_on(shared: SharedEncoder) -> RowDeltas:
    return shared.state(RowDeltaKind.name, RowDeltas)


def add_trainable(shared: SharedEncoder, slot: int, rows: dict[str, list[int]]) -> list[nn.Parameter]:
    """Zero-initialised trainable deltas for the given rows (row `in` = bias) of each matrix.
    Only these rows get gradients and optimizer state: no dense masked tensors."""
    params, state = [], rows_on(shared)
    for name, layer in shared.matrices.items():
        chosen = sorted(set(rows.get(name, [])))
        state.drop(slot, name)
        if not chosen:
            continue
        index = torch.tensor(chosen, dtype=torch.long, device=layer.weight.device)
        delta = RowDelta.from_payload(index, torch.zeros(len(chosen), layer.out_features, device=index.device),
                                      layer.in_features, trainable=True)
        state.trainable.setdefault(name, {})[slot] = delta
        params += [p for p in delta.parameters()]
    return params


def export(shared: SharedEncoder, slot: int) -> Tensors:
    tensors: Tensors = {}
    state = rows_on(shared)
    for name, by_slot in state.trainable.items():
        if slot in by_slot:
            index, delta = by_slot[slot].to_payload(state.in_features[name])
            tensors[f"{name}.index"], tensors[f"{name}.delta"] = index, delta
    return tensors


def materialize(encoder: nn.Module, tensors: Tensors) -> None:
    """Write the deltas into the dense weights in place (W̃[idx] += Δ) — the reference the
    on-the-fly path must equal, and the way to export to dense formats."""
    state = {}
    for name, linear in dense_matrices(encoder).items():
        state[f"{name}.weight"], state[f"{name}.bias"] = linear.weight, linear.bias
    _write_rows(state, tensors, {key.rsplit(".", 1)[0] for key in tensors})


def _write_rows(state: dict[str, torch.Tensor], tensors: Tensors, names: set[str]) -> None:
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
    in_graph = True

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

    def attach(self, shared: SharedEncoder, slot: int, tensors: Tensors) -> nn.Module:
        state, device = rows_on(shared), shared.device
        for name in shared.matrices:
            if f"{name}.index" in tensors:
                state.serve(slot, name, tensors[f"{name}.index"].to(device),
                            tensors[f"{name}.delta"].to(device, torch.float32))
            else:
                state.drop(slot, name)
        return shared.module

    def detach(self, shared: SharedEncoder, slot: int) -> None:
        rows_on(shared).drop(slot)

    def feed_graph(self, shared: SharedEncoder, routing: Routing, inputs: GraphInputs) -> None:
        state = rows_on(shared)
        for name, table in state.tables.items():
            if table:  # the graph takes the bias rows apart from the input rows
                index, delta = table.for_batch(routing)
                bias_row = (index == state.in_features[name]).unsqueeze(-1)
                inputs.add_rows(name, index.masked_fill(bias_row.squeeze(-1), 0), delta.masked_fill(bias_row, 0),
                                (delta * bias_row).sum(1))

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        changed = {key.rsplit(".", 1)[0] for key in tensors}
        state = {}
        for name, linear in dense_matrices(encoder).items():
            if name in changed:
                state[f"{name}.weight"], state[f"{name}.bias"] = linear.weight.detach().clone(), linear.bias.detach().clone()
        _write_rows(state, tensors, changed)
        return state

