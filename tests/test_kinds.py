"""One suite for every registered task kind — and proof that a kind is one file.

`ToyShift`, defined here and nowhere else, is a kind that shares the backbone and keeps
per-task state of its own (a vector added to one dense matrix's output: a `Terms` of the
shared encoder, its vectors in the shared slot table). It registers itself
like any kind, so every test below runs it next to the real kinds: served mixed with them in
one batch, on torch and on ONNX (where it has no graph form and runs on torch, explicitly).
A new kind joins by adding one sample payload to SAMPLES (a test checks that none is missing).
"""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch
from torch import nn

from tests.helpers import TEXTS, in_memory_artifact, random_row_delta
from ticketserve.core import synthetic
from ticketserve.core.backbone import dense_matrices, load_backbone
from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds import Kind, Tensors, get_kind, kinds, register_kind
from ticketserve.core.kinds.full import PREFIX
from ticketserve.core.kinds.structure_mask import to_tensors
from ticketserve.core.kinds.supermask import encode_masks
from ticketserve.core.routing import DEFAULT_SLOT, Routing
from ticketserve.core.shared_encoder import SharedEncoder, Terms
from ticketserve.core.slot_table import Column, SlotTable
from ticketserve.runtime.executor import Runtime

SHIFT = "toy.shift"
SHIFTED = "encoder.layer.0.attention.output.dense"  # the matrix whose output it shifts


class Shifts(Terms):
    """ToyShift's tasks on one shared encoder: one vector per task, in the shared slot table."""

    def __init__(self, shared: SharedEncoder):
        self.table = SlotTable(Column((shared.config.hidden_size,), padded=False))

    def add(self, matrix, layer, x, y, routing):
        if matrix != SHIFTED or not self.table:
            return y
        (shift,) = self.table.for_batch(routing or Routing.single(DEFAULT_SLOT, len(y)))
        return y + shift.unsqueeze(1).to(y.dtype)


@register_kind
class ToyShift(Kind):
    """Adds a per-task vector to one dense matrix's output, for the examples routed to its slots."""

    name = "toy_shift"

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        if set(tensors) != {SHIFT} or tensors[SHIFT].shape != (encoder.config.hidden_size,) \
                or not tensors[SHIFT].is_floating_point():
            raise CorruptArtifact(f"a toy_shift holds exactly {SHIFT}: float[hidden]")

    def attach(self, shared: SharedEncoder, slot: int, tensors: Tensors) -> nn.Module:
        shared.state(self.name, Shifts).table.put(slot, 0, (tensors[SHIFT].to(shared.device),))
        return shared.module

    def detach(self, shared: SharedEncoder, slot: int) -> None:
        shared.state(self.name, Shifts).table.drop(slot)


def _full(backbone, seed: int) -> Tensors:
    generator = torch.Generator().manual_seed(seed)
    name = next(iter(dense_matrices(backbone.model)))
    weight = backbone.model.get_parameter(f"{name}.weight")
    return {f"{PREFIX}{name}.weight": (weight + 0.2 * torch.randn(weight.shape, generator=generator)).detach()}


def _gates(backbone, seed: int) -> Tensors:
    config = backbone.config
    keep = torch.ones(config.num_hidden_layers, config.num_attention_heads, dtype=torch.bool)
    keep[0, seed % config.num_attention_heads] = False
    return to_tensors(keep, torch.tensor([seed % 2 == 0] + [True] * (config.num_hidden_layers - 1)))


def _lora(backbone, seed: int) -> Tensors:
    """Query and value of every layer (the PEFT default for BERT), rank 2–4 by seed."""
    return synthetic.lora(backbone, rank=2 + seed % 3, seed=seed, matrices=("query", "value"), scale=0.3)


def _scores(backbone, seed: int) -> Tensors:
    config, generator = backbone.config, torch.Generator().manual_seed(seed)
    return {"importance.heads": torch.rand(config.num_hidden_layers, config.num_attention_heads, generator=generator),
            "importance.ffn": torch.rand(config.num_hidden_layers, generator=generator)}


