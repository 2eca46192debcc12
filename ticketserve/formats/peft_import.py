"""Import a PEFT LoRA adapter for a BERT/RoBERTa sequence classifier (a directory written by
`PeftModel.save_pretrained`, or its hub id) as a `lora` artifact, with the classifier as the
task head.

What is read: `adapter_config.json` and `adapter_model.safetensors` — never a pickled
`adapter_model.bin`. What is refused, because ticketserve could not reproduce stock PEFT's
outputs exactly: another PEFT method, DoRA, trained biases, adapters on anything but the six
dense matrices of the blocks (embeddings, LayerNorm, the pooler), a base model other than the
backbone, and an adapter without its classifier (`modules_to_save=["classifier"]`) — unless
`registry export --format peft` wrote it, with our head and manifest beside it.
Scaling is PEFT's: lora_alpha / r (√r with rsLoRA), per module from rank_pattern/alpha_pattern.
The heads are `classifier_head`'s; BERT's pooler comes from the base checkpoint unless the
adapter saved its own.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ticketserve.core.backbone import DEFAULT_BACKBONE, DEFAULT_HUB_ID, Backbone, dense_matrices
from ticketserve.core.errors import BackboneMismatch, CorruptArtifact, InvalidArgument, NotFound
from ticketserve.core.kinds import get_kind
from ticketserve.formats.classifier_head import MODEL_PREFIXES, classifier_head, encoder_key, has_classifier
from ticketserve.formats.hub import local_directory, read_json
from ticketserve.formats.peft import HEAD_FILE, MANIFEST_FILE
from ticketserve.registry import Manifest, TaskSpec

PREFIX = "base_model.model."
FILES = ["adapter_config.json", "adapter_model.safetensors", HEAD_FILE, MANIFEST_FILE]  # what a hub import fetches
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")


def read_peft(source: str | Path, backbone: Backbone, name: str,
              spec: TaskSpec) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The manifest and tensors of a `lora` artifact equal to the adapter (a directory or a hub
    id) on this backbone."""
    directory = local_directory(str(source), FILES)
    tensors, leftovers = lora_factors(directory, backbone)
    head, head_config = _head(leftovers, backbone, spec, directory)
    if leftovers:
        raise InvalidArgument(f"the adapter also changes {', '.join(sorted(leftovers)[:3])}: ticketserve serves LoRA "
                              "on the six dense matrices of each block and the classifier, nothing else")
    get_kind("lora").validate(tensors, backbone.model)
    manifest = Manifest(name=name, kind="lora", method="peft-lora", task=spec, head=head_config, backbone=backbone.ref())
    return manifest, tensors | head


def lora_factors(directory: Path, backbone: Backbone) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapter's factors and scalings as a `lora` payload for this backbone, and the tensors
    it saved beside them (a classifier, or what nothing serves)."""
    config = _config(directory)
    _check_base(config, backbone, directory)
    return _factors(config, _state(directory), backbone)


def _config(directory: Path) -> dict:
    config = read_json(directory / "adapter_config.json", "a directory written by PeftModel.save_pretrained")
    if config.get("peft_type") != "LORA":
        raise InvalidArgument(f"{directory} is a {config.get('peft_type')!r} adapter; ticketserve imports LORA")
    if config.get("use_dora"):
        raise InvalidArgument("DoRA adapters (use_dora) rescale the merged weight per column; ticketserve serves "
                              "plain LoRA only")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise InvalidArgument(f"the adapter trains biases (bias={config.get('bias')!r}); ticketserve's lora kind "
                              "carries factors only")
    if config.get("fan_in_fan_out"):
        raise InvalidArgument("fan_in_fan_out adapters (Conv1D layers) do not fit BERT/RoBERTa linears")
    return config


def _check_base(config: dict, backbone: Backbone, directory: Path) -> None:
    """The adapter's base is this backbone: by name, hub id, or path (a relative one, as our
    export writes it, from the adapter's directory)."""
    base = str(config.get("base_model_name_or_path") or "")
    same = {backbone.name, backbone.source, str(Path(backbone.source).resolve())}
    if backbone.name == DEFAULT_BACKBONE:
        same.add(DEFAULT_HUB_ID)
    paths = {str(Path(base).resolve()), str((directory / base).resolve())}
    if base and base not in same and not paths & same:
        raise BackboneMismatch(f"the adapter was trained on {base!r}, not on this backbone ({backbone.name}); "
                               "pass --backbone with that model")


def _state(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        if (directory / "adapter_model.bin").exists():
            raise InvalidArgument("the adapter is a pickle (adapter_model.bin), which ticketserve never loads: "
                                  "save it again with PeftModel.save_pretrained(..., safe_serialization=True)")
        raise NotFound(f"{directory} holds no adapter_model.safetensors (pickled adapters are never loaded)")
    try:
        state = load_file(path)
    except SafetensorError as exc:
        raise CorruptArtifact(f"{path}: not valid safetensors: {exc}") from None
    return {encoder_key(key.removeprefix(PREFIX)): tensor.float() for key, tensor in state.items()}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern applies when the module's name ends with it (as a regex). PEFT
    names the module inside the classifier (`bert.encoder…`); we name it in the encoder."""
    names = [module] + [prefix + module for prefix in MODEL_PREFIXES]
    for pattern, value in patterns.items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            return value
    return default


def _factors(config: dict, state: dict[str, torch.Tensor], backbone: Backbone):
    dense = dense_matrices(backbone.model)
    tensors, leftovers = {}, {}
    for key, tensor in state.items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            leftovers[key] = tensor
            continue
        module = match["module"]
        if module not in dense:
            raise InvalidArgument(f"the adapter puts LoRA on {module!r}; ticketserve serves it on the six dense "
                                  "matrices of each block only (not embeddings, LayerNorm or the pooler)")
        tensors[f"{module}.lora_{match['factor']}"] = tensor.contiguous()
    if not tensors:
        raise InvalidArgument("the adapter holds no LoRA factors")
    for module in {k.rsplit(".", 1)[0] for k in tensors}:
        if f"{module}.lora_A" not in tensors or f"{module}.lora_B" not in tensors:
            raise CorruptArtifact(f"the adapter has only one LoRA factor of {module}")
        rank = tensors[f"{module}.lora_A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", config.get("r", rank)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        tensors[f"{module}.scaling"] = torch.tensor(float(scale))
    return tensors, leftovers


def _head(state: dict[str, torch.Tensor], backbone: Backbone, spec: TaskSpec, directory: Path):
    """The classifier as our head (removing what it uses from `state`), or the head that
    `registry export --format peft` wrote beside an adapter of the bare encoder."""
    if has_classifier(state):
        return classifier_head(state, backbone, spec)
    if (directory / HEAD_FILE).is_file() and (directory / MANIFEST_FILE).is_file():
        exported = Manifest.model_validate_json((directory / MANIFEST_FILE).read_text())
        if exported.task.num_outputs != spec.num_outputs:
            raise InvalidArgument(f"the exported head has {exported.task.num_outputs} outputs; task {spec.name} has "
                                  f"{spec.num_outputs}")
        return load_file(directory / HEAD_FILE), exported.head
    raise InvalidArgument("the adapter brings no classifier: train it with modules_to_save=['classifier'] "
                          "(PEFT does so for task_type='SEQ_CLS')")
