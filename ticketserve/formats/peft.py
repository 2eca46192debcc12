"""Export a `row_delta` or `lora` artifact as a stock PEFT LoRA adapter.

A k-row delta is exactly a rank-k LoRA: A ∈ R^{k×in} selects the rows (one-hot), B = Dᵀ,
scaling 1 (lora_alpha = r per module). The bias row has no LoRA factor, so it travels the
way PEFT saves biases: `bias="lora_only"` stores the updated bias of every targeted layer.
The task head (pooling + linear) is not a module of the stock encoder; it is written next
to the adapter as `head.safetensors` with the manifest. The adapter names its base by hub id
when there is one (a local checkpoint: its path relative to the adapter, flagged in the model
card), targets exactly the matrices it changes (a regex of their full names: PEFT's suffix
list would also catch e.g. the pooler's `dense`), and its model card says what it is.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ticketserve.core.artifact import Artifact
from ticketserve.core.backbone import DEFAULT_BACKBONE, DEFAULT_HUB_ID, Backbone, dense_matrices
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.kinds.row_delta import RowDelta

ADAPTER = "default"
HEAD_FILE, MANIFEST_FILE = "head.safetensors", "ticketserve-manifest.json"  # beside the adapter


def export_peft(artifact: Artifact, backbone: Backbone, directory: Path) -> Path:
    """Write a `row_delta` or `lora` artifact as a stock PEFT LoRA adapter of the encoder, with
    the head, the manifest and a model card beside it."""
    from peft import LoraConfig, get_peft_model

    kind = artifact.manifest.kind
    if kind not in ("row_delta", "lora"):
        raise InvalidArgument(f"{artifact.version} is a {kind!r} artifact; PEFT export takes row_delta and lora")
    base = copy.deepcopy(backbone.model)
    factors = _row_factors(artifact, base) if kind == "row_delta" else _lora_factors(artifact)
    if not factors:
        raise InvalidArgument(f"{artifact.version} changes no matrix: nothing to export")
    ranks = {name: a.shape[0] for name, (a, _, _, _) in factors.items()}
    reference = base_reference(backbone, directory)
    base.name_or_path = reference  # peft records the model's own name over the config's
    config = LoraConfig(
        r=1, lora_alpha=1, rank_pattern=ranks, alpha_pattern={n: s * ranks[n] for n, (_, _, s, _) in factors.items()},
        lora_dropout=0.0, target_modules="|".join(re.escape(name) for name in sorted(factors)),  # matched in full
        bias="lora_only" if any(bias is not None for *_, bias in factors.values()) else "none",
        base_model_name_or_path=reference,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, (a, b, _, bias) in factors.items():
            layer = model.base_model.model.get_submodule(name)
            layer.lora_A[ADAPTER].weight.copy_(a)
            layer.lora_B[ADAPTER].weight.copy_(b)
            if bias is not None:
                layer.base_layer.bias += bias
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in artifact.head_tensors.items()}, directory / HEAD_FILE)
    (directory / MANIFEST_FILE).write_bytes(artifact.manifest.to_bytes())
    (directory / "README.md").write_text(model_card(artifact, backbone, reference))
    return directory


def _row_factors(artifact: Artifact, base) -> dict[str, tuple]:
    """A k-row delta as the rank-k LoRA it is: A selects the rows (one-hot), B = Dᵀ, scaling 1;
    the bias row as a bias update (bias-only layers get a zero factor of rank 1)."""
    factors = {}
    for name, linear in dense_matrices(base).items():
        if f"{name}.index" not in artifact.tensors:
            continue
        row = RowDelta.from_payload(artifact.tensors[f"{name}.index"], artifact.tensors[f"{name}.delta"].float(),
                                    linear.in_features)
        rank = max(row.in_index.numel(), 1)
        a, b = torch.zeros(rank, linear.in_features), torch.zeros(linear.out_features, rank)
        if row.in_delta is not None:
            a[torch.arange(row.in_index.numel()), row.in_index] = 1.0
            b.copy_(row.in_delta.T)
        factors[name] = (a, b, 1.0, row.bias_delta)
    return factors


def _lora_factors(artifact: Artifact) -> dict[str, tuple]:
    names = {key.rsplit(".", 1)[0] for key in artifact.kind_tensors}
    return {name: (artifact.tensors[f"{name}.lora_A"].float(), artifact.tensors[f"{name}.lora_B"].float(),
                   float(artifact.tensors[f"{name}.scaling"]), None) for name in names}


def base_reference(backbone: Backbone, directory: Path) -> str:
    """The base model as a stock machine can find it: its hub id, else its path from the adapter."""
    if backbone.name == DEFAULT_BACKBONE:
        return DEFAULT_HUB_ID
    if not Path(backbone.source).exists():
        return backbone.source  # loaded by hub id
    return os.path.relpath(backbone.source, directory.resolve())


def model_card(artifact: Artifact, backbone: Backbone, base: str) -> str:
    manifest = artifact.manifest
    task, local = manifest.task, Path(backbone.source).exists() and backbone.name != DEFAULT_BACKBONE
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in manifest.metrics.items()) or "not recorded"
    where = (f"a local checkpoint, `{base}` relative to this directory (not on the hub: copy it along)" if local
             else f"[`{base}`](https://huggingface.co/{base})")
    labels = ", ".join(task.labels) if task.labels else "a regression value"
    return f"""---
base_model: {base}
library_name: peft
tags: [ticketserve, lora, {manifest.method}, text-classification]
---

# {manifest.name} — a ticketserve `{manifest.method}` task as a PEFT LoRA adapter

* **Task**: {task.name} ({labels}); primary metric {task.metric}.
* **Metrics** on the evaluation split when trained: {metrics}.
* **Method**: `{manifest.method}` — a row delta of {sum(v.numel() for k, v in artifact.tensors.items() if k.endswith(".index"))} rows
  of W̃ = [Wᵀ; b], written as the exact LoRA it is (A selects rows, B holds the deltas, scaling 1;
  bias rows as `bias="lora_only"`).
* **Base model**: {where}; content fingerprint `{backbone.fingerprint}` (sha256 over the encoder's
  tensor names, dtypes, shapes and bytes). Load the encoder without its pooler.
* **Head**: `head.safetensors` ({manifest.head.pooling} pooling, {"a dense layer + tanh, " if manifest.head.dense else ""}then `weight`/`bias` of a linear
  layer), not a module of the stock encoder. `ticketserve-manifest.json` is the full manifest.

```python
from peft import PeftModel
from transformers import AutoModel

model = PeftModel.from_pretrained(AutoModel.from_pretrained("{base}", add_pooling_layer=False), "PATH/TO/THIS/DIRECTORY")
```
"""


def _what(artifact: Artifact) -> str:
    if artifact.manifest.kind == "lora":
        ranks = sorted({int(v.shape[0]) for k, v in artifact.tensors.items() if k.endswith(".lora_A")})
        matrices = sum(1 for k in artifact.tensors if k.endswith(".lora_A"))
        return f"LoRA factors on {matrices} matrices (ranks {', '.join(map(str, ranks))})"
    rows = sum(v.numel() for k, v in artifact.tensors.items() if k.endswith(".index"))
    return (f"a row delta of {rows} rows of W̃ = [Wᵀ; b], written as the exact LoRA it is (A selects the rows, B "
            "holds the deltas, scaling 1; bias rows as `bias=\"lora_only\"`)")
