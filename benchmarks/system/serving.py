"""Serving benchmark, in one run on one machine (ratios are what to compare across machines).

Parts (`--parts engine,load,doors` by default; also `lora`, `precision`, `supermask`):
  engine  examples/s on the same batches of SST-2 dev sentences (32 per batch, every example's
          task drawn from 100), on the bundled MiniLM and a BERT-base-sized random encoder:
          plain backbone · ours: 1 task, 100 Dominant-1 mixed, 100 structure masks mixed,
          100 LoRA r=8 mixed (all six matrices, as the peft row), LoRA + Dominant-1 +
          structure masks mixed, 100 supermasks mixed (5 % masked: corrections), ONNX Runtime with 100
          Dominant-1 mixed ·
          peers: peft LoRA r=8 ×100 mixed with `adapter_names`, peft `set_adapter` per task
          group, full fine-tuned copies (10 resident) swapped per task group. Plus a profile of
          our mixed forward (results/serving-profile.txt).
  supermask  100 supermask tasks mixed at 2/5/7/10/50 % masked as corrections of the shared
          GEMM vs the materialised path (cache for 10), serving bytes and cold load per share
  load    cold load registry → servable per kind vs a full fine-tuned checkpoint; resident
          bytes per task per kind; memory growth from 1 to 1000 resident Dominant-1 tasks.
  lora    our 100 LoRA r=8 tasks mixed against peft's `adapter_names` mixed path and the plain
          backbone, one interleaved group, 3+ rounds: per-round ratios (medians and ranges).
  doors   end to end through each front door of one `ticketserve serve` subprocess on
          127.0.0.1 — our gRPC API, the Open Inference Protocol over gRPC and HTTP (/v2), the
          JSON API (/v1) — the server pinned to all cores but the last, the load (asyncio
          clients in one process, benchmarks/system/loadgen.py) to the last; 32 clients (--clients),
          1 task and 100 tasks at random, one text per request, doors interleaved, 2+ rounds:
          QPS, p50/p99, the server's CPU and faults, the load's CPU share, against the
          in-process Engine on the server's cores under as many submitter threads; once under
          glibc's malloc (as `pip install` serves) and once under jemalloc (as the image does;
          --allocators).
Task artifacts are synthetic (random rows / masks of the right shape): values do not change speed.
Results: benchmarks/results/serving.jsonl and benchmarks/system/serving.md.

    python -m benchmarks.system.serving [--parts engine,load,doors] [--seconds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import torch

from benchmarks import common
from benchmarks.common import REPO, SST2_DEV, bert_base_like, cpu_name, jemalloc_environment, publish, supermask
from benchmarks.system import memory_kernel

HERE = Path(__file__).parent
RESULTS = common.RESULTS / "serving.jsonl"
PROFILE = common.RESULTS / "serving-profile.txt"
REPORT = HERE / "serving.md"
TASKS, BATCH, BATCHES = 100, 32, 12
ROUNDS = 3
DEVICE = torch.device("cpu")  # where the engine and precision parts run (--device)
PRECISIONS = {"float32": (torch.float32, "none"), "bfloat16": (torch.bfloat16, "none"), "float16": (torch.float16, "none"),
              "int8": (torch.float32, "int8")}  # name → the encoder's dtype and quantization


# -- engine throughput ----------------------------------------------------------------------

def batches(tokenizer, texts: list[str], seed: int = 0, count: int = BATCHES, size: int = BATCH) -> list[tuple[dict, list[int]]]:
    """Batches of texts tokenized as the engine tokenizes them (128 tokens at most), each example's task drawn."""
    from ticketserve.runtime.tokenizing import Tokenization

    tokenization, rng = Tokenization(tokenizer, max_tokens=128), random.Random(seed)
    out = []
    for _ in range(count):
        sample = rng.sample(texts, size)
        out.append((tokenization(sample, device=DEVICE), [rng.randrange(TASKS) for _ in sample]))
    return out


