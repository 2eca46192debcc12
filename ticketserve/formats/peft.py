"""Export a `row_delta` artifact as a stock PEFT LoRA adapter.

A k-row delta is exactly a rank-k LoRA: A ∈ R^{k×in} selects the rows (one-hot), B = Dᵀ,
scaling 1 (lora_alpha = r per module). The bias row has no LoRA factor, so it travels the
way PEFT saves biases: `bias="lora_only"` stores the updated bias of every targeted layer.
The task head (pooling + linear) is not a module of the stock encoder; it is written next
to the adapter as `head.safetensors` with the manifest.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from ticketserve.core.artifact import Artifact
from ticketserve.core.backbone import Backbone, dense_matrices
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.kinds.row_delta import RowDelta

ADAPTER = "default"


def export_peft(artifact: Artifact, backbone: Backbone, directory: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    if artifact.manifest.kind != "row_delta":
        raise InvalidArgument(f"{artifact.version} is a {artifact.manifest.kind!r} artifact; PEFT export takes row_delta")
    base = copy.deepcopy(backbone.model)
    matrices = dense_matrices(base)
    rows = {name: RowDelta.from_payload(artifact.tensors[f"{name}.index"], artifact.tensors[f"{name}.delta"].float(),
                                        linear.in_features)
            for name, linear in matrices.items() if f"{name}.index" in artifact.tensors}
    if not rows:
        raise InvalidArgument(f"{artifact.version} changes no matrix: nothing to export")
    ranks = {name: max(row.in_index.numel(), 1) for name, row in rows.items()}  # bias-only layers: a zero factor
    config = LoraConfig(
        r=1, lora_alpha=1, rank_pattern=ranks, alpha_pattern=ranks, target_modules=sorted(rows), lora_dropout=0.0,
        bias="lora_only" if any(row.bias_delta is not None for row in rows.values()) else "none",
        base_model_name_or_path=backbone.source,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, row in rows.items():
            layer = model.base_model.model.get_submodule(name)
            lora_a, lora_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            lora_a.zero_()
            lora_b.zero_()
            if row.in_delta is not None:
                lora_a[torch.arange(row.in_index.numel()), row.in_index] = 1.0
                lora_b.copy_(row.in_delta.T)
            if row.bias_delta is not None:
                layer.base_layer.bias += row.bias_delta
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in artifact.head_tensors.items()}, directory / "head.safetensors")
    (directory / "ticketserve-manifest.json").write_bytes(artifact.manifest.to_bytes())
    return directory