def _sweep(backbone, seed: int) -> Tensors:
    levels = {f"level-{p}.{k}": v for p in (0, 20) for k, v in _gates(backbone, seed + p).items()}
    return _scores(backbone, seed) | levels


def _ticket(backbone, seed: int) -> Tensors:
    generator = torch.Generator().manual_seed(seed)
    return {f"{n}.counts": torch.randint(0, 5, (m.in_features + 1,), generator=generator, dtype=torch.int32)
            for n, m in dense_matrices(backbone.model).items()}


RECORDS = {  # kinds that are not tasks: records of analyses, and whole encoders
    "importance": _scores,
    "superticket": _sweep,
    "ticket": _ticket,
    "backbone": lambda backbone, seed: {k: v.clone() for k, v in backbone.model.state_dict().items()},
}
SAMPLES = {  # kind → a valid payload (without the head) for a backbone, varied by seed
    "row_delta": lambda backbone, seed: random_row_delta(backbone, k=2, seed=seed, scale=0.3),
    "supermask": lambda backbone, seed: encode_masks(synthetic.masks(backbone, 0.2, seed)),
    "structure_mask": _gates,
    "full": _full,
    "lora": _lora,
    "plain": lambda backbone, seed: {},
    "toy_shift": lambda backbone, seed: {SHIFT: torch.randn(backbone.config.hidden_size,
                                                            generator=torch.Generator().manual_seed(seed))},
}
TASK_KINDS = sorted(name for name, kind in kinds().items() if kind.is_task)


def _artifact(backbone, kind: str, seed: int, name: str | None = None):
    return in_memory_artifact(backbone, name or f"{kind}-{seed}", SAMPLES[kind](backbone, seed), seed=seed, kind=kind)


def _company(backbone) -> list:
    """A task of every other real kind, to serve beside the one under test."""
    return [_artifact(backbone, kind, 10 + i) for i, kind in enumerate(("row_delta", "structure_mask", "supermask", "full"))]


def test_every_registered_kind_is_in_this_suite():
    assert "toy_shift" in TASK_KINDS  # registered from this module alone
    assert set(TASK_KINDS) <= set(SAMPLES), f"add a sample payload for {set(TASK_KINDS) - set(SAMPLES)}"
    assert set(kinds()) == set(SAMPLES) | set(RECORDS), f"add a sample for {set(kinds()) - set(SAMPLES) - set(RECORDS)}"