def sync() -> None:
    """Wait for the device: CUDA runs asynchronously, and a pass is timed to its last result."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def passes(engines: dict, work: list, rounds: int) -> dict[str, list[float]]:
    """Examples/s per engine and round; within a round, every batch runs through every engine in
    turn (in an order drawn per batch, so no engine always follows the same one: ONNX Runtime's
    threads spin on after a run and slow whatever comes next), and each engine's time is the sum
    of its own calls. Interleaving matters on a shared machine: its speed drifts by 10–20 % over
    seconds to minutes; engines measured one pass after another carried that drift into their
    ratios (one round's ratio ranged 0.75–1.03 for the same two engines), batch by batch every
    engine sees the same machine."""
    names, order = list(engines), random.Random(0)
    with torch.inference_mode():
        for run in engines.values():
            run(*work[0])  # warm-up
        measured: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(rounds):
            seconds = dict.fromkeys(names, 0.0)
            for inputs, tasks in work:
                for name in order.sample(names, len(names)):
                    started = time.perf_counter()
                    engines[name](inputs, tasks)
                    sync()
                    seconds[name] += time.perf_counter() - started
            examples = sum(len(tasks) for _, tasks in work)
            for name in names:
                measured[name].append(examples / seconds[name])
    return measured


def rates(engines: dict, work: list) -> dict[str, float]:
    """Examples/s per engine: the best of ROUNDS interleaved passes."""
    return {name: max(values) for name, values in passes(engines, work, ROUNDS).items()}


def rate(run, work: list) -> float:
    return rates({"run": run}, work)["run"]


def groups(tasks: list[int]) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for position, task in enumerate(tasks):
        found.setdefault(task, []).append(position)
    return found


def subset(inputs: dict, rows: list[int]) -> dict:
    index = torch.tensor(rows, device=DEVICE)
    return {k: v.index_select(0, index) for k, v in inputs.items()}


def ours(backbone_spec, store, names: list[str], runtime_cls=None, mask_cache_bytes: int | None = None,
         dtype: torch.dtype = torch.float32, quantize: str = "none"):
    """A runtime on its own copy of the backbone serving `names`; returns its batch runner."""
    from ticketserve.core import artifact
    from ticketserve.core.backbone import load_backbone
    from ticketserve.core.kinds.supermask import masks_on
    from ticketserve.runtime.executor import Runtime

    backbone = load_backbone(backbone_spec)
    runtime = runtime_cls(backbone, device="cpu") if runtime_cls else Runtime(backbone, device=DEVICE, dtype=dtype,
                                                                              quantize=quantize)
    if mask_cache_bytes is not None:
        masks_on(runtime.shared).cache.max_bytes = mask_cache_bytes
    loaded = [runtime.add(artifact.load(store, name, backbone)) for name in names]
    return lambda inputs, tasks: runtime.logits([loaded[t % len(loaded)] for t in tasks], inputs)


def onnx_runtime(backbone, device):
    from ticketserve.runtime.executor import Runtime

    return Runtime(backbone, device=device, backend="onnx")


def onnx_int8_runtime(backbone, device):
    """ONNX Runtime's own int8 on our exported graph (quantize_dynamic: per-channel int8
    weights, dynamic uint8 activations), measured against the torch int8 path; not shipped."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    runtime = onnx_runtime(backbone, device)
    exported = runtime.backend.onnx_path
    quantized = exported.with_name(f"bench-int8-{exported.name}")
    if not quantized.exists():
        quantize_dynamic(str(exported), str(quantized), per_channel=True, weight_type=QuantType.QInt8,
                         use_external_data_format=True)
    runtime.backend.session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    return runtime


def peft_engines(backbone, dtype: torch.dtype = torch.float32) -> dict:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=r".*\.(query|key|value|dense)$", lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(backbone.model), config, adapter_name="t0")
    for i in range(1, TASKS):
        model.add_adapter(f"t{i}", config)
    model.to(DEVICE, dtype).eval()

    def mixed(inputs, tasks):
        model(**inputs, adapter_names=[f"t{t}" for t in tasks])

    def switching(inputs, tasks):
        for task, rows in groups(tasks).items():
            model.set_adapter(f"t{task}")
            model(**subset(inputs, rows))

    return {"peft LoRA r=8 x100, adapter_names mixed": mixed,
            "peft LoRA r=8 x100, set_adapter per task group": switching}


def full_copies(backbone, resident: int = 10):
    """One fine-tuned model per task, `resident` held in memory, weights swapped per task group."""
    states = [{k: v + 0.001 * torch.randn_like(v) if v.is_floating_point() else v
               for k, v in backbone.model.state_dict().items()} for _ in range(resident)]
    copies = [copy.deepcopy(backbone.model).eval() for _ in range(resident)]
    holding: list[int | None] = [None] * resident
    order = list(range(resident))

    def run(inputs, tasks):
        for task, rows in groups(tasks).items():
            if task in holding:
                slot = holding.index(task)
            else:
                slot = order.pop(0)  # least recently used copy takes this task's weights
                copies[slot].load_state_dict(states[task % resident])
                holding[slot] = task
                order.append(slot)
            copies[slot](**subset(inputs, rows))

    return run


def synthetic_tasks(backbone_spec: str | None):
    """The backbone, a fresh registry, and TASKS synthetic tasks of each shared-backbone kind in it."""
    from ticketserve.core.backbone import load_backbone
    from ticketserve.registry import open_store

    backbone = load_backbone(backbone_spec)
    store = open_store(tempfile.mkdtemp(prefix="ts-bench-"))
    names = {kind: [f"{kind.replace('_', '-')}-{i:03d}" for i in range(TASKS)]
             for kind in ("row_delta", "structure_mask", "supermask", "lora")}
    for kind, kind_names in names.items():
        publish(store, backbone, kind, kind_names)
    return backbone, store, names


PLAIN_SAME_HEAD = "plain backbone (the same head)"


