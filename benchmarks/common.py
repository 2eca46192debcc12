"""What the benchmarks share: where things are, the machine's name for the records, and the
synthetic tasks of every kind the system benchmarks serve (built on ticketserve.core.synthetic,
the tests' own generator; torch is imported where it is used, so the load generator that
reads only the paths stays light). Run every benchmark as a module from the repository root:
`python -m benchmarks.system.serving`, `python -m benchmarks.studies.dominant`, …"""

from __future__ import annotations

import platform
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"  # every benchmark's records (rendered by benchmarks/results.py)
STUDY_REGISTRY = BENCHMARKS / ".registry"  # the studies' artifacts (precision evaluates them)
GLUE = REPO.parent / "shared" / "data" / "glue"
SST2_DEV = REPO / "ticketserve" / "core" / "samples" / "sst2" / "validation.jsonl"
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2")  # Debian's libjemalloc2 (the image's), and RPM distributions'


def jemalloc_environment() -> dict[str, str]:
    """The environment that makes jemalloc a process's malloc, as the image runs the server."""
    found = next((p for p in JEMALLOC_PATHS if Path(p).exists()), None)
    if found is None:
        raise SystemExit("jemalloc is not installed (apt-get install libjemalloc2)")
    return {"LD_PRELOAD": found}


def cpu_name() -> str:
    """The CPU's model name (Linux), for the records: ratios are compared on one machine."""
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"


def bert_base_like() -> Path:
    """A BERT-base-sized encoder with random weights and the MiniLM tokenizer (speed only)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ticketserve.core.backbone import tokenizer_source

    path = BENCHMARKS / ".bert-base-random"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        BertModel(BertConfig(), add_pooling_layer=False).save_pretrained(path)
        AutoTokenizer.from_pretrained(tokenizer_source()).save_pretrained(path)
    return path


# -- synthetic tasks of each kind, as the system benchmarks serve them ---------------------------

def head(backbone, generator) -> dict:
    import torch

    hidden = backbone.config.hidden_size
    return {"head.weight": torch.randn(2, hidden, generator=generator) * 0.1, "head.bias": torch.zeros(2)}


def dominant1(backbone, seed: int) -> dict:
    """One input row per matrix (the tests' synthetic row delta, k = 1)."""
    import torch

    from ticketserve.core.synthetic import row_delta

    return row_delta(backbone, k=1, seed=seed, bias=False, scale=0.01) | head(backbone, torch.Generator().manual_seed(seed))


def structure(backbone, seed: int) -> dict:
    import torch

    from ticketserve.core.kinds.structure_mask import to_tensors

    generator = torch.Generator().manual_seed(seed)
    c = backbone.config
    keep = torch.rand(c.num_hidden_layers, c.num_attention_heads, generator=generator) > 0.2
    keep[:, 0] = True
    return to_tensors(keep, torch.rand(c.num_hidden_layers, generator=generator) > 0.1) | head(backbone, generator)


_MASKS: dict[str, dict] = {}


def supermask(backbone, seed: int, share: float = 0.05) -> dict:
    """One encoded mask set per backbone and masked share, shared by all tasks (compressing is
    the slow part, and serving speed does not depend on which weights are masked); heads differ."""
    import torch

    from ticketserve.core import synthetic
    from ticketserve.core.kinds.supermask import encode_masks

    key = f"{backbone.fingerprint}-{share}"
    if key not in _MASKS:
        _MASKS[key] = encode_masks(synthetic.masks(backbone, share))
    return _MASKS[key] | head(backbone, torch.Generator().manual_seed(seed))


def full(backbone, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {f"encoder.{k}": v + 0.001 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in backbone.model.state_dict().items()} | head(backbone, generator)


def lora8(backbone, seed: int) -> dict:
    """LoRA r=8 on all six matrices of every block, as the peft peer row has it."""
    import torch

    from ticketserve.core import synthetic

    return synthetic.lora(backbone, rank=8, seed=seed) | head(backbone, torch.Generator().manual_seed(seed))


BUILDERS = {"row_delta": dominant1, "structure_mask": structure, "supermask": supermask, "full": full, "lora": lora8}


def publish(store, backbone, kind: str, names: list[str], build=None) -> None:
    from ticketserve.core import artifact
    from ticketserve.core.tasks import get_task
    from ticketserve.registry import HeadConfig, Manifest

    for seed, name in enumerate(names):
        manifest = Manifest(name=name, kind=kind, method="synthetic", task=get_task("sst2"), head=HeadConfig(),
                            backbone=backbone.ref(), details={"synthetic": True})
        artifact.publish(store, manifest, (build or BUILDERS[kind])(backbone, seed))
