"""`--quantize int8`: the shared encoder's dense matrices multiplied in int8 on the CPU, with
every task's own term still exact.

Each matrix gets an int8 copy (symmetric, one scale per output channel), prepacked for
torch's quantized CPU kernels (fbgemm / oneDNN: VNNI where the CPU has it); activations are
quantized per call (dynamic quantization) — per token, not per tensor: each row is divided
by its own largest magnitude and one fixed row (1, −1, 0, …) pins the kernel's per-tensor
range to [−1, 1], so a token's result never depends on its batch-mates (a per-tensor range
would make an example's output depend on which requests share its batch, and on padding);
the rows are scaled back after the int8 GEMM, at the same speed (measured). Only the shared product
x·Wᵀ changes: the float32 weights stay (supermask tasks substitute masked copies of them and
run in float32: `linear` finds no int8 copy for a tensor it has not seen), and row deltas,
LoRA factors and gates are computed from the unquantized activations as before.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ticketserve.core.backbone import dense_matrices
from ticketserve.core.errors import InvalidArgument

QUANTIZATIONS = ("none", "int8")
# Without VNNI the x86 kernels add pairs of u8×s8 products in int16, which saturates on 8-bit
# activations: there they take 7 (fbgemm's own advice), which costs a bit of precision, not a wrong sum.
REDUCE_RANGE = not torch.cpu._is_vnni_supported()
PACKED = "_ticketserve_int8"  # the attribute of a weight Parameter that holds its packed int8 copy (it goes with it)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + b: on the int8 copy of `weight` when `quantize_int8` made one, else as F.linear."""
    packed = getattr(weight, PACKED, None)
    if packed is None or x.dtype != torch.float32 or torch.is_grad_enabled() and weight.requires_grad:
        return nn.functional.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    scale = rows.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    normalized = rows.new_empty(len(rows) + 1, rows.shape[1])
    torch.div(rows, scale, out=normalized[:-1])
    normalized[-1].zero_()
    normalized[-1, 0], normalized[-1, 1] = 1.0, -1.0
    y = torch.ops.quantized.linear_dynamic(normalized, packed, REDUCE_RANGE)[:-1].mul_(scale)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y.add_(bias)


def quantize_int8(encoder: nn.Module) -> None:
    """Give every dense matrix of a CPU float32 encoder its int8 copy, which the shared
    encoder's product (`TaskLinear`) then uses."""
    for layer in dense_matrices(encoder).values():
        weight = layer.weight.detach()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise InvalidArgument("--quantize int8 runs float32 encoders on the CPU (dtype float32, device cpu)")
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # torch deprecates quantized tensor types for torchao; the pinned torch has them
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            quantized = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0,
                                                   torch.qint8)
        setattr(layer.weight, PACKED, torch.ops.quantized.linear_prepack(quantized, None))