def typed_task_rates(spec, head, texts: list[str], rounds: int = 5) -> list[dict]:
    """Records of examples/s of 1 and of 100 mixed tasks of one task type (Dominant-1 row
    deltas; LoRA r=8) and of the plain backbone under the same head (what serving one model of
    that type costs), on the bundled MiniLM, interleaved: for the task-type studies."""
    from ticketserve.core import artifact
    from ticketserve.core.backbone import load_backbone
    from ticketserve.core.model import make_head
    from ticketserve.registry import Manifest, open_store

    backbone = load_backbone()
    store = open_store(tempfile.mkdtemp(prefix="ts-bench-typed-"))
    names = {kind: [f"{spec.type.replace('_', '-')}-{kind.replace('_', '-')}-{i:03d}" for i in range(TASKS)]
             for kind in ("row_delta", "lora")}
    torch.manual_seed(0)
    for kind, kind_names in names.items():
        for seed, name in enumerate(kind_names):
            tensors = {k: v for k, v in common.BUILDERS[kind](backbone, seed).items() if not k.startswith("head.")}
            tensors |= make_head(spec, head, backbone.config.hidden_size).tensors()
            artifact.publish(store, Manifest(name=name, kind=kind, method="synthetic", task=spec, head=head,
                                             backbone=backbone.ref()), tensors)
    plain_head = make_head(spec, head, backbone.config.hidden_size).eval()
    work = batches(backbone.tokenizer, texts)

    def plain(inputs, tasks):
        return plain_head(backbone.model(**inputs).last_hidden_state, inputs["attention_mask"])

    engines = {PLAIN_SAME_HEAD: plain,
               "ours: 1 task (Dominant-1)": ours(None, store, names["row_delta"][:1]),
               "ours: 100 Dominant-1 tasks mixed": ours(None, store, names["row_delta"]),
               "ours: 100 LoRA r=8 tasks mixed": ours(None, store, names["lora"])}
    measured = passes(engines, work, rounds)
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    records = []
    for workload, values in measured.items():
        ratios = [value / plain for value, plain in zip(values, measured[PLAIN_SAME_HEAD])]
        records.append({"part": "throughput", "workload": workload, "examples_per_s": statistics.median(values),
                        "vs_plain": statistics.median(ratios), "vs_plain_range": [min(ratios), max(ratios)],
                        "batch": BATCH, "batches": len(work), "rounds": rounds, "cpu": common.cpu_name(), "run": run})
    return records


def typed_task_table(records: list[dict], texts: str) -> list[str]:
    """The newest `typed_task_rates` run as a report's table (texts: what the batches held)."""
    if not records:
        return []
    newest = [r for r in records if r["run"] == records[-1]["run"]]
    return [f"## Serving: 100 mixed tasks ÷ the plain backbone ({newest[0]['cpu']}, batches of {newest[0]['batch']} "
            f"{texts}, {newest[0]['rounds']} rounds, every batch through every engine in turn; run {newest[0]['run']})",
            "", "| workload | examples/s (median) | ÷ plain, median of the rounds | range |", "|---|---|---|---|",
            *(f"| {r['workload']} | {r['examples_per_s']:.1f} | {r['vs_plain']:.3f} | "
              f"{r['vs_plain_range'][0]:.3f}–{r['vs_plain_range'][1]:.3f} |" for r in newest), ""]


def engine_part(backbone_spec: str, label: str, texts: list[str], count: int = BATCHES,
                profile_to: Path = PROFILE) -> list[dict]:
    backbone, store, names = synthetic_tasks(backbone_spec)
    work = batches(backbone.tokenizer, texts, count=count)
    one_mask = sum(p.numel() * 4 for n, p in backbone.model.named_parameters() if n.endswith(".weight") and "layer." in n
                   and "LayerNorm" not in n)
    rows, masks = names["row_delta"], names["structure_mask"]

    def ours_engines() -> dict:  # engines are built per group and freed before the next one
        return {"ours: 1 task (Dominant-1)": ours(backbone_spec, store, rows[:1]),
                "ours: 100 Dominant-1 mixed": ours(backbone_spec, store, rows),
                "ours: 100 structure masks mixed": ours(backbone_spec, store, masks),
                "ours: 100 LoRA r=8 mixed": ours(backbone_spec, store, names["lora"]),
                "ours: LoRA r=8 + Dominant-1 + structure masks, 99 mixed": ours(
                    backbone_spec, store, [n for trio in zip(names["lora"], rows, masks) for n in trio][:TASKS - 1]),
                "ours: 100 supermasks mixed (5% masked)": ours(backbone_spec, store, names["supermask"],
                                                               mask_cache_bytes=10 * one_mask)}

    def onnx_engines() -> dict:  # apart: ONNX Runtime's spinning threads would slow the torch engines run after them
        return {"ours, ONNX Runtime: 100 Dominant-1 mixed": ours(backbone_spec, store, rows, onnx_runtime),
                "ours, ONNX Runtime: 1 task": ours(backbone_spec, store, rows[:1], onnx_runtime)}

    def peer_engines() -> dict:
        return {**peft_engines(backbone),
                "full fine-tuned copies (10 resident), swapped per task group": full_copies(backbone)}

    measured, vs_plain = {}, {}
    for build in (ours_engines, onnx_engines, peer_engines):  # all engines at once would not fit for BERT-base
        got = rates({"plain backbone": lambda inputs, tasks: backbone.model(**inputs)} | build(), work)
        for workload, value in got.items():  # each group's ratios are against its own plain passes
            if workload not in measured:
                measured[workload], vs_plain[workload] = value, value / got["plain backbone"]
        gc.collect()
    profile(backbone_spec, store, names["row_delta"], work, label, profile_to)
    return [{"part": "engine", "backbone": label, "workload": k, "examples_per_s": v, "vs_plain": vs_plain[k]}
            for k, v in measured.items()]


