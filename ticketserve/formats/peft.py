"""Export a `row_delta` or `lora` artifact as a stock PEFT LoRA adapter.

A k-row delta is exactly a rank-k LoRA: A ∈ R^{k×in} selects the rows (one-hot), B = Dᵀ,
scaling 1 (lora_alpha = r per module). The bias row has no LoRA factor, so it travels the
way PEFT saves biases: `bias="lora_only"` stores the updated bias of every targeted layer.
A head that is Hugging Face's (dense + tanh on the first token: imported from a classifier)
makes a stock `SEQ_CLS` adapter of `*ForSequenceClassification`, the head in its classifier;
any other head (mean pooling, as our trainers' default) is not a module of a stock model and
is written next to an adapter of the bare encoder as `head.safetensors`. The adapter names its base by hub id
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
from torch import nn

from ticketserve.core.artifact import Artifact
from ticketserve.core.backbone import DEFAULT_BACKBONE, DEFAULT_HUB_ID, Backbone, dense_matrices
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.kinds.row_delta import RowDelta
from ticketserve.core.model import HEAD_PREFIX
from ticketserve.registry import HeadConfig

ADAPTER = "default"
HEAD_FILE, MANIFEST_FILE = "head.safetensors", "ticketserve-manifest.json"  # beside the adapter


def export_peft(artifact: Artifact, backbone: Backbone, directory: Path) -> Path:
    """Write a `row_delta` or `lora` artifact as a stock PEFT LoRA adapter, with the manifest
    and a model card beside it: of the stock sequence classifier (`SEQ_CLS`, the head as its
    classifier) when the head is Hugging Face's, else of the bare encoder with our head beside it."""
    from peft import LoraConfig, get_peft_model

    kind = artifact.manifest.kind
    if kind not in ("row_delta", "lora"):
        raise InvalidArgument(f"{artifact.version} is a {kind!r} artifact; PEFT export takes row_delta and lora")
    factors = _row_factors(artifact, backbone.model) if kind == "row_delta" else _lora_factors(artifact)
    if not factors:
        raise InvalidArgument(f"{artifact.version} changes no matrix: nothing to export")
    stock = is_stock_head(artifact.manifest.head)
    base = stock_classifier(artifact, backbone) if stock else copy.deepcopy(backbone.model)
    prefix = f"{base.base_model_prefix}." if stock else ""  # where the encoder sits in the model
    ranks = {prefix + name: a.shape[0] for name, (a, _, _, _) in factors.items()}
    reference = base_reference(backbone, directory)
    base.name_or_path = reference  # peft records the model's own name over the config's
    config = LoraConfig(
        r=1, lora_alpha=1, rank_pattern=ranks,
        alpha_pattern={prefix + n: s * ranks[prefix + n] for n, (_, _, s, _) in factors.items()},
        lora_dropout=0.0, target_modules="|".join(re.escape(name) for name in sorted(ranks)),  # matched in full
        bias="lora_only" if any(bias is not None for *_, bias in factors.values()) else "none",
        base_model_name_or_path=reference,
        task_type="SEQ_CLS" if stock else None, modules_to_save=STOCK_HEAD_MODULES[base.config.model_type] if stock else None,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, (a, b, _, bias) in factors.items():
            layer = model.base_model.model.get_submodule(prefix + name)
            layer.lora_A[ADAPTER].weight.copy_(a)
            layer.lora_B[ADAPTER].weight.copy_(b)
            if bias is not None:
                layer.base_layer.bias += bias
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if not stock:
        save_file({k: v.contiguous() for k, v in artifact.head_tensors.items()}, directory / HEAD_FILE)
    (directory / MANIFEST_FILE).write_bytes(artifact.manifest.to_bytes())
    (directory / "README.md").write_text(model_card(artifact, backbone, reference, stock))
    return directory


STOCK_HEAD_MODULES = {"bert": ["classifier", "pooler"], "roberta": ["classifier"]}  # what holds the stock head


def is_stock_head(head: HeadConfig) -> bool:
    """Whether the head is what BERT/RoBERTa *ForSequenceClassification compute."""
    return head.dense and head.pooling == "cls"


def stock_classifier(artifact: Artifact, backbone: Backbone) -> nn.Module:
    """The stock *ForSequenceClassification of the backbone with the artifact's head as its
    classifier (BERT: pooler + classifier; RoBERTa: classifier.dense + classifier.out_proj)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(backbone.config)
    config.num_labels = artifact.manifest.task.num_outputs
    model = AutoModelForSequenceClassification.from_config(config).eval()
    encoder = model.get_submodule(model.base_model_prefix)
    encoder.load_state_dict(backbone.model.state_dict(), strict=False)  # all but BERT's pooler, set below
    head = {k.removeprefix(HEAD_PREFIX): v for k, v in artifact.head_tensors.items()}
    dense, out = (encoder.pooler.dense, model.classifier) if config.model_type == "bert" else (
        model.classifier.dense, model.classifier.out_proj)
    with torch.no_grad():
        for linear, part in ((dense, "dense."), (out, "")):
            linear.weight.copy_(head[f"{part}weight"])
            linear.bias.copy_(head[f"{part}bias"])
    return model


def _row_factors(artifact: Artifact, encoder: nn.Module) -> dict[str, tuple]:
    """A k-row delta as the rank-k LoRA it is: A selects the rows (one-hot), B = Dᵀ, scaling 1;
    the bias row as a bias update (bias-only layers get a zero factor of rank 1)."""
    factors = {}
    for name, linear in dense_matrices(encoder).items():
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


def model_card(artifact: Artifact, backbone: Backbone, base: str, stock: bool) -> str:
    manifest = artifact.manifest
    task, local = manifest.task, Path(backbone.source).exists() and backbone.name != DEFAULT_BACKBONE
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in manifest.metrics.items()) or "not recorded"
    where = (f"a local checkpoint, `{base}` relative to this directory (not on the hub: copy it along)" if local
             else f"[`{base}`](https://huggingface.co/{base})")
    labels = ", ".join(task.labels) if task.labels else "a regression value"
    if stock:
        head = (f"the stock classifier (`modules_to_save`: {', '.join(STOCK_HEAD_MODULES[backbone.config.model_type])}); "
                "`ticketserve-manifest.json` is the full manifest.")
        load = (f"from peft import PeftModel\nfrom transformers import AutoModelForSequenceClassification\n\n"
                f"base = AutoModelForSequenceClassification.from_pretrained(\"{base}\", num_labels={task.num_outputs})\n"
                "model = PeftModel.from_pretrained(base, \"PATH/TO/THIS/DIRECTORY\")")
    else:
        head = (f"`head.safetensors` ({manifest.head.pooling} pooling, "
                f"{'a dense layer + tanh, ' if manifest.head.dense else ''}then `weight`/`bias` of a linear layer), "
                "not a module of a stock model. `ticketserve-manifest.json` is the full manifest.")
        load = ("from peft import PeftModel\nfrom transformers import AutoModel\n\n"
                f"encoder = AutoModel.from_pretrained(\"{base}\", add_pooling_layer=False)\n"
                "model = PeftModel.from_pretrained(encoder, \"PATH/TO/THIS/DIRECTORY\")")
    return f"""---
base_model: {base}
library_name: peft
tags: [ticketserve, lora, {manifest.method}, text-classification]
---

# {manifest.name} — a ticketserve `{manifest.method}` task as a PEFT LoRA adapter

* **Task**: {task.name} ({labels}); primary metric {task.metric}.
* **Metrics** on the evaluation split when trained: {metrics}.
* **What it holds**: {_what(artifact)}.
* **Base model**: {where}; content fingerprint `{backbone.fingerprint}` (sha256 over the encoder's
  tensor names, dtypes, shapes and bytes).
* **Head**: {head}

```python
{load}
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
