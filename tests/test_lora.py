"""lora: the factors applied on the fly equal the merged weights W + s·B·A, alone and mixed per
example with other tasks (different ranks, different matrices) in one batch; the compiled
gather-free kernel equals the batched matmuls at every dispatch level this CPU runs."""

from __future__ import annotations

import pytest
import torch

from tests.test_kinds import SAMPLES
from ticketserve.core import kernels
from ticketserve.core.backbone import fresh_copy
from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds import get_kind
from ticketserve.core.kinds.lora import add_in_place, low_rank
from ticketserve.core.routing import Routing
from ticketserve.core.shared_encoder import SharedEncoder

TEXTS = ["a gripping, beautifully shot film", "the plot makes no sense at all", "fine.", "I would not watch it again"]


def hidden(encoder, inputs):
    return encoder(**inputs).last_hidden_state


def merged(backbone, tensors):
    """The reference: a fresh encoder whose weights are W + s·B·A (its own copies of those)."""
    return fresh_copy(backbone.model, get_kind("lora").dense_state(backbone.model, tensors))


def test_on_the_fly_equals_merged_weights_alone_and_mixed(tiny_backbone):
    kind = get_kind("lora")
    first, second = SAMPLES["lora"](tiny_backbone, 1), SAMPLES["lora"](tiny_backbone, 2)  # ranks 3 and 4
    assert first["encoder.layer.0.attention.self.query.lora_A"].shape[0] != \
        second["encoder.layer.0.attention.self.query.lora_A"].shape[0]
    inputs = tiny_backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        references = [hidden(merged(tiny_backbone, t), inputs) for t in (first, second)]
        plain = hidden(tiny_backbone.model, inputs)
    shared = SharedEncoder(fresh_copy(tiny_backbone.model))
    kind.attach(shared, 5, first)
    kind.attach(shared, 6, second)
    with torch.no_grad():
        alone = shared.encode(**inputs, routing=Routing.single(5, len(TEXTS)))
        mixed = shared.encode(**inputs, routing=Routing([5, 6, 0, 6]))  # two ranks and a plain example in one batch
    torch.testing.assert_close(alone, references[0], atol=1e-5, rtol=0)
    for i, want in enumerate([references[0][0], references[1][1], plain[2], references[1][3]]):
        torch.testing.assert_close(mixed[i], want, atol=1e-5, rtol=0)
    assert (alone - plain).abs().max() > 1e-3  # the factors really changed the outputs
    kind.detach(shared, 5)
    kind.detach(shared, 6)
    with torch.no_grad():
        torch.testing.assert_close(shared.encode(**inputs, routing=Routing([5, 6, 0, 6])), plain, atol=0, rtol=0)


@pytest.mark.parametrize("damage", ["rank mismatch", "no scaling", "a vector scaling", "infinite", "unknown matrix"])
def test_factors_that_cannot_be_applied_exactly_are_refused(tiny_backbone, damage):
    tensors = SAMPLES["lora"](tiny_backbone, 1)
    name = "encoder.layer.0.attention.self.query"
    if damage == "rank mismatch":
        tensors[f"{name}.lora_B"] = tensors[f"{name}.lora_B"][:, :-1]
    elif damage == "no scaling":
        del tensors[f"{name}.scaling"]
    elif damage == "a vector scaling":
        tensors[f"{name}.scaling"] = torch.ones(2)
    elif damage == "infinite":
        tensors[f"{name}.lora_A"][0, 0] = float("inf")
    else:
        tensors = {k.replace(name, "encoder.layer.0.attention.self.nothing"): v for k, v in tensors.items()}
    with pytest.raises(CorruptArtifact):
        get_kind("lora").validate(tensors, tiny_backbone.model)


@pytest.mark.parametrize("level", range(kernels.best_level() + 1))
@pytest.mark.parametrize(("width", "out", "rank"), [(48, 64, 8), (64, 160, 11), (40, 24, 3)])
def test_the_gather_free_kernel_equals_the_batched_matmuls(level, width, out, rank):
    """Every example's factors read in place from the tables (row 0: none) give what gathering
    them and two batched matmuls give, on each example's real tokens, whatever the thread count;
    padding positions are left as they were. Widths not multiples of 16 and ranks not multiples
    of 8 take the kernel's remainder paths."""
    generator = torch.Generator().manual_seed(width + rank)
    table_a, table_b = torch.randn(6, rank, width, generator=generator), torch.randn(6, rank, out, generator=generator)
    table_a[0], table_b[0] = 0, 0
    table_a[3, rank - 1], table_b[3, rank - 1] = 0, 0  # a task of a lower rank, zero-padded
    rows, lengths = [1, 0, 3, 5, 1, 2, 4], [37, 20, 1, 33, 0, 16, 9]
    x = torch.randn(len(rows), 37, width, generator=generator)
    before = torch.randn(len(rows), 37, out, generator=generator)
    index = torch.tensor(rows)
    want = before.baddbmm(low_rank(table_a[index], x), table_b[index])
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            y = before.clone()
            add_in_place(y, x, (table_a, table_b), rows, lengths, level=level)
            for e, length in enumerate(lengths):
                torch.testing.assert_close(y[e, :length], want[e, :length], atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(y[e, length:], before[e, length:], atol=0, rtol=0)
    finally:
        torch.set_num_threads(threads)