def lora_part(texts: list[str], rounds: int) -> list[dict]:
    """Our LoRA mixed against peft's `adapter_names` mixed path, in one interleaved group with one
    plain backbone: per round, each against the plain passes and each other of that round."""
    backbone, store, names = synthetic_tasks(None)
    work = batches(backbone.tokenizer, texts)
    plain, ours_name, peft_name = "plain backbone", "ours: 100 LoRA r=8 mixed", "peft LoRA r=8 x100, adapter_names mixed"
    got = passes({plain: lambda inputs, tasks: backbone.model(**inputs), ours_name: ours(None, store, names["lora"]),
                  peft_name: peft_engines(backbone)[peft_name]}, work, rounds)
    return [{"part": "lora", "backbone": "MiniLM-L6 (bundled)", "round": i, "workload": workload, "examples_per_s": value,
             "vs_plain": value / got[plain][i], "vs_peft": value / got[peft_name][i]}
            for workload, values in got.items() for i, value in enumerate(values)]


def precision_part(backbone_spec: str | None, label: str, texts: list[str], count: int = BATCHES, size: int = BATCH,
                   dtypes: tuple[str, ...] = ("float32", "bfloat16", "int8")) -> list[dict]:
    """The workloads under each precision of the shared encoder, on DEVICE, against the float32
    plain backbone of the same group: one group per precision (each with its float32 plain
    passes interleaved), so a BERT-base-sized group fits in memory."""
    from ticketserve.core.backbone import fresh_copy
    from ticketserve.core.quantize import quantize_int8

    backbone, store, names = synthetic_tasks(backbone_spec)
    work = batches(backbone.tokenizer, texts, count=count, size=size)
    plain32 = backbone.model.to(DEVICE)
    records = []
    for name in dtypes:
        dtype, quantize = PRECISIONS[name]
        one_mask = sum(p.numel() * dtype.itemsize for n, p in backbone.model.named_parameters()
                       if n.endswith(".weight") and "layer." in n and "LayerNorm" not in n)
        plain = fresh_copy(backbone.model).to(DEVICE, dtype)
        if quantize == "int8":
            quantize_int8(plain)
        kw = {"dtype": dtype, "quantize": quantize}
        engines = {"plain backbone, float32": lambda inputs, tasks: plain32(**inputs),
                   f"plain backbone, {name}": lambda inputs, tasks, plain=plain: plain(**inputs),
                   f"ours: 1 task (Dominant-1), {name}": ours(backbone_spec, store, names["row_delta"][:1], **kw),
                   f"ours: 100 Dominant-1 mixed, {name}": ours(backbone_spec, store, names["row_delta"], **kw),
                   f"ours: 100 structure masks mixed, {name}": ours(backbone_spec, store, names["structure_mask"],
                                                                    **kw),
                   f"ours: 100 LoRA r=8 mixed, {name}": ours(backbone_spec, store, names["lora"], **kw),
                   f"ours: 100 supermasks mixed (5% masked), {name}": ours(backbone_spec, store, names["supermask"],
                                                                       mask_cache_bytes=10 * one_mask, **kw)}
        if quantize == "int8" and DEVICE.type == "cpu":  # ONNX Runtime's quantiser against ours
            for runtime_cls, variant in ((onnx_runtime, "float32"), (onnx_int8_runtime, "int8 (quantize_dynamic)")):
                engines[f"ours, ONNX Runtime {variant}: 1 task (Dominant-1)"] = ours(
                    backbone_spec, store, names["row_delta"][:1], runtime_cls)
                engines[f"ours, ONNX Runtime {variant}: 100 Dominant-1 mixed"] = ours(
                    backbone_spec, store, names["row_delta"], runtime_cls)
        if quantize == "none":  # peft has no int8 path of its own here
            engines[f"peft LoRA r=8 x100, adapter_names mixed, {name}"] = peft_engines(backbone, dtype)[
                "peft LoRA r=8 x100, adapter_names mixed"]
        got = rates(engines, work)
        for workload, value in got.items():
            if workload != "plain backbone, float32" or name == dtypes[0]:
                records.append({"part": "precision", "backbone": label, "batch": size,
                                "dtype": name, "workload": workload, "examples_per_s": value,
                                "vs_plain_float32": value / got["plain backbone, float32"]})
                print(json.dumps(records[-1]), flush=True)
        del engines, plain
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return records


