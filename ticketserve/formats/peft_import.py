"""Import a PEFT LoRA adapter for a BERT/RoBERTa sequence classifier (a directory written by
`PeftModel.save_pretrained`) as a `lora` artifact, with the classifier as the task head.

What is read: `adapter_config.json` and `adapter_model.safetensors` — never a pickled
`adapter_model.bin`. What is refused, because ticketserve could not reproduce stock PEFT's
outputs exactly: another PEFT method, DoRA, trained biases, adapters on anything but the six
dense matrices of the blocks (embeddings, LayerNorm, the pooler), a base model other than the
backbone, and an adapter without its classifier (`modules_to_save=["classifier"]`) — unless
`registry export --format peft` wrote it, with our head and manifest beside it.
Scaling is PEFT's: lora_alpha / r (√r with rsLoRA), per module from rank_pattern/alpha_pattern.
The heads: BERT's pooler (dense + tanh on the first token; the base checkpoint's weights
unless the adapter saved its own) then `classifier`; RoBERTa's `classifier.dense` + tanh then
`classifier.out_proj` — our head with `dense`, `cls` pooling.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ticketserve.core.backbone import DEFAULT_BACKBONE, DEFAULT_HUB_ID, Backbone, dense_matrices
from ticketserve.core.errors import BackboneMismatch, CorruptArtifact, InvalidArgument, NotFound
from ticketserve.core.kinds import get_kind
from ticketserve.core.model import HEAD_PREFIX
from ticketserve.formats.peft import HEAD_FILE, MANIFEST_FILE
from ticketserve.registry import HeadConfig, Manifest, TaskSpec

PREFIX = "base_model.model."
MODEL_PREFIXES = ("bert.", "roberta.")  # the encoder inside *ForSequenceClassification
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")


def read_peft(directory: Path, backbone: Backbone, name: str, spec: TaskSpec) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The manifest and tensors of a `lora` artifact equal to the adapter on this backbone."""
    config = _config(directory)
    _check_base(config, backbone, directory)
    state = _state(directory)
    tensors, leftovers = _factors(config, state, backbone)
    head, head_config = _head(leftovers, backbone, spec, directory)
    if leftovers:
        raise InvalidArgument(f"the adapter also changes {', '.join(sorted(leftovers)[:3])}: ticketserve serves LoRA "
                              "on the six dense matrices of each block and the classifier, nothing else")
    get_kind("lora").validate(tensors, backbone.model)
    manifest = Manifest(name=name, kind="lora", method="peft-lora", task=spec, head=head_config, backbone=backbone.ref())
    return manifest, tensors | head


def _config(directory: Path) -> dict:
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise NotFound(f"{directory} holds no adapter_config.json (a directory written by PeftModel.save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise CorruptArtifact(f"{path}: not JSON ({exc})") from None
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
        raise NotFound(f"{directory} holds no adapter_model.safetensors")
    try:
        state = load_file(path)
    except SafetensorError as exc:
        raise CorruptArtifact(f"{path}: not valid safetensors: {exc}") from None
    found = {}
    for key, tensor in state.items():
        key = key.removeprefix(PREFIX)
        for prefix in MODEL_PREFIXES:
            key = key.removeprefix(prefix)
        found[key] = tensor.float()
    return found


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern applies when the module's name ends with it (as a regex)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
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
    config = backbone.config
    if not any(key.startswith("classifier.") for key in state) and (directory / HEAD_FILE).is_file() \
            and (directory / MANIFEST_FILE).is_file():
        exported = Manifest.model_validate_json((directory / MANIFEST_FILE).read_text())
        if exported.task.num_outputs != spec.num_outputs:
            raise InvalidArgument(f"the exported head has {exported.task.num_outputs} outputs; task {spec.name} has "
                                  f"{spec.num_outputs}")
        return load_file(directory / HEAD_FILE), exported.head
    if "classifier.out_proj.weight" in state:  # RoBERTa: dense → tanh → out_proj on the first token
        dense_weight, dense_bias = state.pop("classifier.dense.weight", None), state.pop("classifier.dense.bias", None)
        weight, bias = state.pop("classifier.out_proj.weight", None), state.pop("classifier.out_proj.bias", None)
    elif "classifier.weight" in state:  # BERT: the pooler (dense → tanh on the first token) → classifier
        weight, bias = state.pop("classifier.weight", None), state.pop("classifier.bias", None)
        dense_weight, dense_bias = state.pop("pooler.dense.weight", None), state.pop("pooler.dense.bias", None)
        if dense_weight is None:
            dense_weight, dense_bias = _base_pooler(backbone)
    else:
        raise InvalidArgument("the adapter brings no classifier: train it with modules_to_save=['classifier'] "
                              "(PEFT does so for task_type='SEQ_CLS')")
    if any(t is None for t in (weight, bias, dense_weight, dense_bias)):
        raise CorruptArtifact("the adapter's classifier is incomplete")
    if weight.shape[0] != spec.num_outputs:
        raise InvalidArgument(f"the classifier has {weight.shape[0]} outputs; task {spec.name} has {spec.num_outputs}")
    head = {HEAD_PREFIX + "weight": weight, HEAD_PREFIX + "bias": bias,
            HEAD_PREFIX + "dense.weight": dense_weight, HEAD_PREFIX + "dense.bias": dense_bias}
    dropout = getattr(config, "classifier_dropout", None) or config.hidden_dropout_prob
    return {k: v.contiguous() for k, v in head.items()}, HeadConfig(pooling="cls", dense=True, dropout=dropout)


def _base_pooler(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's pooler as the base checkpoint has it (the encoder is loaded without it)."""
    for path in sorted(Path(backbone.source).glob("*.safetensors")) if Path(backbone.source).is_dir() else []:
        state = load_file(path)
        for prefix in ("", "bert."):
            if f"{prefix}pooler.dense.weight" in state:
                return state[f"{prefix}pooler.dense.weight"].float(), state[f"{prefix}pooler.dense.bias"].float()
    raise InvalidArgument(f"backbone {backbone.name} has no pooler weights, so a stock BERT classifier on it starts "
                          "from a random pooler: save the adapter with modules_to_save=['classifier', 'pooler']")
