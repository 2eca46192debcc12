"""Synthetic task payloads, for tests, benchmarks and load tests: the same random artifacts
everywhere, so a benchmark measures what the tests check."""

from __future__ import annotations

import torch

from ticketserve.core.backbone import Backbone, dense_matrices


def row_delta(backbone: Backbone, k: int = 3, seed: int = 0, bias: bool = True, scale: float = 0.1) -> dict:
    """A `row_delta` payload: k random input rows (+ the bias row) per matrix, random deltas."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in dense_matrices(backbone.model).items():
        rows = torch.randperm(linear.in_features, generator=generator)[:k]
        if bias:
            rows = torch.cat([rows, torch.tensor([linear.in_features])])
        tensors[f"{name}.index"] = rows.int()
        tensors[f"{name}.delta"] = torch.randn(len(rows), linear.out_features, generator=generator) * scale
    return tensors


def masks(backbone: Backbone, zeros: float = 0.2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random keep-masks of every dense matrix, about `zeros` of each switched off (encode them
    with `supermask.encode_masks` for a payload)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.weight.shape, generator=generator) >= zeros
            for name, m in dense_matrices(backbone.model).items()}


def lora(backbone: Backbone, rank: int = 8, seed: int = 0, matrices: tuple[str, ...] | None = None,
         scale: float = 0.01, alpha: float = 16.0) -> dict:
    """A `lora` payload: random factors of `rank` on the matrices whose names end with one of
    `matrices` (default: all six of every block), scaling alpha / rank."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in dense_matrices(backbone.model).items():
        if matrices is None or name.endswith(matrices):
            tensors[f"{name}.lora_A"] = torch.randn(rank, linear.in_features, generator=generator) * scale
            tensors[f"{name}.lora_B"] = torch.randn(linear.out_features, rank, generator=generator) * scale
            tensors[f"{name}.scaling"] = torch.tensor(alpha / rank)
    return tensors