def supermask_part(backbone_spec: str | None, label: str, texts: list[str], count: int = BATCHES,
                   shares: tuple[float, ...] = (0.02, 0.05, 0.07, 0.10, 0.50)) -> list[dict]:
    """100 supermask tasks mixed at each masked share, as corrections of the shared GEMM (the
    cache holding every task's masked positions), against the plain backbone and the
    materialised path (masked weight copies, a cache for 10) in the same run; plus each
    share's serving bytes per task and cold load."""
    import functools
    from unittest.mock import patch

    from ticketserve.core import artifact
    from ticketserve.core.backbone import dense_matrices, load_backbone
    from ticketserve.core.kinds import supermask as kind
    from ticketserve.registry import open_store
    from ticketserve.runtime.executor import Runtime

    backbone = load_backbone(backbone_spec)
    store = open_store(tempfile.mkdtemp(prefix="ts-bench-masks-"))
    work = batches(backbone.tokenizer, texts, count=count)
    one_copy = sum(m.weight.numel() * 4 for m in dense_matrices(backbone.model).values())
    engines, records = {"plain backbone": lambda inputs, tasks: backbone.model(**inputs)}, []
    for share in shares:
        names = [f"mask{share:g}-{i:03d}" for i in range(TASKS)]
        publish(store, backbone, "supermask", names, functools.partial(supermask, share=share))
        probe = Runtime(load_backbone(backbone_spec), device="cpu")
        with patch.object(kind, "MAX_CORRECTED_SHARE", 1.0):  # every share as a correction: where does it stop paying?
            started = time.perf_counter()
            task = probe.add(artifact.load(store, names[0], probe.backbone))
            load_ms = 1000 * (time.perf_counter() - started)
            serving_bytes = kind.masks_on(probe.shared).cache.bytes
            engines[f"ours: 100 supermasks mixed, {share:.0%} masked, as corrections"] = ours(
                backbone_spec, store, names, mask_cache_bytes=2 * TASKS * serving_bytes)
        records.append({"part": "supermask", "backbone": label, "masked_share": share,
                        "serving_bytes_per_task": serving_bytes, "materialised_bytes_per_task": one_copy,
                        "cold_load_ms": load_ms})
        probe.remove(task)
        if share == 0.05:
            with patch.object(kind, "MAX_CORRECTED_SHARE", -1.0):  # the materialised path, as before corrections
                engines[f"ours: 100 supermasks mixed, {share:.0%} masked, materialised, cache for 10"] = ours(
                    backbone_spec, store, names, mask_cache_bytes=10 * one_copy)
    got = rates(engines, work)
    for workload, value in got.items():
        records.append({"part": "supermask", "backbone": label, "workload": workload, "examples_per_s": value,
                        "vs_plain": value / got["plain backbone"]})
    for record in records:
        print(json.dumps(record), flush=True)
    return records


def profile(backbone_spec, store, names, work, label: str, to: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ticketserve.core import artifact
    from ticketserve.core.backbone import load_backbone
    from ticketserve.runtime.executor import Runtime

    backbone = load_backbone(backbone_spec)
    runtime = Runtime(backbone, device="cpu")
    loaded = [runtime.add(artifact.load(store, name, backbone)) for name in names]
    inputs, tasks = work[0]
    runtime.logits([loaded[t] for t in tasks], inputs)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for inputs, tasks in work[:3]:
            runtime.logits([loaded[t] for t in tasks], inputs)
    with to.open("a") as handle:
        handle.write(f"== {label}: 100 Dominant-1 tasks mixed, 3 batches of {BATCH} ==\n")
        handle.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15) + "\n")


# -- cold load, resident bytes, memory growth -------------------------------------------------

def load_part(texts: list[str]) -> list[dict]:
    from transformers import AutoModel

    from ticketserve.core import artifact
    from ticketserve.core.backbone import load_backbone
    from ticketserve.core.kinds.supermask import masks_on
    from ticketserve.registry import open_store
    from ticketserve.runtime.executor import Runtime

    backbone = load_backbone()
    store = open_store(tempfile.mkdtemp(prefix="ts-bench-load-"))
    records = []
    for kind in ("row_delta", "structure_mask", "supermask", "lora", "full"):
        names = [f"cold-{kind.replace('_', '-')}-{i}" for i in range(5)]
        publish(store, backbone, kind, names)
        runtime = Runtime(backbone, device="cpu")
        times, resident = [], []
        for name in names:
            started = time.perf_counter()
            task = runtime.add(artifact.load(store, name, backbone))
            times.append(time.perf_counter() - started)
            found = artifact.read(store, name)
            resident.append(masks_on(runtime.shared).cache.bytes if kind == "supermask"  # its serving form
                            else sum(t.numel() * t.element_size() for t in found.tensors.values()))
            runtime.remove(task)
        records.append({"part": "load", "kind": kind, "cold_load_ms_median": 1000 * sorted(times)[len(times) // 2],
                        "resident_bytes_per_task": resident[0], "payload_bytes": store.manifest(names[0]).payload_bytes})
    checkpoint = Path(tempfile.mkdtemp(prefix="ts-bench-ckpt-"))
    backbone.model.save_pretrained(checkpoint)
    started = time.perf_counter()
    AutoModel.from_pretrained(checkpoint, add_pooling_layer=False)
    records.append({"part": "load", "kind": "full fine-tuned checkpoint (from_pretrained)",
                    "cold_load_ms_median": 1000 * (time.perf_counter() - started),
                    "resident_bytes_per_task": sum(p.numel() * 4 for p in backbone.model.parameters())})

    names = [f"grow-{i:04d}" for i in range(1000)]
    publish(store, backbone, "row_delta", names)
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh heap: RSS growth is the tasks' alone
        return records + pool.apply(memory_growth, (str(store.root), names, texts))


def memory_growth(store_root: str, names: list[str], texts: list[str]) -> list[dict]:
    """RSS growth and mixed-batch throughput from 1 to 1000 resident Dominant-1 tasks."""
    from ticketserve.core import artifact
    from ticketserve.core.backbone import load_backbone
    from ticketserve.registry import open_store
    from ticketserve.runtime.executor import Runtime

    backbone, store = load_backbone(), open_store(store_root)
    runtime = Runtime(backbone, device="cpu")
    work = batches(backbone.tokenizer, texts, seed=1)[:3]
    with torch.inference_mode():  # activations and thread pools are allocated before the baseline
        for inputs, _ in work:
            backbone.model(**inputs)
    process = psutil.Process()
    gc.collect()
    base_rss = process.memory_info().rss
    records, loaded = [], []
    for count in (1, 10, 100, 1000):
        loaded += [runtime.add(artifact.load(store, name, backbone)) for name in names[len(loaded):count]]
        gc.collect()
        throughput = rate(lambda inputs, tasks: runtime.logits([loaded[(t * 10 + i) % count] for i, t in enumerate(tasks)],
                                                               inputs), work)
        records.append({"part": "growth", "tasks": count, "rss_growth_bytes": process.memory_info().rss - base_rss,
                        "mixed_examples_per_s": throughput})
    return records


def cores() -> tuple[list[int], list[int]]:
    """(the server's cores, the load's core): the last core for the load where there are two or
    more, so the load does not compete with what it measures; otherwise both share."""
    available = sorted(os.sched_getaffinity(0))
    return (available[:-1], available[-1:]) if len(available) > 1 else (available, available)


def pinned(command: list[str], cpus: list[int]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus)), *command]


