"""ONNX Runtime execution of the shared encoder, with every task-dependent part a graph input.

The backbone is exported once (dynamic batch, sequence and rows axes) and cached on disk by
fingerprint. Per matrix the graph takes each example's row indices (B, K), row deltas
(B, K, out) and bias delta (B, out), plus head gates (B, L, H) and FFN gates (B, L), so one
session run serves a batch that mixes any row-delta and structure-mask tasks. Tasks of kinds
that need their own weights (supermask, full) run on the torch path, grouped per task.
"""

from __future__ import annotations

import copy
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ticketserve.backbone import Backbone, dense_matrices
from ticketserve.kinds import gates
from ticketserve.kinds.gates import Gates, gating
from ticketserve.kinds.row_delta import RowDeltaLinear
from ticketserve.kinds.routing import Routing
from ticketserve.runtime import Runtime

_ROWS: ContextVar[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None] = ContextVar("onnx_rows", default=None)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class BatchRowLinear(nn.Module):
    """y = x·W + b + x[..., idx_e]·D_e + d_e for each example e, all given as tensors."""

    def __init__(self, base: nn.Linear, name: str):
        super().__init__()
        self.base, self.name = base, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index, delta, bias = _ROWS.get()[self.name]
        picked = torch.gather(x, -1, index.unsqueeze(1).expand(-1, x.shape[1], -1))  # (B, S, K)
        return self.base(x) + torch.einsum("bsk,bko->bso", picked, delta) + bias.unsqueeze(1)


class ExportableEncoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).eval()
        for module in self.encoder.modules():  # a clean copy: no task state of the live runtime
            if isinstance(module, RowDeltaLinear):
                module.clear()
        if hasattr(self.encoder, "_ticketserve_gate_table"):
            self.encoder._ticketserve_gate_table.patterns.clear()
        self.names = list(dense_matrices(self.encoder))
        for name, linear in dense_matrices(self.encoder).items():
            parent, _, child = name.rpartition(".")
            self.encoder.get_submodule(parent).register_module(child, BatchRowLinear(linear, name))
        gates.install(self.encoder)

    def forward(self, input_ids, attention_mask, token_type_ids, head_gates, ffn_gates, *rows):
        token = _ROWS.set({name: rows[3 * i:3 * i + 3] for i, name in enumerate(self.names)})
        try:
            with gating(Gates(head_gates, ffn_gates)):
                return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids).last_hidden_state
        finally:
            _ROWS.reset(token)


def row_input_names(names: list[str]) -> list[str]:
    return [f"{n}.{part}" for n in names for part in ("rows", "delta", "bias")]


def export(backbone: Backbone, path: Path) -> Path:
    """Export the backbone to `path` (an .onnx file, weights in .onnx.data beside it)."""
    model = ExportableEncoder(backbone.model)
    config = backbone.config
    batch, seq, k = 2, 7, 2
    sizes = {n: m.base.out_features for n, m in dense_matrices(model.encoder).items()}
    example = [torch.randint(5, 100, (batch, seq)), torch.ones(batch, seq, dtype=torch.long),
               torch.zeros(batch, seq, dtype=torch.long),
               torch.ones(batch, config.num_hidden_layers, config.num_attention_heads),
               torch.ones(batch, config.num_hidden_layers)]
    for name in model.names:
        out = sizes[name]
        example += [torch.zeros(batch, k, dtype=torch.long), torch.zeros(batch, k, out), torch.zeros(batch, out)]
    B, S, K = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("rows")
    rows_dynamic = [shape for _ in model.names for shape in ({0: B, 1: K}, {0: B, 1: K}, {0: B})]
    dynamic = [{0: B, 1: S}, {0: B, 1: S}, {0: B, 1: S}, {0: B}, {0: B}, tuple(rows_dynamic)]  # *rows is one input
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, tuple(example), str(path), dynamo=True, external_data=True,
                      input_names=[*INPUTS, "head_gates", "ffn_gates", *row_input_names(model.names)],
                      output_names=["last_hidden_state"], dynamic_shapes=tuple(dynamic))
    return path


def cached_export(backbone: Backbone, cache_dir: Path | None = None) -> Path:
    """The exported backbone, built once per fingerprint (concurrent processes wait for one export)."""
    from filelock import FileLock
    from platformdirs import user_cache_dir

    root = Path(cache_dir or Path(user_cache_dir("ticketserve")) / "onnx") / backbone.fingerprint.removeprefix("sha256:")
    path = root / "encoder.onnx"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".export.lock")):
        if not path.exists():
            staging = root / f"staging-{id(backbone)}"
            export(backbone, staging / "encoder.onnx")
            for produced in staging.iterdir():
                produced.replace(root / produced.name)
            staging.rmdir()
    return path


class OnnxRuntime(Runtime):
    """The runtime with the shared encoder on ONNX Runtime: tasks attach exactly as on torch
    (that state is read to build the graph inputs); only the shared forward changes."""

    def __init__(self, backbone: Backbone, device: str | torch.device | None = None, max_length: int = 256,
                 cache_dir: Path | None = None):
        import onnxruntime as ort

        super().__init__(backbone, device="cpu", max_length=max_length)
        self.onnx_path = cached_export(backbone, cache_dir)
        available = ort.get_available_providers()
        wanted = ["CUDAExecutionProvider"] if (device or "").startswith("cuda") or (
            device is None and "CUDAExecutionProvider" in available) else []
        self.session = ort.InferenceSession(str(self.onnx_path),
                                            providers=[p for p in wanted if p in available] + ["CPUExecutionProvider"])

    def hidden(self, encoder: nn.Module, inputs: dict[str, torch.Tensor], routing: Routing) -> torch.Tensor:
        if encoder is not self.encoder:  # a task with weights of its own (supermask, full): torch
            return super().hidden(encoder, inputs, routing)
        feeds = self._feeds(inputs, routing)
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        return torch.from_numpy(hidden)

    def _feeds(self, inputs: dict[str, torch.Tensor], routing: Routing) -> dict[str, np.ndarray]:
        """Graph inputs for one batch, from the same per-task state the torch path applies."""
        batch, config = len(routing.slots), self.backbone.config
        feeds = {name: inputs.get(name, torch.zeros_like(inputs["input_ids"])).cpu().numpy() for name in INPUTS}
        gated = gates.install(self.encoder).for_batch(routing)
        feeds["head_gates"] = (gated[0].expand(batch, -1, -1).numpy() if gated else
                               np.ones((batch, config.num_hidden_layers, config.num_attention_heads), np.float32))
        feeds["ffn_gates"] = gated[1].expand(batch, -1).numpy() if gated else np.ones((batch, config.num_hidden_layers), np.float32)
        for name, layer in dense_matrices(self.encoder).items():
            if isinstance(layer, RowDeltaLinear) and layer.table:
                index, table = layer.table.for_batch(routing)
                delta, bias = table[:, :-1].contiguous(), table[:, -1].contiguous()
            else:
                index, delta, bias = (torch.zeros(batch, 1, dtype=torch.long), torch.zeros(batch, 1, layer.out_features),
                                      torch.zeros(batch, layer.out_features))
            feeds[f"{name}.rows"], feeds[f"{name}.delta"], feeds[f"{name}.bias"] = (
                index.cpu().numpy(), delta.cpu().numpy(), bias.cpu().numpy())
        return feeds
