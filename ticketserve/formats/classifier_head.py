"""The heads of Hugging Face sequence classifiers, as ticketserve's task head (`dense`, `cls`
pooling): BERT's pooler (dense + tanh on the first token) then `classifier`; RoBERTa's
`classifier.dense` + tanh then `classifier.out_proj`. Shared by the PEFT and the full
checkpoint imports, which read these tensors from different files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ticketserve.core.backbone import Backbone
from ticketserve.core.errors import CorruptArtifact, InvalidArgument
from ticketserve.core.model import HEAD_PREFIX
from ticketserve.registry import HeadConfig, TaskSpec

MODEL_PREFIXES = ("bert.", "roberta.")  # the encoder inside *ForSequenceClassification


def encoder_key(key: str) -> str:
    """A classifier's state-dict key as the bare encoder (and the head) name it."""
    for prefix in MODEL_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def has_classifier(state: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith("classifier.") for key in state)


def classifier_head(state: dict[str, torch.Tensor], backbone: Backbone,
                    spec: TaskSpec) -> tuple[dict[str, torch.Tensor], HeadConfig]:
    """Our head equal to the classifier in `state` (keys as `encoder_key` gives them), removing
    the tensors it uses from `state`: a sequence classifier's, or for a token classification
    task the per-token `classifier` of *ForTokenClassification (dropout + linear)."""
    if spec.type == "token_classification":
        return _token_head(state, backbone, spec)
    if "classifier.out_proj.weight" in state:  # RoBERTa: dense → tanh → out_proj on the first token
        dense_weight, dense_bias = state.pop("classifier.dense.weight", None), state.pop("classifier.dense.bias", None)
        weight, bias = state.pop("classifier.out_proj.weight", None), state.pop("classifier.out_proj.bias", None)
    elif "classifier.weight" in state:  # BERT: the pooler (dense → tanh on the first token) → classifier
        weight, bias = state.pop("classifier.weight", None), state.pop("classifier.bias", None)
        dense_weight, dense_bias = state.pop("pooler.dense.weight", None), state.pop("pooler.dense.bias", None)
        if dense_weight is None:
            dense_weight, dense_bias = _base_pooler(backbone)
    else:
        raise InvalidArgument("no sequence classifier found (`classifier.*` tensors)")
    if any(t is None for t in (weight, bias, dense_weight, dense_bias)):
        raise CorruptArtifact("the classifier is incomplete")
    if weight.shape[0] != spec.num_outputs:
        raise InvalidArgument(f"the classifier has {weight.shape[0]} outputs; task {spec.name} has {spec.num_outputs}")
    head = {HEAD_PREFIX + "weight": weight, HEAD_PREFIX + "bias": bias,
            HEAD_PREFIX + "dense.weight": dense_weight, HEAD_PREFIX + "dense.bias": dense_bias}
    config = backbone.config
    dropout = getattr(config, "classifier_dropout", None) or config.hidden_dropout_prob
    return ({k: v.float().contiguous() for k, v in head.items()},
            HeadConfig(pooling="cls", dense=True, dropout=dropout))


def _token_head(state: dict[str, torch.Tensor], backbone: Backbone,
                spec: TaskSpec) -> tuple[dict[str, torch.Tensor], HeadConfig]:
    weight, bias = state.pop("classifier.weight", None), state.pop("classifier.bias", None)
    if weight is None or bias is None:
        raise InvalidArgument("no token classifier found (`classifier.weight` and `classifier.bias`)")
    if weight.shape[0] != spec.num_outputs:
        raise InvalidArgument(f"the classifier has {weight.shape[0]} labels; task {spec.name} has {spec.num_outputs}")
    config = backbone.config
    dropout = getattr(config, "classifier_dropout", None) or config.hidden_dropout_prob
    return ({HEAD_PREFIX + "weight": weight.float().contiguous(), HEAD_PREFIX + "bias": bias.float().contiguous()},
            HeadConfig(pooling="cls", dropout=dropout))


def _base_pooler(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's pooler as the base checkpoint has it (the encoder is loaded without it)."""
    for path in sorted(Path(backbone.source).glob("*.safetensors")) if Path(backbone.source).is_dir() else []:
        with safe_open(path, "pt") as checkpoint:  # the two pooler tensors only, not the whole file
            for prefix in ("", "bert."):
                if f"{prefix}pooler.dense.weight" in checkpoint.keys():
                    return (checkpoint.get_tensor(f"{prefix}pooler.dense.weight").float(),
                            checkpoint.get_tensor(f"{prefix}pooler.dense.bias").float())
    raise InvalidArgument(f"backbone {backbone.name} has no pooler weights, so a stock BERT classifier on it starts "
                          "from a random pooler: save the adapter with modules_to_save=['classifier', 'pooler']")
