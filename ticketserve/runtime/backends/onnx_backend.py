"""The ONNX backend: ONNX Runtime runs the shared encoder, every task-dependent part a graph input.

The backbone is exported once (dynamic batch, sequence and rows axes) and cached on disk by
fingerprint. Per matrix the graph takes each example's row indices (B, K), row deltas
(B, K, out) and bias delta (B, out) and low-rank factors Aᵀ (B, in, R) and (s·B)ᵀ (B, R, out),
plus head gates (B, L, H) and FFN gates (B, L): the `GraphInputs` that kinds with `in_graph`
fill for a batch (row deltas, LoRA, structure masks), so one session run serves a batch that
mixes their tasks. Every other kind — one with an
encoder of its own, or per-task state the graph has no input for — runs on the torch path,
explicitly, grouped as the torch runtime groups it.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ticketserve.core.backbone import Backbone, fresh_copy
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.gates import Gates
from ticketserve.core.routing import Routing
from ticketserve.core.shared_encoder import SharedEncoder, Terms
from ticketserve.runtime.backends.base import Backend, register_backend
from ticketserve.runtime.backends.torch_backend import TorchBackend

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PER_MATRIX = ("rows", "delta", "bias", "lora_a", "lora_b")  # graph inputs of each dense matrix
GRAPH_VERSION = 2  # bump when the exported graph's inputs change: it names the cached file


class GraphTerms(Terms):
    """Every matrix's task terms given as graph inputs, per example e:
    y += x[..., idx_e]·D_e + d_e + (x·Aᵀ_e)·(s·B)ᵀ_e."""

    def __init__(self, shared: SharedEncoder):
        self.inputs: dict[str, tuple[torch.Tensor, ...]] = {}  # matrix → (rows, delta, bias, lora_a, lora_b)

    def add(self, matrix: str, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        index, delta, bias, lora_a, lora_b = self.inputs[matrix]
        picked = torch.gather(x, -1, index.unsqueeze(1).expand(-1, x.shape[1], -1))  # (B, S, K)
        low_rank = torch.bmm(torch.bmm(x, lora_a), lora_b)
        return y + torch.einsum("bsk,bko->bso", picked, delta) + bias.unsqueeze(1) + low_rank


class ExportableEncoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = fresh_copy(encoder)  # none of the live runtime's task state
        self.shared = SharedEncoder(self.encoder)
        self.terms = self.shared.state("graph", GraphTerms)
        self.names = list(self.shared.matrices)

    def forward(self, input_ids, attention_mask, token_type_ids, head_gates, ffn_gates, *per_matrix):
        n = len(PER_MATRIX)
        self.terms.inputs = {name: per_matrix[n * i:n * i + n] for i, name in enumerate(self.names)}
        return self.shared.encode(input_ids, attention_mask, token_type_ids, gates=Gates(head_gates, ffn_gates))


def matrix_input_names(names: list[str]) -> list[str]:
    return [f"{n}.{part}" for n in names for part in PER_MATRIX]


def export(backbone: Backbone, path: Path) -> Path:
    """Export the backbone to `path` (an .onnx file, weights in .onnx.data beside it)."""
    model = ExportableEncoder(backbone.model).eval()
    config = backbone.config
    batch, seq, k, rank = 2, 7, 2, 3
    linears = model.shared.matrices
    example = [torch.randint(5, 100, (batch, seq)), torch.ones(batch, seq, dtype=torch.long),
               torch.zeros(batch, seq, dtype=torch.long),
               torch.ones(batch, config.num_hidden_layers, config.num_attention_heads),
               torch.ones(batch, config.num_hidden_layers)]
    for name in model.names:
        width, out = linears[name].in_features, linears[name].out_features
        example += [torch.zeros(batch, k, dtype=torch.long), torch.zeros(batch, k, out), torch.zeros(batch, out),
                    torch.zeros(batch, width, rank), torch.zeros(batch, rank, out)]
    B, S = torch.export.Dim("batch"), torch.export.Dim("sequence")
    matrix_dynamic = []
    for i in range(len(model.names)):  # row counts and ranks differ between matrices
        K, R = torch.export.Dim(f"rows_{i}"), torch.export.Dim(f"rank_{i}")
        matrix_dynamic += [{0: B, 1: K}, {0: B, 1: K}, {0: B}, {0: B, 2: R}, {0: B, 1: R}]
    dynamic = [{0: B, 1: S}, {0: B, 1: S}, {0: B, 1: S}, {0: B}, {0: B}, tuple(matrix_dynamic)]  # *per_matrix: one input
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # one per dynamic axis that two inputs share: expected, not news
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
        torch.onnx.export(model, tuple(example), str(path), dynamo=True, external_data=True,
                          input_names=[*INPUTS, "head_gates", "ffn_gates", *matrix_input_names(model.names)],
                          output_names=["last_hidden_state"], dynamic_shapes=tuple(dynamic))
    return path


def cached_export(backbone: Backbone, cache_dir: Path | None = None) -> Path:
    """The exported backbone, built once per fingerprint (concurrent processes wait for one export)."""
    from filelock import FileLock
    from platformdirs import user_cache_dir

    root = Path(cache_dir or Path(user_cache_dir("ticketserve")) / "onnx") / backbone.fingerprint.removeprefix("sha256:")
    path = root / f"encoder-v{GRAPH_VERSION}.onnx"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".export.lock")):
        if not path.exists():
            staging = root / f"staging-{id(backbone)}"
            export(backbone, staging / path.name)
            for produced in staging.iterdir():
                produced.replace(root / produced.name)
            staging.rmdir()
    return path


@register_backend
class OnnxBackend(Backend):
    """The shared encoder on ONNX Runtime: tasks attach exactly as on torch (their kinds then
    express that state as graph inputs); the kinds without a graph form, and tasks with an
    encoder of their own, run on torch."""

    name = "onnx"

    def __init__(self, shared: SharedEncoder, backbone: Backbone, device: str | None, cache_dir: Path | None = None):
        import onnxruntime as ort

        super().__init__(shared, backbone, device)
        self.torch = TorchBackend(shared, backbone, device)
        self.onnx_path = cached_export(backbone, cache_dir)
        available = ort.get_available_providers()
        wanted = ["CUDAExecutionProvider"] if (device or "").startswith("cuda") or (
            device is None and "CUDAExecutionProvider" in available) else []
        self.session = ort.InferenceSession(str(self.onnx_path),
                                            providers=[p for p in wanted if p in available] + ["CPUExecutionProvider"])
        self.shapes = {name: (layer.in_features, layer.out_features) for name, layer in shared.matrices.items()}

    @classmethod
    def placement(cls, device, dtype: torch.dtype, quantize: str) -> torch.device:
        """Tasks and their inputs stay on the host (the session places the graph itself)."""
        if dtype != torch.float32 or quantize != "none":
            raise InvalidArgument("the ONNX backend runs the encoder in float32: --dtype and --quantize need "
                                  "--backend torch")
        return torch.device("cpu")

    def group(self, task) -> Hashable:
        """Tasks the graph can express share one session run; the rest run on torch."""
        in_graph = task.encoder is self.shared.module and task.kind.in_graph
        return ("graph", None) if in_graph else ("torch", self.torch.group(task))

    def hidden(self, tasks, inputs: dict[str, torch.Tensor], routing: Routing) -> torch.Tensor:
        if self.group(tasks[0])[0] == "torch":
            return self.torch.hidden(tasks, inputs, routing)
        feeds = Feeds(self.backbone.config, self.shapes, inputs, len(routing.slots))
        for kind in {id(task.kind): task.kind for task in tasks}.values():
            kind.feed_graph(self.shared, routing, feeds)
        (hidden,) = self.session.run(["last_hidden_state"], feeds.arrays())
        return torch.from_numpy(hidden)


class Feeds:
    """The graph inputs of one batch: neutral (zero rows and factors, open gates) until kinds fill them."""

    def __init__(self, config, shapes: dict[str, tuple[int, int]], inputs: dict[str, torch.Tensor], batch: int):
        self.tokens = {name: inputs.get(name, torch.zeros_like(inputs["input_ids"])) for name in INPUTS}
        self.heads = torch.ones(batch, config.num_hidden_layers, config.num_attention_heads)
        self.ffn = torch.ones(batch, config.num_hidden_layers)
        self.batch, self.shapes = batch, shapes  # (in, out) per matrix
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_rows(self, matrix: str, index: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor) -> None:
        index, delta, bias = index.cpu(), delta.cpu(), bias.cpu()
        if matrix in self.rows:  # a second kind's rows for this matrix: side by side
            old_index, old_delta, old_bias = self.rows[matrix]
            index, delta, bias = torch.cat([old_index, index], 1), torch.cat([old_delta, delta], 1), old_bias + bias
        self.rows[matrix] = (index, delta, bias)

    def add_low_rank(self, matrix: str, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.cpu(), b.cpu()
        if matrix in self.low_rank:  # ranks side by side: the products add up
            old_a, old_b = self.low_rank[matrix]
            a, b = torch.cat([old_a, a], 2), torch.cat([old_b, b], 1)
        self.low_rank[matrix] = (a, b)

    def set_gates(self, heads: torch.Tensor, ffn: torch.Tensor) -> None:
        self.heads, self.ffn = heads.cpu(), ffn.cpu()

    def arrays(self) -> dict[str, np.ndarray]:
        feeds = {name: t.cpu().numpy() for name, t in self.tokens.items()}
        feeds["head_gates"], feeds["ffn_gates"] = self.heads.numpy(), self.ffn.numpy()
        for name, (width, out) in self.shapes.items():
            index, delta, bias = self.rows.get(name) or (torch.zeros(self.batch, 1, dtype=torch.long),
                                                         torch.zeros(self.batch, 1, out), torch.zeros(self.batch, out))
            a, b = self.low_rank.get(name) or (torch.zeros(self.batch, width, 1), torch.zeros(self.batch, 1, out))
            for part, tensor in zip(PER_MATRIX, (index, delta, bias, a, b)):
                feeds[f"{name}.{part}"] = tensor.contiguous().numpy()
        return feeds
