"""Import a sentence-transformers model directory (or hub id) as an embedding task.

Read: `modules.json` and the modules it lists — the Transformer (config.json + safetensors
weights at the model's root, or a PEFT LoRA adapter there: adapter_config.json +
adapter_model.safetensors, as `add_adapter` + `save_pretrained` write it), Pooling (mean or
cls), an optional Dense (projection + activation, its safetensors weights) and an optional
Normalize. Encoder weights equal to the backbone's make a `plain` artifact (the backbone itself
under the pooling: no encoder bytes, e.g. the bundled MiniLM's own embeddings); weights
fine-tuned from it a `full` artifact of the tensors that differ; an adapter a `lora` artifact
(its base must be the backbone; peft_import.py's checks). Refused: other modules (a second Transformer, a custom module, a
CNN), other pooling modes, pickled weights, a config whose shapes differ from the backbone's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ticketserve.core.backbone import Backbone
from ticketserve.core.errors import CorruptArtifact, InvalidArgument, NotFound
from ticketserve.core.kinds import get_kind
from ticketserve.core.kinds.full import changed_tensors
from ticketserve.core.model import HEAD_PREFIX
from ticketserve.formats.classifier_head import encoder_key
from ticketserve.formats.hf_import import BUFFERS, check_same_config, read_weights
from ticketserve.formats.hub import local_directory, read_json
from ticketserve.formats.peft_import import lora_factors
from ticketserve.registry import HeadConfig, Manifest, TaskSpec

FILES = ["modules.json", "config.json", "sentence_bert_config.json", "*.safetensors", "model.safetensors.index.json",
         "adapter_config.json", "*/config.json", "*/model.safetensors"]
ACTIVATIONS = {"torch.nn.modules.activation.Tanh": "tanh", "torch.nn.modules.linear.Identity": "identity"}


def embedding_spec(name: str) -> TaskSpec:
    """The task of an imported embedding model: single texts in, a vector out (pairs of texts
    with a similarity score train and score it, as on STS-B)."""
    return TaskSpec(name=name, type="embedding", text_field="sentence1", text_pair_field="sentence2",
                    metric="spearman", extra_metrics=["pearson"])


def read_sentence_transformer(source: str | Path, backbone: Backbone, name: str,
                              dimensions: list[int] | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The manifest and tensors of an embedding task equal to the model on this backbone;
    `dimensions`: smaller widths it was trained to be cut to (a Matryoshka model)."""
    directory = local_directory(str(source), FILES)
    modules = read_json(directory / "modules.json", "a sentence-transformers model's module list")
    by_type: dict[str, Path] = {}
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", "")).rpartition(".")[2]
        if kind not in ("Transformer", "Pooling", "Dense", "Normalize") or kind in by_type:
            raise InvalidArgument(f"{directory}: module {module.get('type')!r} is not one ticketserve serves "
                                  "(one Transformer, Pooling, and optionally Dense and Normalize)")
        by_type[kind] = directory / str(module.get("path", ""))
    if "Transformer" not in by_type or "Pooling" not in by_type:
        raise InvalidArgument(f"{directory}/modules.json lists no Transformer and Pooling modules")
    transformer = by_type["Transformer"]
    if (transformer / "adapter_config.json").is_file():
        tensors, leftovers = lora_factors(transformer, backbone)
        if leftovers:
            raise InvalidArgument(f"the adapter also changes {', '.join(sorted(leftovers)[:3])}: ticketserve serves "
                                  "LoRA on the six dense matrices of each block, nothing else")
    else:
        check_same_config(read_json(transformer / "config.json", "the Transformer's config"), backbone)
        tensors = _encoder_changes(transformer, backbone)
    head = HeadConfig(pooling=_pooling(by_type["Pooling"]), dropout=0.0, normalize="Normalize" in by_type)
    if "Dense" in by_type:
        projection, activation = _dense(by_type["Dense"], backbone.config.hidden_size)
        head = head.model_copy(update={"projection": projection[HEAD_PREFIX + "weight"].shape[0], "activation": activation})
        tensors |= projection
    width = head.projection or backbone.config.hidden_size
    if any(not 0 < d < width for d in dimensions or ()):
        raise InvalidArgument(f"--dimensions: each width must be below the model's {width}")
    head = head.model_copy(update={"dimensions": sorted(set(dimensions or ()), reverse=True)})
    encoder = [k for k in tensors if not k.startswith(HEAD_PREFIX)]
    kind = "plain" if not encoder else "lora" if any(k.endswith(".lora_A") for k in encoder) else "full"
    get_kind(kind).validate({k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}, backbone.model)
    manifest = Manifest(name=name, kind=kind, method="sentence-transformers", task=embedding_spec(name), head=head,
                        backbone=backbone.ref(), details={"source": str(source)})
    return manifest, tensors


def _encoder_changes(directory: Path, backbone: Backbone) -> dict[str, torch.Tensor]:
    state = {encoder_key(k): v for k, v in read_weights(directory).items()  # the pooler: unused by the pooling
             if encoder_key(k) not in BUFFERS and not encoder_key(k).startswith("pooler.")}
    reference = backbone.model.state_dict()
    if state.keys() != reference.keys():
        missing, extra = sorted(reference.keys() - state.keys()), sorted(state.keys() - reference.keys())
        raise CorruptArtifact(f"{directory}: the Transformer's weights are not a {backbone.config.model_type} encoder's"
                              + (f" (missing {', '.join(missing[:3])})" if missing else "")
                              + (f" (extra {', '.join(extra[:3])})" if extra else ""))
    return changed_tensors({k: v.to(reference[k].dtype) for k, v in state.items()}, reference)


def _pooling(directory: Path) -> str:
    config = read_json(directory / "config.json", "the Pooling module's config")
    mode = config.get("pooling_mode") or [m for m in ("cls", "mean", "max", "mean_sqrt_len", "weightedmean", "lasttoken")
                                          if config.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")]
    modes = [mode] if isinstance(mode, str) else mode
    if modes not in (["mean"], ["cls"]):
        raise InvalidArgument(f"{directory}: pooling {'+'.join(modes) or 'none'}; ticketserve pools mean or cls tokens")
    return modes[0]


def _dense(directory: Path, hidden_size: int) -> tuple[dict[str, torch.Tensor], str]:
    config = read_json(directory / "config.json", "the Dense module's config")
    activation = ACTIVATIONS.get(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if activation is None or config.get("use_residual") or config.get("in_features") != hidden_size:
        raise InvalidArgument(f"{directory}: a Dense of {config.get('in_features')} → {config.get('out_features')} with "
                              f"{config.get('activation_function')}; ticketserve takes {hidden_size} → any width with "
                              "Tanh or Identity, no residual")
    path = directory / "model.safetensors"
    if not path.is_file():
        raise NotFound(f"{directory} holds no model.safetensors (a pickled pytorch_model.bin is never loaded)")
    try:
        weights = load_file(path)
    except SafetensorError as exc:
        raise CorruptArtifact(f"{path}: not valid safetensors: {exc}") from None
    weight = weights.get("linear.weight")
    if weight is None or weight.shape != (config["out_features"], hidden_size):
        raise CorruptArtifact(f"{path}: no linear.weight of shape ({config['out_features']}, {hidden_size})")
    bias = weights.get("linear.bias", torch.zeros(weight.shape[0]))
    return {HEAD_PREFIX + "weight": weight.float().contiguous(), HEAD_PREFIX + "bias": bias.float().contiguous()}, activation
