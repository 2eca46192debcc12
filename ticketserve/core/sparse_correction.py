"""Masked weights as a correction of the shared GEMM: x·(W⊙M)ᵀ = x·Wᵀ − x·Cᵀ with
C = W⊙(1−M), the few weights a task switched off. The dense x·Wᵀ runs once for a whole mixed
batch; each example then subtracts its own task's C, stored as a CSR of the masked positions
(row pointers int32, column indices in the narrowest integer type that fits) whose values are
read from W itself at run time — no per-task weight copy.

`subtract` runs the compiled kernel (core/kernels: AVX-512, AVX2 or portable C++, chosen at
run time) on CPU, and the same maths in plain torch (sparse CSR matmul) elsewhere or where
the kernel is not built."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ticketserve.core import kernels

INDEX_TYPES = (torch.uint8, torch.int16, torch.int32)  # narrowest first


@dataclass(frozen=True)
class MaskedPositions:
    """One matrix's masked-out positions of one task: CSR over output rows, no values."""

    row_ptr: torch.Tensor  # int32 (out + 1)
    cols: torch.Tensor  # uint8 / int16 / int32 (nnz)

    @classmethod
    def of(cls, keep: torch.Tensor) -> MaskedPositions:
        """From a boolean keep-mask (out, in): the positions where it is False."""
        out, width = keep.shape
        index_type = next(t for t in INDEX_TYPES if width - 1 <= torch.iinfo(t).max)
        flat = torch.nonzero(~keep.cpu().flatten()).flatten()  # row-major: rows ascending, columns within
        row_ptr = torch.searchsorted(flat, torch.arange(0, (out + 1) * width, width)).to(torch.int32)
        return cls(row_ptr, (flat % width).to(index_type))

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    @property
    def nbytes(self) -> int:
        return self.row_ptr.numel() * 4 + self.cols.numel() * self.cols.element_size()

    def to(self, device: torch.device) -> MaskedPositions:
        return MaskedPositions(self.row_ptr.to(device), self.cols.to(device))

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        """C = W⊙(1−M) as a sparse CSR tensor, values gathered from `weight` (float32)."""
        rows = torch.repeat_interleave(torch.arange(weight.shape[0], device=weight.device),  # output_size: no sync
                                       (self.row_ptr[1:] - self.row_ptr[:-1]).long(), output_size=self.nnz)
        cols = self.cols.long()
        with warnings.catch_warnings():  # torch calls sparse CSR "beta" on every construction: not news
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            return torch.sparse_csr_tensor(self.row_ptr.long(), cols, weight[rows, cols].float(), tuple(weight.shape),
                                           check_invariants=False)


def subtract(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, positions: list[MaskedPositions],
             example_positions: list[int], lengths: list[int] | None = None, level: int | None = None) -> None:
    """y[e] -= x[e]·C_eᵀ in place for each example e with example_positions[e] ≥ 0, C_e being
    the masked weights of `positions[example_positions[e]]` (values read from `weight`).
    y: (B, S, out), x: (B, S, in). `lengths`: each example's real tokens — the kernel leaves
    the padding after them alone (nothing reads it); None: every position. `level` forces a
    kernel level (tests); -1 the torch path."""
    if not positions:
        return
    compiled = y.device.type == "cpu" and kernels.available()
    if level is None:
        level = kernels.best_level() if compiled else -1
    if level < 0 or not compiled:
        _subtract_torch(y, x, weight, positions, example_positions)
        return
    lengths = torch.tensor(lengths if lengths is not None else [x.shape[1]] * len(x), dtype=torch.int64)
    torch.ops.ticketserve.supermask_correct(y, x.contiguous(), weight.detach(), [p.row_ptr for p in positions],
                                            [p.cols for p in positions], torch.tensor(example_positions), lengths, level)


def _subtract_torch(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, positions: list[MaskedPositions],
                    example_positions: list[int]) -> None:
    """The same maths in plain torch, one sparse matmul per task present (float32). The
    examples' indices reach the device in one copy that does not wait for it (pinned memory)."""
    groups: dict[int, list[int]] = {}
    for e, p in enumerate(example_positions):
        if p >= 0 and positions[p].nnz:
            groups.setdefault(p, []).append(e)
    if not groups:
        return
    order = torch.tensor([e for examples in groups.values() for e in examples])
    if y.device.type == "cuda":
        order = order.pin_memory().to(y.device, non_blocking=True)
    start = 0
    for index, examples in groups.items():
        rows = order[start:start + len(examples)]
        start += len(examples)
        picked = x[rows].reshape(-1, x.shape[-1]).float()
        correction = (positions[index].to(y.device).dense(weight.detach()) @ picked.T).T
        y.index_add_(0, rows, correction.reshape(len(examples), x.shape[1], -1).to(y.dtype), alpha=-1)
