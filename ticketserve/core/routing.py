"""Which task slot each example of a batch belongs to.

The runtime builds one `Routing` per forward and passes it to the shared encoder
(`SharedEncoder.applying`); terms and gates read it from there. Without a routing, every
example uses DEFAULT_SLOT (training); the runtime's slots start above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Routing:
    """Per-example slots of one batch, with the per-slot row segments computed once. Built
    from a host list, so nothing on the request path waits for the device to read it back."""

    slot_list: list[int]
    device: torch.device | str | None = None
    lengths: list[int] | None = None  # each example's real tokens, where known without a device sync (CPU)
    slots: torch.Tensor = field(init=False)  # (batch,) int64, on `device`
    segments: list[tuple[int, torch.Tensor]] = field(init=False)
    uniform: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.slots = torch.tensor(self.slot_list, dtype=torch.long, device=self.device)
        positions: dict[int, list[int]] = {}
        for i, slot in enumerate(self.slot_list):
            positions.setdefault(slot, []).append(i)
        self.uniform = next(iter(positions)) if len(positions) == 1 else None
        self.segments = [(s, torch.tensor(positions[s], device=self.device)) for s in sorted(positions)]

    @classmethod
    def single(cls, slot: int, batch_size: int, device=None) -> Routing:
        return cls([slot] * batch_size, device)


DEFAULT_SLOT = 0  # used when no routing is given: the slot a trainer trains in
