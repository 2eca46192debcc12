"""Kind `row_delta`: per matrix, a few rows of W̃ = [Wᵀ; b] replaced by W̃ + Δ
(docs/concepts/methods.md#dominant-tickets).

Row j < in is input feature j, row `in` is the bias. Applying it needs no dense copy:
    y = x·W + b + x[..., idx_in]·D_in + D_bias
so the base matrices stay shared and each example adds only its own task's rows.
Payload: `<matrix>.index` int32[k'] and `<matrix>.delta` float[k', out] for every matrix
with at least one row (BitFit: the bias row only; Dominant-k: at most k rows).
"""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.core.backbone import dense_matrices
from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds.base import GraphInputs, Kind, Tensors, register_kind
from ticketserve.core.quantize import linear as shared_linear
from ticketserve.core.routing import DEFAULT_SLOT, Routing, current


class RowDelta(nn.Module):
    """One task's rows for one matrix: input rows (index + delta) and an optional bias delta —
    as Parameters while a trainer trains them (served tasks live in a `RowTable`)."""

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
        return _fused_linear(x, weight, bias, self.in_index, self.in_delta, self.bias_delta)

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


class RowTable:
    """Every served task's rows of one matrix in one padded table, which is their only copy:
    row 0 is "no task" (all zero), each task owns one row, `delta[:, K]` is its bias delta
    (a constant-1 input column picks it up in the same matmul as the input rows). Rows are
    written in place and the table grows by a quarter when full, so loading a task costs its
    own rows, not a rebuild. Tensors are swapped as one tuple: a concurrent forward sees
    either the old or the new table, never half of each."""

    def __init__(self, out_features: int):
        self.out_features = out_features
        self.slots: dict[int, tuple[int, int, bool]] = {}  # slot → (table row, k, has bias)
        self.free: list[int] = []
        self.tensors = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 2, out_features))  # index, delta

    def __len__(self) -> int:
        return len(self.slots)

    def put(self, slot: int, in_index: torch.Tensor, in_delta: torch.Tensor | None, bias_delta: torch.Tensor | None) -> None:
        self.drop(slot)
        k = in_index.numel() if in_delta is not None else 0
        index, delta = self.tensors
        width = index.shape[1]
        if k > width or not self.free:
            index, delta = self._resized(max(width, k), len(index) + (0 if self.free else max(16, len(index) // 4)), in_index.device)
        row = self.free.pop()
        with torch.no_grad():
            if k:
                index[row, :k], delta[row, :k] = in_index, in_delta
            if bias_delta is not None:
                delta[row, -1] = bias_delta
        self.slots[slot] = (row, k, bias_delta is not None)

    def _resized(self, width: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        old_index, old_delta = self.tensors
        index = torch.zeros(rows, width, dtype=torch.long, device=device)
        delta = torch.zeros(rows, width + 1, self.out_features, device=device)
        old_rows, old_width = old_index.shape
        index[:old_rows, :old_width] = old_index.to(device)
        delta[:old_rows, :old_width] = old_delta[:, :-1].to(device)
        delta[:old_rows, -1] = old_delta[:, -1].to(device)
        self.free += range(rows - 1, old_rows - 1, -1)  # lowest first
        self.tensors = (index, delta)
        return index, delta

    def drop(self, slot: int) -> None:
        if slot in self.slots:
            row = self.slots.pop(slot)[0]
            index, delta = self.tensors
            index[row], delta[row] = 0, 0
            self.free.append(row)

    def for_batch(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's input rows (B, K) and row deltas + bias delta (B, K + 1, out)."""
        index, delta = self.tensors
        rows = torch.tensor([self.slots[s][0] if s in self.slots else 0 for s in routing.slot_list], device=index.device)
        return index[rows], delta[rows]

    def linear(self, slot: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One task's x·W + b with its rows, fused as in `RowDelta.linear`, reading views of its table row."""
        row, k, has_bias = self.slots[slot]
        index, delta = self.tensors
        return _fused_linear(x, weight, bias, index[row, :k], delta[row, :k] if k else None,
                             delta[row, -1] if has_bias else None)


def _fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_index: torch.Tensor,
                  in_delta: torch.Tensor | None, bias_delta: torch.Tensor | None) -> torch.Tensor:
    """x·W + b with one task's rows: the bias delta rides in the GEMM's bias and the input rows
    accumulate into its output in place (no full-size temporaries or adds)."""
    if bias_delta is not None:
        bias = bias_delta.to(x.dtype) if bias is None else bias + bias_delta.to(x.dtype)
    y = shared_linear(x, weight, bias)
    if in_delta is not None:
        picked = x.index_select(-1, in_index)
        y.view(-1, y.shape[-1]).addmm_(picked.reshape(-1, picked.shape[-1]), in_delta.to(x.dtype))
    return y


class RowDeltaLinear(nn.Linear):
    """A shared linear layer (same weight and bias Parameters, same state-dict names) plus
    per-slot row deltas, applied per example according to the current routing: served tasks
    live in one `RowTable`, a task being trained in `trainable` (its rows are Parameters)."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(self, hooks).update(getattr(base, hooks))  # what other kinds hung on the layer stays on it
        self.trainable = nn.ModuleDict()
        self.table = RowTable(self.out_features)

    def set_trainable(self, slot: int, rows: RowDelta) -> None:
        self.drop_task(slot)
        self.trainable[str(slot)] = rows

    def serve(self, slot: int, index: torch.Tensor, delta: torch.Tensor) -> None:
        """Put a payload's rows (`.index`, `.delta`) into the table under `slot`."""
        self.drop_task(slot)
        self.table.put(slot, *split_payload(index.to(self.weight.device), delta.to(self.weight.device, torch.float32),
                                            self.in_features))

    def drop_task(self, slot: int) -> None:
        if str(slot) in self.trainable:
            del self.trainable[str(slot)]
        self.table.drop(slot)

    def has_task(self, slot: int) -> bool:
        return str(slot) in self.trainable or slot in self.table.slots

    def clear(self) -> None:
        self.trainable.clear()
        self.table = RowTable(self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = current()
        uniform = DEFAULT_SLOT if routing is None else routing.uniform
        if uniform is not None or not self.table:  # one task (or training): its own rows only
            if str(uniform) in self.trainable:
                return self.trainable[str(uniform)].linear(x, self.weight, self.bias)
            if uniform in self.table.slots:
                return self.table.linear(uniform, x, self.weight, self.bias)
            return shared_linear(x, self.weight, self.bias)
        index, delta = self.table.for_batch(routing)
        picked = torch.gather(x, -1, index.unsqueeze(1).expand(-1, x.shape[1], -1))  # (B, S, K)
        picked = torch.cat([picked, picked.new_ones(*picked.shape[:2], 1)], dim=-1)  # + the bias column
        y = shared_linear(x, self.weight, self.bias)
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
        layer.set_trainable(slot, delta)
        params += [p for p in delta.parameters()]
    return params


def export(encoder: nn.Module, slot: int) -> Tensors:
    tensors: Tensors = {}
    for name, layer in install(encoder).items():
        if str(slot) in layer.trainable:
            index, delta = layer.trainable[str(slot)].to_payload(layer.in_features)
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

    def attach(self, encoder: nn.Module, slot: int, tensors: Tensors) -> nn.Module:
        for name, layer in install(encoder).items():
            if f"{name}.index" in tensors:
                layer.serve(slot, tensors[f"{name}.index"], tensors[f"{name}.delta"])
            else:
                layer.drop_task(slot)
        return encoder

    def detach(self, encoder: nn.Module, slot: int) -> None:
        for layer in install(encoder).values():
            layer.drop_task(slot)

    def feed_graph(self, encoder: nn.Module, routing: Routing, inputs: GraphInputs) -> None:
        for name, layer in install(encoder).items():
            if layer.table:
                index, table = layer.table.for_batch(routing)
                inputs.add_rows(name, index, table[:, :-1], table[:, -1])

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        changed = {key.rsplit(".", 1)[0] for key in tensors}
        state = {}
        for name, linear in dense_matrices(encoder).items():
            if name in changed:
                state[f"{name}.weight"], state[f"{name}.bias"] = linear.weight.detach().clone(), linear.bias.detach().clone()
        _add_rows(state, tensors, changed)
        return state

