"""Per-example gates on every attention head and every FFN block of a shared encoder
(docs/concepts/methods.md#super-tickets-and-ticket-share).

transformers 5 ignores `head_mask`, so the shared encoder's own dense layers apply them
(`TaskLinear`): a head gate multiplies each head's slice of `attention.output.dense`'s input
(the per-head context, (B, S, H·D) viewed as (B, S, H, D)); an FFN gate multiplies
`output.dense`'s output after every task term, so a closed FFN leaves LayerNorm(residual) —
the super-ticket behaviour. The attention mask is untouched, so padding stays masked.

Gates come from one of two places, per forward:
  * explicit `Gates` passed to the forward: heads (B, L, H) or (B, S, L, H) per token, FFN
    (B, L) or (B, S, L) — for importance scores (they may require grad) and exported graphs;
  * per-slot patterns (structure-mask tasks, a trainer's fixed mask), looked up per example
    through the forward's routing — for serving a batch that mixes tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ticketserve.core.routing import DEFAULT_SLOT, Routing


@dataclass
class Gates:
    heads: torch.Tensor  # (B, L, H) or (B, S, L, H)
    ffn: torch.Tensor  # (B, L) or (B, S, L)


class GateSet:
    """The per-slot gate patterns of one shared encoder: slot → (heads (L, H), ffn (L,)) in {0, 1}."""

    def __init__(self, num_heads: int) -> None:
        self.num_heads = num_heads
        self.patterns: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def for_batch(self, routing: Routing | None) -> Gates | None:
        """Per-example (B, L, H) and (B, L) gates for a routing; None = all open."""
        slots = [DEFAULT_SLOT] if routing is None else [s for s, _ in routing.segments]
        if not any(s in self.patterns for s in slots):
            return None
        if routing is None:
            heads, ffn = self.patterns[DEFAULT_SLOT]
            return Gates(heads.unsqueeze(0), ffn.unsqueeze(0))
        some_heads, some_ffn = next(iter(self.patterns.values()))
        heads = torch.ones((len(routing.slots), *some_heads.shape), device=some_heads.device)
        ffn = torch.ones((len(routing.slots), *some_ffn.shape), device=some_ffn.device)
        for slot, rows in routing.segments:
            if slot in self.patterns:
                heads[rows], ffn[rows] = self.patterns[slot]
        return Gates(heads, ffn)

    def gate_heads(self, gates: Gates, layer: int, context: torch.Tensor) -> torch.Tensor:
        batch, seq, width = context.shape
        g = gates.heads[..., layer, :]  # (B, H) or (B, S, H)
        g = g.unsqueeze(1) if g.dim() == 2 else g  # → (B, 1|S, H)
        gated = context.view(batch, seq, self.num_heads, width // self.num_heads) * g.unsqueeze(-1).to(context.dtype)
        return gated.view(batch, seq, width)

    @staticmethod
    def gate_ffn(gates: Gates, layer: int, output: torch.Tensor) -> torch.Tensor:
        g = gates.ffn[..., layer]  # (B,) or (B, S)
        g = g.view(-1, 1, 1) if g.dim() == 1 else g.unsqueeze(-1)
        return output * g.to(output.dtype)
