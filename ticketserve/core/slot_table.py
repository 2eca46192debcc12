"""Per-task rows of padded tensors: the one slot allocator of the kinds that keep their tasks'
tensors side by side (row deltas, LoRA factors, toy kinds in tests).

Row 0 is "no task" (all zero), so a batch gathers one row per example and examples of other
kinds get zeros. Each tensor of the table is a `Column`: `(rows, width, *shape)` where the
width (rows of a row delta, a LoRA rank) grows to the widest task (narrower tasks' rows are
zero-padded), or `(rows, *shape)` without a width. Loading a task writes its
row in place; the table grows by a quarter when full, so a load costs the task's own size,
not a rebuild — and a table's unused rows cost no memory (`_zeroed_pages`). Tensors are
swapped as one tuple: a concurrent forward sees a whole table.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from ticketserve.core.routing import Routing

PAGED_BYTES = 1 << 20  # CPU tables this large live in pages of their own (`_zeroed_pages`)


@dataclass(frozen=True)
class Column:
    shape: tuple[int, ...]  # each entry's shape
    dtype: torch.dtype = torch.float32
    padded: bool = True  # has the growing width axis (after the row axis)


def _zeroed_pages(count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` zeros in an anonymous mapping of their own. The kernel zero-fills a page when it
    is first written, so rows no task has used yet (a quarter of a table just grown) take no
    memory, where torch.zeros writes every byte; and a replaced table's pages go back to the
    system with it, where malloc would keep the old copy (jemalloc, as the image runs it, never
    decays): at 10,000 resident tasks both cost more than the tasks' own bytes."""
    pages = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(pages, dtype=dtype, count=count)  # the tensor keeps the mapping alive


class SlotTable:
    def __init__(self, *columns: Column):
        self.columns = columns
        self.slots: dict[int, tuple[int, int]] = {}  # slot → (table row, its width)
        self.free: list[int] = []
        self.tensors: tuple[torch.Tensor, ...] = tuple(self._empty(c, 1, 1, None) for c in columns)

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def width(self) -> int:
        return next((t.shape[1] for c, t in zip(self.columns, self.tensors) if c.padded), 0)

    @staticmethod
    def _empty(column: Column, rows: int, width: int, device) -> torch.Tensor:
        size = (rows, width, *column.shape) if column.padded else (rows, *column.shape)
        count = math.prod(size)
        if torch.device(device or "cpu").type == "cpu" and count * column.dtype.itemsize >= PAGED_BYTES:
            return _zeroed_pages(count, column.dtype).view(size)
        return torch.zeros(size, dtype=column.dtype, device=device)

    def put(self, slot: int, width: int, values: tuple[torch.Tensor, ...]) -> None:
        """Serve `slot`: each column's value is `(width, *shape)` (padded) or `shape`."""
        self.drop(slot)
        device = values[0].device
        if width > self.width or not self.free:
            grow = 0 if self.free else max(16, len(self.tensors[0]) // 4)
            self._resize(max(self.width, width), len(self.tensors[0]) + grow, device)
        row = self.free.pop()
        with torch.no_grad():
            for column, tensor, value in zip(self.columns, self.tensors, values):
                if column.padded:
                    tensor[row, :width] = value
                else:
                    tensor[row] = value
        self.slots[slot] = (row, width)

    def _resize(self, width: int, rows: int, device) -> None:
        old_width, old_rows = self.width, len(self.tensors[0])
        resized = []
        for column, old in zip(self.columns, self.tensors):
            new = self._empty(column, rows, width, device)
            if not column.padded:
                new[:old_rows] = old.to(device)
            else:
                new[:old_rows, :old_width] = old.to(device)
            resized.append(new)
        self.free += range(rows - 1, old_rows - 1, -1)  # lowest first
        self.tensors = tuple(resized)

    def drop(self, slot: int) -> None:
        if slot in self.slots:
            row = self.slots.pop(slot)[0]
            for tensor in self.tensors:
                tensor[row] = 0
            self.free.append(row)

    def row(self, slot: int) -> tuple[int, int] | None:
        """(table row, width) of a served slot, or None."""
        return self.slots.get(slot)

    def rows_of(self, routing: Routing) -> list[int]:
        """Each example's table row (0: not served here)."""
        return [self.slots[s][0] if s in self.slots else 0 for s in routing.slot_list]

    def gather(self, rows: list[int]) -> tuple[torch.Tensor, ...]:
        """Every column at these table rows (row 0: zeros)."""
        at = torch.tensor(rows, device=self.tensors[0].device)
        # index_select, not table[rows]: the same gather at a third of aten::index's time on CPU (profiled)
        return tuple(tensor.index_select(0, at) for tensor in self.tensors)

    def for_batch(self, routing: Routing) -> tuple[torch.Tensor, ...]:
        """Every column gathered per example (zeros for examples not served here)."""
        return self.gather(self.rows_of(routing))
