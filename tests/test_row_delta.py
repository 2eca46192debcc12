"""row_delta: on-the-fly application equals materialised weights; mixed batches equal single runs."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import ByName, in_memory_artifact, random_row_delta
from ticketserve.core.backbone import dense_matrices, fresh_copy
from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds import get_kind
from ticketserve.core.kinds.row_delta import add_trainable, export, materialize, rows_on
from ticketserve.core.routing import Routing
from ticketserve.core.shared_encoder import SharedEncoder, TaskLinear
from ticketserve.runtime.executor import Runtime

TEXTS = ["a gripping, beautifully shot film", "the plot makes no sense at all", "fine.", "I would not watch it again, ever"]


def hidden(encoder, inputs):
    return encoder(**inputs).last_hidden_state


def test_on_the_fly_equals_materialised_weights(tiny_backbone):
    kind = get_kind("row_delta")
    tensors = random_row_delta(tiny_backbone, k=5)
    kind.validate(tensors, tiny_backbone.model)
    reference = copy.deepcopy(tiny_backbone.model)
    materialize(reference, tensors)
    inputs = tiny_backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    shared = SharedEncoder(fresh_copy(tiny_backbone.model))
    kind.attach(shared, 3, tensors)
    with torch.no_grad():
        on_the_fly = shared.encode(**inputs, routing=Routing.single(3, len(TEXTS)))
        dense = hidden(reference, inputs)
        untouched = shared.encode(**inputs)  # no routing: slot 0, which holds nothing
    torch.testing.assert_close(on_the_fly, dense, atol=1e-5, rtol=0)
    assert (on_the_fly - untouched).abs().max() > 1e-3  # the delta really changed the outputs


def test_materialise_matches_the_math_convention(tiny_backbone):
    """Row j < in of W̃ = [Wᵀ; b] is input feature j (column j of Linear.weight); row in is the bias."""
    name, linear = next(iter(dense_matrices(tiny_backbone.model).items()))
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    delta = torch.randn(2, linear.out_features)
    materialize(tiny_backbone.model, {f"{name}.index": torch.tensor([1, linear.in_features], dtype=torch.int32),
                                      f"{name}.delta": delta})
    expected = weight.clone()
    expected[:, 1] += delta[0]
    torch.testing.assert_close(linear.weight, expected)
    torch.testing.assert_close(linear.bias, bias + delta[1])


def test_mixed_task_batch_equals_each_task_alone(tiny_backbone):
    """Tasks of different shapes share one padded table: k = 4 with the bias row, k = 1 without
    it, the bias row only (BitFit), and rows in only the first matrices."""
    runtime = ByName(Runtime(tiny_backbone, device="cpu"))
    some = random_row_delta(tiny_backbone, k=2, seed=3)
    shapes = {"alpha": random_row_delta(tiny_backbone, k=4, seed=0),
              "beta": random_row_delta(tiny_backbone, k=1, seed=1, bias=False),
              "gamma": random_row_delta(tiny_backbone, k=0, seed=2),
              "delta": {key: some[key] for key in sorted(some)[:6]}}
    for seed, (name, tensors) in enumerate(shapes.items()):
        runtime.add(in_memory_artifact(tiny_backbone, name, tensors, seed=seed))
    names = ["alpha", "beta", "gamma", "delta", "beta", "alpha"]
    texts = TEXTS + TEXTS[:2]
    mixed = runtime.logits(names, runtime.tokenize(texts))
    for i, (name, text) in enumerate(zip(names, texts)):
        alone = runtime.logits([name], runtime.tokenize([text]))[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[1], runtime.logits(["alpha"], runtime.tokenize([TEXTS[1]]))[0], atol=1e-3)


def test_replacing_and_removing_a_task_detaches_its_rows(tiny_backbone):
    runtime = ByName(Runtime(tiny_backbone, device="cpu"))
    runtime.add(in_memory_artifact(tiny_backbone, "t", random_row_delta(tiny_backbone, seed=1)))
    first_slot = runtime.get("t").slot
    runtime.add(in_memory_artifact(tiny_backbone, "t", random_row_delta(tiny_backbone, seed=2)))
    tables = rows_on(runtime.shared).tables.values()
    assert all(first_slot not in table.slots for table in tables)
    runtime.remove("t")
    assert all(not table for table in tables)


def test_the_row_table_grows_reuses_freed_rows_and_widens_without_changing_results(tiny_backbone):
    runtime = ByName(Runtime(tiny_backbone, device="cpu"))
    for i in range(20):  # past the first growth step
        runtime.add(in_memory_artifact(tiny_backbone, f"t{i}", random_row_delta(tiny_backbone, k=1, seed=i), seed=i))
    table = next(iter(rows_on(runtime.shared).tables.values()))
    rows_before = len(table.tensors[0])
    for i in range(5):
        runtime.remove(f"t{i}")
    for i in range(3):  # freed rows are reused; k = 4 widens the table in place of a rebuild per task
        runtime.add(in_memory_artifact(tiny_backbone, f"w{i}", random_row_delta(tiny_backbone, k=4, seed=50 + i), seed=i))
    index, delta = table.tensors
    assert len(index) == rows_before and index.shape[1] == delta.shape[1] == 5  # 4 input rows and the bias row
    names = ["w0", "t7", "w2", "t19", "t5", "w1"]
    texts = TEXTS + TEXTS[:2]
    mixed = runtime.logits(names, runtime.tokenize(texts))
    for i, (name, text) in enumerate(zip(names, texts)):
        torch.testing.assert_close(mixed[i], runtime.logits([name], runtime.tokenize([text]))[0], atol=1e-5, rtol=0)
    reference = copy.deepcopy(tiny_backbone.model)  # a task written into a reused, widened row is exactly its payload
    tensors = random_row_delta(tiny_backbone, k=4, seed=51)
    materialize(reference, tensors)
    inputs = tiny_backbone.tokenizer(TEXTS[:1], return_tensors="pt")
    served = runtime.shared.encode(**inputs, routing=Routing.single(runtime.get("w1").slot, 1))
    torch.testing.assert_close(served, hidden(reference, inputs), atol=1e-5, rtol=0)


def test_trainable_rows_round_trip_through_the_payload(tiny_backbone):
    encoder = fresh_copy(tiny_backbone.model)
    shared = SharedEncoder(encoder)
    rows = {name: [0, 5, linear.in_features] for name, linear in dense_matrices(encoder).items()}
    params = add_trainable(shared, 0, rows)
    assert sum(p.numel() for p in params) == sum(3 * m.out_features for m in dense_matrices(encoder).values())
    with torch.no_grad():
        for p in params:
            p.normal_()
    tensors = export(shared, 0)
    inputs = tiny_backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        trained = hidden(encoder, inputs)  # slot 0 applies without routing
    get_kind("row_delta").detach(shared, 0)
    get_kind("row_delta").attach(shared, 9, tensors)
    with torch.no_grad():
        served = shared.encode(**inputs, routing=Routing.single(9, len(TEXTS)))
    torch.testing.assert_close(served, trained, atol=1e-6, rtol=0)


@pytest.mark.parametrize("damage", ["shape", "range", "duplicate", "unknown", "dtype", "orphan"])
def test_validate_rejects_payloads_that_do_not_fit(tiny_backbone, damage):
    tensors = random_row_delta(tiny_backbone, k=2)
    name = next(iter(dense_matrices(tiny_backbone.model)))
    if damage == "shape":
        tensors[f"{name}.delta"] = tensors[f"{name}.delta"][:, :-1]
    elif damage == "range":
        tensors[f"{name}.index"][0] = 10_000
    elif damage == "duplicate":
        tensors[f"{name}.index"][1] = tensors[f"{name}.index"][0]
    elif damage == "unknown":
        tensors["encoder.layer.99.attention.self.query.index"] = tensors.pop(f"{name}.index")
        tensors["encoder.layer.99.attention.self.query.delta"] = tensors.pop(f"{name}.delta")
    elif damage == "dtype":
        tensors[f"{name}.index"] = tensors[f"{name}.index"].float()
    else:
        del tensors[f"{name}.delta"]
    with pytest.raises(CorruptArtifact):
        get_kind("row_delta").validate(tensors, tiny_backbone.model)


def test_a_full_task_shares_no_rows_and_leaves_the_row_tasks_intact(tiny_backbone):
    from ticketserve.core.kinds.full import changed_tensors

    tuned = copy.deepcopy(tiny_backbone.model)
    reference = {k: v.clone() for k, v in tuned.state_dict().items()}
    runtime = ByName(Runtime(tiny_backbone, device="cpu"))
    runtime.add(in_memory_artifact(tiny_backbone, "rows", random_row_delta(tiny_backbone, seed=3)))
    before = runtime.logits(["rows"], runtime.tokenize(TEXTS[:1]))[0]
    with torch.no_grad():
        tuned.encoder.layer[1].attention.self.query.weight.mul_(1.5)
    runtime.add(in_memory_artifact(tiny_backbone, "full", changed_tensors(tuned.state_dict(), reference), kind="full"))
    private = runtime.get("full").encoder
    assert not any(isinstance(m, TaskLinear) for m in private.modules())  # the copy serves no row task
    inputs = runtime.tokenize(TEXTS[:1])
    with torch.no_grad():
        torch.testing.assert_close(private(**inputs).last_hidden_state, tuned(**inputs).last_hidden_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(runtime.logits(["rows"], inputs)[0], before, atol=0, rtol=0)
