"""Per-example gates on every attention head and every FFN block
(docs/concepts/methods.md#super-tickets-and-ticket-share).

transformers 5 ignores `head_mask`, so gates are hooks of our own:
  * head gate: a forward pre-hook on `attention.output.dense` multiplies each head's slice of
    its input (the per-head context, (B, S, H·D) viewed as (B, S, H, D));
  * FFN gate: a forward hook on `output.dense` multiplies its output, so a closed FFN leaves
    LayerNorm(residual) — the super-ticket behaviour.
The attention mask is untouched, so padding stays masked.

Gates come from one of two places, per forward:
  * explicit tensors set with `gating(...)`: heads (B, L, H) or (B, S, L, H) per token, FFN
    (B, L) or (B, S, L) — for importance scores (they may require grad) and training;
  * per-slot tables on the encoder (structure-mask tasks), looked up per example through the
    current routing — for serving a batch that mixes tasks.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from ticketserve.core.backbone import encoder_layers
from ticketserve.core.routing import DEFAULT_SLOT, Routing, current


@dataclass
class Gates:
    heads: torch.Tensor  # (B, L, H) or (B, S, L, H)
    ffn: torch.Tensor  # (B, L) or (B, S, L)


_EXPLICIT: ContextVar[Gates | None] = ContextVar("ticketserve_gates", default=None)


@contextmanager
def gating(gates: Gates):
    token = _EXPLICIT.set(gates)
    try:
        yield gates
    finally:
        _EXPLICIT.reset(token)


class GateTable:
    """Per-slot gate patterns of one encoder: slot → (heads (L, H), ffn (L,)) in {0, 1}.
    A plain object (not a module): it holds no weights and stays out of state dicts."""

    def __init__(self) -> None:
        self.patterns: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def for_batch(self, routing: Routing | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-example (B, L, H) and (B, L) gates for a routing; None = all open."""
        slots = [DEFAULT_SLOT] if routing is None else [s for s, _ in routing.segments]
        if not any(s in self.patterns for s in slots):
            return None
        if routing is None:
            heads, ffn = self.patterns[DEFAULT_SLOT]
            return heads.unsqueeze(0), ffn.unsqueeze(0)
        cached = getattr(routing, "_gate_cache", None)
        if cached is not None and cached[0] is self:
            return cached[1]
        some_heads, some_ffn = next(iter(self.patterns.values()))
        heads = torch.ones((len(routing.slots), *some_heads.shape), device=some_heads.device)
        ffn = torch.ones((len(routing.slots), *some_ffn.shape), device=some_ffn.device)
        for slot, rows in routing.segments:
            if slot in self.patterns:
                heads[rows], ffn[rows] = self.patterns[slot]
        routing._gate_cache = (self, (heads, ffn))  # computed once per forward, not per layer
        return heads, ffn


_TABLES: weakref.WeakKeyDictionary[nn.Module, GateTable] = weakref.WeakKeyDictionary()  # kept here, not on the encoder


def install(encoder: nn.Module) -> GateTable:
    """Hook every layer once; returns the encoder's gate table."""
    table = _TABLES.get(encoder)
    if table is not None:
        return table
    table = _TABLES[encoder] = GateTable()
    num_heads = encoder.config.num_attention_heads
    for index, layer in enumerate(encoder_layers(encoder)):
        layer.attention.output.dense.register_forward_pre_hook(_head_hook(table, index, num_heads))
        layer.output.dense.register_forward_hook(_ffn_hook(table, index))
    return table


def _gates(table: GateTable) -> tuple[torch.Tensor, torch.Tensor] | None:
    explicit = _EXPLICIT.get()
    return (explicit.heads, explicit.ffn) if explicit is not None else table.for_batch(current())


def _head_hook(table: GateTable, index: int, num_heads: int):
    def hook(module: nn.Module, args: tuple):
        gates = _gates(table)
        if gates is None:
            return None
        context = args[0]
        batch, seq, width = context.shape
        g = gates[0][..., index, :]  # (B, H) or (B, S, H)
        g = g.unsqueeze(1) if g.dim() == 2 else g  # → (B, 1|S, H)
        gated = context.view(batch, seq, num_heads, width // num_heads) * g.unsqueeze(-1).to(context.dtype)
        return (gated.view(batch, seq, width), *args[1:])

    return hook


def _ffn_hook(table: GateTable, index: int):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor):
        gates = _gates(table)
        if gates is None:
            return None
        g = gates[1][..., index]  # (B,) or (B, S)
        g = g.view(-1, 1, 1) if g.dim() == 1 else g.unsqueeze(-1)
        return output * g.to(output.dtype)

    return hook
