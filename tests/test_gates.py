"""Head and FFN gates: equalities with the plain model, padding, mixed gate patterns, pruning."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import ByName, in_memory_artifact, random_row_delta
from ticketserve.core.backbone import fresh_copy
from ticketserve.core.gates import Gates
from ticketserve.core.kinds.structure_mask import to_tensors
from ticketserve.core.shared_encoder import SharedEncoder
from ticketserve.runtime.executor import Runtime
from ticketserve.trainers.pruning import level_counts, prune

TEXTS = ["the cast is wonderful", "a mess", "it has moments, but not many of them", "solid"]


def run(encoder, inputs):
    with torch.no_grad():
        return encoder(**inputs).last_hidden_state


def ones(encoder, batch: int) -> Gates:
    c = encoder.config
    return Gates(torch.ones(batch, c.num_hidden_layers, c.num_attention_heads), torch.ones(batch, c.num_hidden_layers))


def test_all_gates_open_equal_the_plain_model(tiny_backbone):
    inputs = tiny_backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    plain = run(tiny_backbone.model, inputs)
    shared = SharedEncoder(fresh_copy(tiny_backbone.model))
    with torch.no_grad():
        gated = shared.encode(**inputs, gates=ones(tiny_backbone.model, len(TEXTS)))
    torch.testing.assert_close(gated, plain, atol=1e-6, rtol=0)


def test_closed_head_equals_its_context_zeroed_and_closed_ffn_gives_layernorm_of_residual(tiny_backbone):
    encoder = fresh_copy(tiny_backbone.model)
    inputs = tiny_backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    head_dim = encoder.config.hidden_size // encoder.config.num_attention_heads
    reference = copy.deepcopy(encoder)
    with torch.no_grad():  # head 1 of layer 0: its context never reaches O
        reference.encoder.layer[0].attention.output.dense.weight[:, head_dim:2 * head_dim] = 0
        ffn = reference.encoder.layer[1].output.dense  # FFN of layer 1 adds nothing to the residual
        ffn.weight.zero_()
        ffn.bias.zero_()
    shared = SharedEncoder(encoder)
    closed = ones(encoder, len(TEXTS))
    closed.heads[:, 0, 1] = 0
    closed.ffn[:, 1] = 0
    with torch.no_grad():
        gated = shared.encode(**inputs, gates=closed)
    torch.testing.assert_close(gated, run(reference, inputs), atol=1e-5, rtol=0)
    assert (gated - run(encoder, inputs)).abs().max() > 1e-3


def test_padding_stays_masked_and_patterns_mix_per_example(tiny_backbone):
    runtime = ByName(Runtime(tiny_backbone, device="cpu"))
    layers, heads = tiny_backbone.config.num_hidden_layers, tiny_backbone.config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    for seed, name in enumerate(["s1", "s2"]):
        keep = torch.rand(layers, heads, generator=generator) > 0.4
        keep[:, 0] = True
        runtime.add(in_memory_artifact(tiny_backbone, name, to_tensors(keep, torch.tensor([True, seed == 0])),
                                       seed=seed, kind="structure_mask"))
    runtime.add(in_memory_artifact(tiny_backbone, "rows", random_row_delta(tiny_backbone), seed=5))
    names = ["s1", "s2", "rows", "s1"]
    mixed = runtime.logits(names, runtime.tokenize(TEXTS))  # padded to the longest text
    for i, name in enumerate(names):
        alone = runtime.logits([name], runtime.tokenize([TEXTS[i]]))[0]  # no padding at all
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[0], runtime.logits(["s2"], runtime.tokenize([TEXTS[0]]))[0], atol=1e-4)


def test_gates_hold_when_row_delta_tasks_come_after_them(tiny_backbone):
    """Gates and row deltas meet in the same shared layers, whatever came first (a structure
    mask loaded before the first row-delta task was once silently ungated)."""
    config = tiny_backbone.config
    keep = torch.ones(config.num_hidden_layers, config.num_attention_heads, dtype=torch.bool)
    keep[0, 1] = False
    runtime = Runtime(tiny_backbone, device="cpu")
    gated = runtime.add(in_memory_artifact(tiny_backbone, "gated", to_tensors(keep, torch.tensor([False, True])), seed=1,
                                           kind="structure_mask"))
    opened = runtime.add(in_memory_artifact(tiny_backbone, "open", to_tensors(torch.ones_like(keep), torch.ones(2)), seed=1,
                                            kind="structure_mask"))
    inputs = runtime.tokenize(TEXTS[:1])
    before = runtime.logits([gated], inputs)[0]
    assert not torch.allclose(before, runtime.logits([opened], inputs)[0], atol=1e-4)  # the gates do something
    runtime.add(in_memory_artifact(tiny_backbone, "rows", random_row_delta(tiny_backbone), seed=2))
    torch.testing.assert_close(runtime.logits([gated], inputs)[0], before, atol=0, rtol=0)


def test_per_token_gates_carry_gradients():
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=32), add_pooling_layer=False).eval()
    shared = SharedEncoder(encoder)
    ids = torch.randint(0, 50, (3, 5))
    heads = torch.ones(3, 5, 2, 4, requires_grad=True)
    ffn = torch.ones(3, 5, 2, requires_grad=True)
    shared.encode(ids, torch.ones_like(ids), gates=Gates(heads, ffn)).sum().backward()
    assert heads.grad.abs().sum() > 0 and ffn.grad.abs().sum() > 0


def test_level_counts_follow_the_reference_pairing():
    assert [level_counts(p, 12, 12) for p in (0.1, 0.2, 0.3)] == [(14, 1), (28, 2), (43, 3)]
    assert level_counts(0.0, 6, 12) == (0, 0) and level_counts(0.5, 6, 12) == (36, 3)


@pytest.mark.parametrize("kind", ["winning", "losing", "random"])
def test_pruning_keeps_a_head_per_layer_and_picks_by_kind(kind):
    scores = torch.arange(24, dtype=torch.float32).reshape(4, 6)  # layer 0 least important
    ffn_scores = torch.tensor([3.0, 1.0, 2.0, 0.0])
    keep_heads, keep_ffn = prune(scores, ffn_scores, 0.5, kind, seed=1)
    assert (~keep_heads).sum() == 12 and (~keep_ffn).sum() == 2
    assert (keep_heads.sum(1) >= 1).all()
    if kind == "winning":
        assert keep_heads[0].sum() == 1 and keep_heads[3].all() and keep_ffn.tolist() == [True, False, True, False]
    if kind == "losing":
        assert keep_heads[0].all() and keep_ffn.tolist() == [False, True, False, True]