def load(door: str, cpus: list[int], tasks: list[str], clients: int, seconds: float, env: dict,
         server: tuple[int, int] | None = None, sample_kernel: bool = False, **where) -> dict:
    """One run of benchmarks/system/loadgen.py on `cpus`: QPS, p50/p99, examples per forward pass,
    and the CPU, system CPU and minor faults per request of what serves — the server (`server`:
    its pid and metrics port, read over the window; then `load_cpu_share` is what the load itself
    cost) or the in-process engine; with `sample_kernel`, also the CPU the kernel spent on its
    memory (benchmarks/system/memory_kernel.py)."""
    options = sum(([f"--{k}", str(v)] for k, v in where.items()), [])
    child = subprocess.Popen(pinned([sys.executable, "-m", "benchmarks.system.loadgen", door, "--tasks", ",".join(tasks),
                                     "--clients", str(clients), "--seconds", str(seconds), *options], cpus),
                             stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    if child.stdout.readline().strip() != "measuring":
        child.wait()
        raise RuntimeError(f"loadgen {door} failed before measuring (exit {child.returncode})")
    before = (process_counters(server[0]), forward_passes(server[1])) if server else None
    sampler = memory_kernel.record(server[0] if server else child.pid, seconds) if sample_kernel else None
    result = json.loads(child.stdout.readline())
    child.wait()
    own = result.pop("own")
    if sampler is not None:
        result["memory_kernel_share"] = memory_kernel.memory_share(*sampler)
    if before is None:
        return result | own | memory_kernel_time(result, own["cpu_per_s"])
    faults, cpu, system = (after - first for after, first in zip(process_counters(server[0]), before[0]))
    examples, forwards = (after - first for after, first in zip(forward_passes(server[1]), before[1]))
    return result | {"mean_batch": examples / max(forwards, 1), "cpu_per_s": cpu / seconds,
                     "system_cpu_per_s": system / seconds, "faults_per_request": faults / max(result["requests"], 1),
                     "load_cpu_share": own["cpu_per_s"]} | memory_kernel_time(result, cpu / seconds)


def memory_kernel_time(result: dict, cpu_per_s: float) -> dict:
    """The kernel's memory-management CPU per second and per request, where it was sampled."""
    if "memory_kernel_share" not in result:
        return {}
    per_s = result["memory_kernel_share"] * cpu_per_s
    return {"memory_kernel_cpu_per_s": per_s, "memory_kernel_us_per_request": 1e6 * per_s / max(result["qps"], 1e-9)}


def forward_passes(metrics_port: int) -> tuple[float, float]:
    """(examples, forward passes) a server has run so far, from its batch-size histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        samples = {s.name: s.value for family in text_string_to_metric_families(answer.read().decode())
                   if family.name == "ticketserve_batch_size" for s in family.samples}
    return samples["ticketserve_batch_size_sum"], samples["ticketserve_batch_size_count"]


def process_counters(pid: int) -> tuple[int, float, float]:
    """Minor faults, CPU seconds (user + system) and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / ticks, int(fields[12]) / ticks


@contextlib.contextmanager
def served(registry: str, tasks: list[str], cpus: list[int], env: dict, http: bool = False):
    """A `ticketserve serve` pinned to `cpus` with `tasks` preloaded, once it answers: yields
    (its process, its gRPC port, its HTTP port or None, its metrics port); stopped (SIGTERM) on
    the way out."""
    grpc_port, http_port, metrics_port = free_port(), free_port() if http else None, free_port()
    command = [sys.executable, "-m", "ticketserve.cli", "serve", "--registry", registry, "--port", str(grpc_port),
               "--metrics-port", str(metrics_port),
               *(["--http-port", str(http_port)] if http else []), *sum((["--preload", t] for t in tasks), [])]
    server = subprocess.Popen(pinned(command, cpus), env=env, stderr=subprocess.DEVNULL)
    try:
        subprocess.run([sys.executable, "-m", "ticketserve.cli", "info", "--server", f"127.0.0.1:{grpc_port}", "--wait",
                        "300"], check=True, capture_output=True)
        yield server, grpc_port, http_port, metrics_port
    finally:
        server.terminate()
        server.wait(timeout=60)


def doors_part(seconds: float, clients: list[int], rounds: int, allocators: list[str]) -> list[dict]:
    """Each door of one `ticketserve serve` against the in-process Engine on the same core(s),
    the load in its own pinned process; rounds alternate the engine and the server. Once per
    malloc: glibc's (as `pip install` serves) and jemalloc (as the image serves), the engine
    under the same one as the server."""
    from ticketserve.core.backbone import load_backbone
    from ticketserve.registry import open_store

    backbone = load_backbone()
    registry = tempfile.mkdtemp(prefix="ts-bench-doors-")
    names = [f"door-d1-{i:03d}" for i in range(TASKS)]
    publish(open_store(registry), backbone, "row_delta", names)
    server_cpus, load_cpus = cores()
    records = []
    for allocator in allocators:
        env = {**os.environ, "OMP_NUM_THREADS": str(len(server_cpus)), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", **(jemalloc_environment() if allocator == "jemalloc" else {})}
        placement = {"server_cores": server_cpus, "load_cores": load_cpus, "allocator": allocator}
        records += _doors(registry, names, env, placement, seconds, clients, rounds)
    return records


def _doors(registry: str, names: list[str], env: dict, placement: dict, seconds: float, clients: list[int],
           rounds: int) -> list[dict]:
    from benchmarks.system.loadgen import DOORS

    server_cpus, load_cpus = placement["server_cores"], placement["load_cores"]
    records = []
    with served(registry, names, server_cpus, env, http=True) as (server, grpc_port, http_port, metrics_port):
        for round_ in range(rounds):
            for workload, pool in (("1 task", names[:1]), (f"{TASKS} tasks random", names)):
                for count in clients:
                    engine = load("engine", server_cpus, pool, count, seconds, env, registry=registry)
                    records.append({"part": "doors-engine", "round": round_, "workload": workload, "clients": count,
                                    **placement, **engine})
                    print(json.dumps(records[-1]), flush=True)
                    doors = DOORS if round_ % 2 == 0 else DOORS[::-1]
                    for door in doors:
                        port = grpc_port if "grpc" in door else http_port
                        result = load(door, load_cpus, pool, count, seconds, env, (server.pid, metrics_port), port=port)
                        records.append({"part": "doors", "round": round_, "protocol": door, "workload": workload,
                                        "clients": count, **placement, **result, "engine_qps": engine["qps"],
                                        "vs_in_process": result["qps"] / engine["qps"]})
                        print(json.dumps(records[-1]), flush=True)
    return records


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    global ROUNDS, DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="engine,load,doors")
    parser.add_argument("--seconds", type=float, default=20.0, help="per end-to-end measurement")
    parser.add_argument("--clients", default="32", help="doors: concurrent clients, comma-separated")
    parser.add_argument("--allocators", default="glibc,jemalloc", help="doors: the server's malloc, each in turn "
                                                                       "(jemalloc as the image runs it)")
    parser.add_argument("--skip-bert-base", action="store_true")
    parser.add_argument("--bert-base-batches", type=int, default=3, help="batches per BERT-base measurement")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds; each passes once per engine, in turn; the best pass counts")
    parser.add_argument("--device", default="cpu", help="where the precision part runs: cpu, cuda, cuda:1 …")
    parser.add_argument("--batch", type=int, default=BATCH, help="examples per batch in the precision part")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8", help="precision part: encoder precisions "
                                                                        "(float32, bfloat16, float16, int8)")
    parser.add_argument("--backbone", default=None, help="precision part: this checkpoint instead of MiniLM and "
                                                         "the BERT-base-sized encoder")
    parser.add_argument("--label", default=None, help="precision part with --backbone: its name in the report")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where records are appended (the report is "
                                                                      "written beside the default file only)")
    args = parser.parse_args()
    ROUNDS = args.rounds
    DEVICE = torch.device(args.device)
    texts = [json.loads(line)["sentence"] for line in SST2_DEV.read_text().splitlines()]
    run = {"run": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "rounds": args.rounds, "device": str(DEVICE),
           "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else cpu_name()}
    parts = args.parts.split(",")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)

    def keep(records: list[dict]) -> None:  # each part's results are saved as soon as it ends
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as handle:
            for record in records:
                handle.write(json.dumps(run | record) + "\n")
        write_report(args.results, REPORT if args.results == RESULTS else args.results.with_suffix(".md"))

    if "engine" in parts:  # the profile goes beside the results: a run elsewhere leaves the tracked one alone
        profile_to = PROFILE if args.results == RESULTS else args.results.with_name(f"{args.results.stem}-profile.txt")
        profile_to.unlink(missing_ok=True)
        keep(engine_part(None, "MiniLM-L6 (bundled)", texts, profile_to=profile_to))
        if not args.skip_bert_base:
            keep(engine_part(str(bert_base_like()), "BERT-base-sized (random)", texts, count=args.bert_base_batches,
                             profile_to=profile_to))
    if "lora" in parts:
        keep(lora_part(texts, max(args.rounds, 3)))
    if "precision" in parts:
        dtypes = tuple(args.dtypes.split(","))
        if args.backbone:
            keep(precision_part(args.backbone, args.label or Path(args.backbone).name, texts, args.bert_base_batches,
                                args.batch, dtypes))
        else:
            keep(precision_part(None, "MiniLM-L6 (bundled)", texts, BATCHES // 2, args.batch, dtypes))
            if not args.skip_bert_base:
                keep(precision_part(str(bert_base_like()), "BERT-base-sized (random)", texts, args.bert_base_batches,
                                    args.batch, dtypes))
    if "supermask" in parts:
        keep(supermask_part(None, "MiniLM-L6 (bundled)", texts))
        if not args.skip_bert_base:  # 50 % masked on BERT-base would need 8.5 GB of positions for 100 tasks
            keep(supermask_part(str(bert_base_like()), "BERT-base-sized (random)", texts, args.bert_base_batches,
                                (0.02, 0.05, 0.07, 0.10)))
    if "load" in parts:
        keep(load_part(texts))
    if "doors" in parts:
        keep(doors_part(args.seconds, [int(c) for c in args.clients.split(",")], max(args.rounds, 2),
                        args.allocators.split(",")))


def write_report(results: Path = RESULTS, report: Path = REPORT) -> None:
    """The report (benchmarks/system/serving.md) from the newest run of each part (and backbone and
    batch size) in the results (results/serving.jsonl)."""
    records = [json.loads(line) for line in results.read_text().splitlines()]
    newest = {}  # per part, and per backbone and batch where a part measures several (a run may skip BERT-base)
    for r in records:
        key = (r["part"], r.get("backbone"), r.get("batch"))
        newest[key] = max(newest.get(key, ""), r["run"])
    latest = [r for r in records if r["run"] == newest[(r["part"], r.get("backbone"), r.get("batch"))]]
    lines = ["# Serving benchmark (generated by `benchmarks/system/serving.py`)", "",
             f"CPU machine: {latest[0]['cpu_count']} cores, {latest[0]['torch_threads']} torch threads; device "
             f"{latest[0]['device']}. Batches of {BATCH} SST-2 dev sentences; in mixed workloads every example's task is "
             f"drawn from {TASKS}. Task artifacts are synthetic (right shapes, random values).", ""]
    engine = [r for r in latest if r["part"] == "engine"]
    for label in dict.fromkeys(r["backbone"] for r in engine):
        run = next(r["run"] for r in engine if r["backbone"] == label)
        lines += [f"## Engine throughput, {label} (run {run})", "", "| workload | examples/s | vs plain backbone |",
                  "|---|---|---|"]
        lines += [f"| {r['workload']} | {r['examples_per_s']:.1f} | {r['vs_plain']:.3f} |" for r in engine if r["backbone"] == label]
        lines.append("")
    precision = [r for r in latest if r["part"] == "precision"]
    for label, batch in dict.fromkeys((r["backbone"], r["batch"]) for r in precision):
        rows = [r for r in precision if r["backbone"] == label and r["batch"] == batch]
        lines += [f"## Precision of the shared encoder, {label}, batches of {batch}, {rows[0]['device']} "
                  f"({rows[0].get('device_name', '')}; run {rows[0]['run']})", "",
                  "| workload | examples/s | vs plain backbone, float32 |", "|---|---|---|"]
        lines += [f"| {r['workload']} | {r['examples_per_s']:.1f} | {r['vs_plain_float32']:.3f} |" for r in rows]
        lines.append("")
    masks = [r for r in latest if r["part"] == "supermask"]
    for label in dict.fromkeys(r["backbone"] for r in masks):
        rows = [r for r in masks if r["backbone"] == label]
        lines += [f"## Supermask tasks as corrections of the shared GEMM, {label} (run {rows[0]['run']})", "",
                  "| workload | examples/s | vs plain backbone |", "|---|---|---|"]
        lines += [f"| {r['workload']} | {r['examples_per_s']:.1f} | {r['vs_plain']:.3f} |" for r in rows if "workload" in r]
        lines += ["", "| masked share | serving bytes per task (masked positions) | materialised copy | cold load, ms |",
                  "|---|---|---|---|"]
        lines += [f"| {r['masked_share']:.0%} | {r['serving_bytes_per_task']:,} | {r['materialised_bytes_per_task']:,} | "
                  f"{r['cold_load_ms']:.1f} |"
                  for r in rows if "masked_share" in r]
        lines.append("")
    load = [r for r in latest if r["part"] == "load"]
    if load:
        lines += ["## Cold load (registry → servable) and resident bytes, MiniLM", "",
                  "| kind | cold load, median ms | resident bytes per task |", "|---|---|---|"]
        lines += [f"| {r['kind']} | {r['cold_load_ms_median']:.1f} | {r['resident_bytes_per_task']:,} |" for r in load]
        lines.append("")
    growth = [r for r in latest if r["part"] == "growth"]
    if growth:
        lines += ["## Memory growth with resident Dominant-1 tasks, MiniLM", "",
                  "| resident tasks | RSS growth | mixed-batch examples/s |", "|---|---|---|"]
        lines += [f"| {r['tasks']} | {r['rss_growth_bytes'] / 2**20:.1f} MiB | {r['mixed_examples_per_s']:.1f} |" for r in growth]
        lines.append("")
    from benchmarks.results import doors, lora_group

    lines += [line.replace("### ", "## ", 1) for line in lora_group(records) + doors(records)]
    discussion = HERE / "serving_discussion.md"
    tail = discussion.read_text() if report == REPORT and discussion.exists() else ""
    report.write_text("\n".join(lines) + "\n" + tail)


if __name__ == "__main__":
    main()