@pytest.mark.parametrize("kind", sorted(kinds()))
def test_damaged_payloads_are_refused(kind, tiny_checkpoints):
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    good = (SAMPLES | RECORDS)[kind](backbone, 1)
    get_kind(kind).validate(good, backbone.model)
    damaged = {"a foreign tensor": good | {"encoder.no.such.tensor": torch.zeros(3)}}
    if good:  # a plain payload is empty: nothing to reshape
        first = next(iter(good))
        damaged |= {
            "a wrong shape": good | {first: good[first].flatten()[:-1] if good[first].numel() > 1 else torch.zeros(2, 2)},
            "a wrong dtype": good | {first: good[first].to(torch.int64 if good[first].is_floating_point() else torch.float32)},
        }
    for what, tensors in damaged.items():
        with pytest.raises(CorruptArtifact):
            get_kind(kind).validate(tensors, backbone.model)
            pytest.fail(f"{kind} accepted {what}")


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_attach_then_detach_leaves_no_residue(kind, tiny_backbone):
    runtime = Runtime(tiny_backbone, device="cpu")
    company = [runtime.add(a) for a in _company(tiny_backbone)]
    inputs = runtime.tokenize(TEXTS[:len(company)])
    state = {k: v.clone() for k, v in runtime.encoder.state_dict().items()}
    before = runtime.logits(company, inputs)

    found = _artifact(tiny_backbone, kind, 3)
    payload = [weakref.ref(t) for t in found.kind_tensors.values()]
    task = runtime.add(found)
    runtime.logits([task, *company[1:]], inputs)  # used in a mixed batch, so its kind built what it builds
    own_encoder = None if task.encoder is runtime.encoder else weakref.ref(task.encoder)
    runtime.remove(task)
    del task, found
    gc.collect()

    assert all(ref() is None for ref in payload), f"{kind} keeps its payload after detach"
    assert own_encoder is None or own_encoder() is None, f"{kind} keeps its encoder after detach"
    for key, value in runtime.encoder.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)
    for got, want in zip(runtime.logits(company, inputs), before):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_a_mixed_batch_equals_each_task_alone(kind, tiny_backbone):
    runtime = Runtime(tiny_backbone, device="cpu")
    tasks = [runtime.add(_artifact(tiny_backbone, kind, 1)), *(runtime.add(a) for a in _company(tiny_backbone)),
             runtime.add(_artifact(tiny_backbone, kind, 2))]
    texts = TEXTS[:len(tasks)]
    mixed = runtime.logits(tasks, runtime.tokenize(texts))
    for i, (task, text) in enumerate(zip(tasks, texts)):
        alone = runtime.logits([task], runtime.tokenize([text]))[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[0], runtime.logits([tasks[-1]], runtime.tokenize(texts[:1]))[0], atol=1e-4)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """One export per tiny backbone for the whole module (exports are cached by fingerprint)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "onnx-cache"))
        yield


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_onnx_equals_torch(kind, tiny_checkpoints, onnx_cache):
    for arch in ("bert", "roberta"):
        path = str(tiny_checkpoints[arch])
        torch_runtime, onnx_runtime = Runtime(load_backbone(path), device="cpu"), Runtime(load_backbone(path), backend="onnx")
        artifacts = [_artifact(torch_runtime.backbone, kind, 1), *_company(torch_runtime.backbone),
                     _artifact(torch_runtime.backbone, kind, 2)]
        expected = torch_runtime.logits([torch_runtime.add(a) for a in artifacts], torch_runtime.tokenize(TEXTS[:6]))
        served = onnx_runtime.logits([onnx_runtime.add(a) for a in artifacts], onnx_runtime.tokenize(TEXTS[:6]))
        for got, want in zip(served, expected):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        in_graph = {task.kind.name for task in (onnx_runtime.add(a) for a in artifacts[:1])
                    if onnx_runtime.backend.group(task)[0] == "graph"}
        assert (kind in in_graph) == get_kind(kind).in_graph  # a kind without a graph form runs on torch


def test_attach_order_cannot_change_a_single_bit(tiny_backbone):
    """One task of every task kind, attached in every order (with a detach and re-attach in
    between every other time): the mixed batch's logits are bit-identical."""
    runtime = Runtime(tiny_backbone, device="cpu")
    stateful = [kind for kind in TASK_KINDS if kind != "plain"]  # plain attaches nothing
    artifacts = [_artifact(tiny_backbone, kind, 1) for kind in stateful]
    for found in artifacts:  # checked once, as the registry's load does
        found.prepared = get_kind(found.manifest.kind).prepare(found.kind_tensors, tiny_backbone.model)
    inputs = runtime.tokenize(TEXTS[:len(artifacts)])
    expected, tasks = None, {}
    for n, order in enumerate(itertools.permutations(range(len(artifacts)))):
        for task in tasks.values():
            runtime.remove(task)
        tasks = {}
        for position, i in enumerate(order):
            tasks[i] = runtime.add(artifacts[i])
            if n % 2 and position == len(order) // 2:  # one task leaves and comes back mid-way
                runtime.remove(tasks[order[0]])
                tasks[order[0]] = runtime.add(artifacts[order[0]])
        logits = torch.stack(runtime.logits([tasks[i] for i in range(len(artifacts))], inputs))
        if expected is None:
            expected = logits
        assert torch.equal(logits, expected), f"attach order {[stateful[i] for i in order]} changed the logits"
