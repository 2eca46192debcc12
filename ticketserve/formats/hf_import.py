"""Import a fine-tuned Hugging Face sequence or token classifier (a directory written by
`Bert|RobertaForSequenceClassification` or `Bert|RobertaForTokenClassification.save_pretrained`,
or its hub id) as a `full` artifact: the encoder tensors that differ from the backbone, plus the
classifier as the task head, so it serves with the stock model's outputs.

Read: `config.json` and the safetensors weights (one file or an index of shards), never a
pickled `pytorch_model.bin`. Refused: another architecture, or a config whose shapes or
numerics differ from the backbone's (the backbone's tokenizer and config run it), or a
checkpoint missing encoder tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ticketserve.core.backbone import Backbone
from ticketserve.core.errors import CorruptArtifact, InvalidArgument, NotFound
from ticketserve.core.kinds import get_kind
from ticketserve.core.kinds.full import changed_tensors
from ticketserve.formats.classifier_head import classifier_head, encoder_key
from ticketserve.formats.hub import local_directory, read_json
from ticketserve.registry import Manifest, TaskSpec

FILES = ["config.json", "*.safetensors", "model.safetensors.index.json"]  # what a hub import fetches
# Config entries the backbone must share for its tokenizer and forward to reproduce the checkpoint.
SAME_CONFIG = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
               "position_embedding_type", "pad_token_id")
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # saved by older transformers; not weights


def read_classifier(source: str | Path, backbone: Backbone, name: str,
                    spec: TaskSpec) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The manifest and tensors of a `full` artifact equal to the classifier on this backbone."""
    directory = local_directory(str(source), FILES)
    _check_config(directory, backbone, spec)
    state = {encoder_key(key): tensor for key, tensor in read_weights(directory).items()
             if encoder_key(key) not in BUFFERS}
    if spec.type == "token_classification":  # a token classifier has no pooler, or one nothing reads
        state = {key: tensor for key, tensor in state.items() if not key.startswith("pooler.")}
    head, head_config = classifier_head(state, backbone, spec)
    reference = backbone.model.state_dict()
    missing = sorted(set(reference) - set(state))
    if missing:
        raise CorruptArtifact(f"the checkpoint lacks encoder tensors ({', '.join(missing[:3])}, …)")
    extra = sorted(set(state) - set(reference))
    if extra:
        raise InvalidArgument(f"the checkpoint also holds {', '.join(extra[:3])}, which a "
                              f"{backbone.config.model_type} sequence classifier does not have")
    changed = changed_tensors({key: tensor.to(reference[key].dtype) for key, tensor in state.items()}, reference)
    get_kind("full").validate(changed, backbone.model)
    manifest = Manifest(name=name, kind="full", method="hf-classifier", task=spec, head=head_config,
                        backbone=backbone.ref())
    return manifest, changed | head


def _check_config(directory: Path, backbone: Backbone, spec: TaskSpec) -> None:
    config = read_json(directory / "config.json", "a directory written by save_pretrained")
    architectures = config.get("architectures") or []
    wanted = "ForTokenClassification" if spec.type == "token_classification" else "ForSequenceClassification"
    if not any(a.endswith(wanted) for a in architectures):
        raise InvalidArgument(f"{directory} is a {', '.join(architectures) or 'model without architectures'}; "
                              f"task {spec.name} ({spec.type}) imports *{wanted} checkpoints")
    check_same_config(config, backbone)


def check_same_config(config: dict, backbone: Backbone) -> None:
    """Refuse a checkpoint config whose shapes or numerics differ from the backbone's."""
    ours = backbone.config.to_dict()
    differ = [f"{key} {config.get(key)!r} (backbone: {ours.get(key)!r})" for key in SAME_CONFIG
              if key in config and config[key] != ours.get(key)]
    if differ:
        raise InvalidArgument(f"the checkpoint's config differs from backbone {backbone.name}: {'; '.join(differ)} "
                              "— pass --backbone with the model it was fine-tuned from")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptArtifact(f"{index}: not a safetensors index ({exc})") from None
    state = {}
    for filename in files:
        path = directory / filename
        if not path.is_file():
            pickled = (directory / "pytorch_model.bin").exists()
            raise (InvalidArgument(f"{directory} holds a pickle (pytorch_model.bin), which ticketserve never loads: "
                                   "save it again with save_pretrained(..., safe_serialization=True)") if pickled
                   else NotFound(f"{directory} holds no {filename}"))
        try:
            state |= load_file(path)
        except SafetensorError as exc:
            raise CorruptArtifact(f"{path}: not valid safetensors: {exc}") from None
    return state
