"""Supermasks: straight-through gradients, initial sparsity, lossless codecs, exact serving."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from tests.helpers import ByName, in_memory_artifact, manifest_for, random_head, random_row_delta
from ticketserve.core import artifact, synthetic
from ticketserve.core.backbone import dense_matrices, load_backbone
from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds import get_kind
from ticketserve.core.kinds.supermask import (CODECS, MAX_CORRECTED_SHARE, MaskCache, decode_mask, decode_masks,
                                              encode_mask, encode_masks, magnitude_mask, masks_on)
from ticketserve.core.routing import Routing
from ticketserve.core.tasks import get_task
from ticketserve.runtime.executor import Runtime
from ticketserve.trainers.config import TrainConfig
from ticketserve.trainers.run import train
from ticketserve.trainers.supermask import ScoreMask, SupermaskOptions, select_weights

TEXTS = ["what a ride", "boring from start to finish", "an honest, heartfelt story", "no"]


def test_straight_through_gradient_matches_the_analytic_expectation():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=False)
    mask = ScoreMask(layer.weight, init_sparsity=0.0, init_score=0.7)
    with torch.no_grad():
        mask.scores.normal_()
    parametrize.register_parametrization(layer, "weight", mask)
    x = torch.randn(4, 5)
    layer(x).sum().backward()
    w0 = layer.parametrizations.weight.original.detach()
    p = torch.sigmoid(mask.scores.detach())
    # d/dν Σ (W0 ⊙ μ)x with μ = b + p − sg(p): x summed over the batch · W0 · σ'(ν), whatever b was drawn
    expected = w0 * x.sum(0).unsqueeze(0) * p * (1 - p)
    torch.testing.assert_close(mask.scores.grad, expected)
    assert mask.scores.grad.abs().sum() > 0


def test_eval_uses_the_deterministic_mask_and_sampling_is_bernoulli():
    weight = torch.ones(200, 50)
    mask = ScoreMask(weight, 0.0, 5.0)
    with torch.no_grad():
        mask.scores[:100] = -5.0
        mask.scores[100:150] = 0.0  # p = 0.5: sampled half the time
    mask.eval()
    assert torch.equal(mask(weight), (mask.scores > 0).float())
    mask.sample = True
    drawn = mask(weight)[100:150].mean().item()
    assert 0.4 < drawn < 0.6


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5])
def test_init_sparsity_masks_exactly_the_smallest_weights(fraction):
    weight = torch.randn(64, 48)
    mask = ScoreMask(weight, fraction, 5.0)
    off = ~mask.deterministic()
    assert off.sum().item() == round(fraction * weight.numel())
    if fraction:
        assert weight.abs()[off].max() <= weight.abs()[~off].min()


@pytest.mark.parametrize("zeros", [0.0, 0.01, 0.13, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(7, 3), (96, 40), (1, 1)])
def test_every_codec_round_trips_losslessly(zeros, shape):
    generator = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=generator) >= zeros
    data, codec = encode_mask(mask)
    assert torch.equal(decode_mask(data, codec, torch.Size(shape), "m"), mask)
    packed_len = (mask.numel() + 7) // 8
    assert data.numel() <= packed_len  # the chosen codec is never worse than raw bits
    for codec_id in CODECS:  # and each codec on its own is lossless
        import numpy as np

        packed = np.packbits(mask.flatten().numpy().astype("uint8")).tobytes()
        encoded = CODECS[codec_id][1](packed, mask.numel())
        restored = decode_mask(torch.frombuffer(bytearray(encoded), dtype=torch.uint8) if encoded else torch.zeros(0, dtype=torch.uint8),
                               torch.tensor([codec_id], dtype=torch.uint8), torch.Size(shape), "m")
        assert torch.equal(restored, mask)


def test_low_sparsity_masks_compress_below_one_bit_per_weight():
    mask = torch.rand(384, 1536, generator=torch.Generator().manual_seed(0)) >= 0.05
    data, _ = encode_mask(mask)
    assert data.numel() * 8 / mask.numel() < 0.45


@pytest.mark.parametrize("dropped", [0, 1, 5, 17, 48])
def test_magnitude_mask_drops_the_smallest_with_ties_broken_by_position(dropped):
    weight = torch.tensor([[0.3, -0.1, 0.2, 0.1], [-0.2, 0.1, 0.0, -0.3]]).repeat(3, 2)  # many exact ties
    expected = torch.ones(weight.numel(), dtype=torch.bool)
    expected[weight.abs().flatten().argsort(stable=True)[:dropped]] = False
    assert torch.equal(magnitude_mask(weight, dropped), expected.reshape(weight.shape))


def test_masks_from_a_magnitude_start_are_coded_as_their_flips():
    generator = torch.Generator().manual_seed(0)
    weights = {"m": torch.randn(384, 1536, generator=generator)}
    dropped = {"m": weights["m"].numel() // 2}
    mask = magnitude_mask(weights["m"], dropped["m"])
    flips = torch.rand(mask.shape, generator=generator) < 0.01
    trained = {"m": mask ^ flips}
    plain, relative = encode_masks(trained), encode_masks(trained, weights, dropped)
    assert "m.reference" in relative and "m.reference" not in plain
    assert torch.equal(decode_masks(relative, weights)["m"], trained["m"])
    assert relative["m.mask"].numel() * 4 < plain["m.mask"].numel()  # 1 % flips vs a 50 % mask
    unrelated = {"m": torch.rand(mask.shape, generator=generator) >= 0.05}  # reference would not help: not used
    assert "m.reference" not in encode_masks(unrelated, weights, dropped)


def test_a_reference_out_of_range_is_refused(tiny_backbone):
    params = dict(tiny_backbone.model.named_parameters())
    masks = _random_masks(tiny_backbone, 3, zeros=0.5)
    names = list(masks)
    starts = {n: magnitude_mask(params[f"{n}.weight"], params[f"{n}.weight"].numel() // 2) for n in names}
    tensors = encode_masks({n: starts[n] for n in names}, {n: params[f"{n}.weight"] for n in names},
                           {n: params[f"{n}.weight"].numel() // 2 for n in names})
    kind = get_kind("supermask")
    kind.validate(tensors, tiny_backbone.model)
    for bad in (torch.tensor([0]), torch.tensor([10**9]), torch.tensor([1], dtype=torch.int32)):
        broken = dict(tensors) | {f"{names[0]}.reference": bad}
        with pytest.raises(CorruptArtifact, match="reference"):
            kind.validate(broken, tiny_backbone.model)


def _random_masks(backbone, seed: int, zeros: float = 0.2) -> dict[str, torch.Tensor]:
    return synthetic.masks(backbone, zeros, seed)


@pytest.mark.parametrize("zeros", [0.2, 0.7])  # a correction inside the shared forward; materialised weights
def test_serving_equals_weights_masked_offline_and_groups_mixed_batches(tiny_backbone, zeros):
    masks_a, masks_b = _random_masks(tiny_backbone, 1, zeros), _random_masks(tiny_backbone, 2, zeros)
    offline = copy.deepcopy(tiny_backbone.model)
    with torch.no_grad():
        for name, module in dense_matrices(offline).items():
            module.weight.mul_(masks_a[name])
    runtime = ByName(Runtime(tiny_backbone, device="cpu"))
    runtime.add(in_memory_artifact(tiny_backbone, "mask-a", encode_masks(masks_a), kind="supermask"))
    runtime.add(in_memory_artifact(tiny_backbone, "mask-b", encode_masks(masks_b), seed=1, kind="supermask"))
    runtime.add(in_memory_artifact(tiny_backbone, "rows", random_row_delta(tiny_backbone), seed=2))
    inputs = runtime.tokenize(TEXTS)
    with torch.no_grad():
        reference = offline(**inputs).last_hidden_state
        task = runtime.get("mask-a")
        served = runtime.backend.hidden([task], inputs, Routing.single(task.slot, len(TEXTS)))
        shared = runtime.encoder(**inputs).last_hidden_state
    assert (task.encoder is runtime.encoder) == (zeros <= MAX_CORRECTED_SHARE)
    torch.testing.assert_close(served, reference, atol=1e-6, rtol=0)
    assert (shared - reference).abs().max() > 1e-3  # the shared weights were not altered
    names = ["mask-a", "rows", "mask-b", "mask-a"]
    mixed = runtime.logits(names, inputs)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], runtime.logits([name], runtime.tokenize([TEXTS[i]]))[0], atol=1e-5, rtol=0)


def test_the_mask_cache_counts_corrected_tasks_at_their_serving_size(tiny_backbone):
    runtime = Runtime(tiny_backbone, device="cpu")
    task = runtime.add(in_memory_artifact(tiny_backbone, "mask", encode_masks(_random_masks(tiny_backbone, 4, 0.05)),
                                          kind="supermask"))
    cache = masks_on(runtime.shared).cache
    positions = cache.entries[task.slot]
    assert cache.bytes == sum(p.row_ptr.numel() * 4 + p.cols.numel() * p.cols.element_size() for p in positions.values())
    assert cache.bytes < 0.1 * sum(m.weight.numel() * 4 for m in dense_matrices(tiny_backbone.model).values())
    runtime.remove(task)
    assert cache.bytes == 0


def test_mask_cache_is_bounded_by_bytes_and_lru():
    cache = MaskCache(max_bytes=2 * 400)
    block = {"w": torch.zeros(100)}  # 400 bytes
    built = []
    for slot in (1, 2, 1, 3, 1, 2):
        cache.get(slot, lambda: built.append(1) or {"w": torch.zeros(100)})
    assert (cache.hits, cache.misses, cache.evictions) == (2, 4, 2)
    assert cache.bytes <= cache.max_bytes and list(cache.entries) == [1, 2]
    cache.drop(1)
    assert cache.bytes == MaskCache.size(block)


def test_truncated_or_foreign_masks_are_refused(tiny_backbone):
    tensors = encode_masks(_random_masks(tiny_backbone, 3))
    kind = get_kind("supermask")
    kind.validate(tensors, tiny_backbone.model)
    name = next(k for k in tensors if k.endswith(".mask"))
    truncated = dict(tensors)
    truncated[name] = tensors[name][:-3]
    with pytest.raises(CorruptArtifact):
        kind.validate(truncated, tiny_backbone.model)
    bad_codec = dict(tensors)
    bad_codec[name.replace(".mask", ".codec")] = torch.tensor([9], dtype=torch.uint8)
    with pytest.raises(CorruptArtifact, match="unknown mask codec"):
        kind.validate(bad_codec, tiny_backbone.model)
    foreign = {k.replace("encoder.layer.0.", "encoder.layer.7."): v for k, v in tensors.items()}
    with pytest.raises(CorruptArtifact, match="does not have"):
        kind.validate(foreign, tiny_backbone.model)


def test_layer_presets_select_the_paper_variants(tiny_backbone):
    encoder = tiny_backbone.model
    assert len(select_weights(encoder, SupermaskOptions())) == 12
    assert not any(n.endswith(".key") for n in select_weights(encoder, SupermaskOptions(layers="no-key")))
    assert all(".layer.0." in n for n in select_weights(encoder, SupermaskOptions(layers="no-deep", deep_blocks=1)))
    assert "embeddings.word_embeddings" in select_weights(encoder, SupermaskOptions(embeddings=True))


def test_train_publish_load_predict_with_sampled_evaluation(store, tiny_checkpoints):
    backbone = load_backbone(str(tiny_checkpoints["roberta"]))
    config = TrainConfig(train_samples=48, eval_samples=32, batch_size=8, epochs=1, seed=4)
    outcome = train("supermask", get_task("sst2"), backbone, config, store, "sample", show_progress=False,
                    options={"init_sparsity": 0.1, "samples": 3, "layers": "no-key"})
    details = store.manifest(outcome.version).details
    assert details["sampled"]["n"] == 3 and len(details["sampled"]["values"]) == 3
    assert 0.09 <= details["sparsity"] <= 0.2 and details["bits_per_masked_weight"] < 1.0
    assert len(details["sparsity_per_matrix"]) == 10  # 2 blocks × 5 matrices (no key)
    assert any(key.endswith(".reference") for key in outcome.tensors)  # coded as flips of the 10 % start
    fresh = load_backbone(str(tiny_checkpoints["roberta"]))
    runtime = ByName(Runtime(fresh, device="cpu"))
    loaded = runtime.add(artifact.load(store, outcome.version, fresh))
    assert runtime.predict([loaded.name], ["good"])[0].label in ("negative", "positive")
    # the shipped deterministic mask scores what training reported for it
    from ticketserve.core.data import load_split
    from ticketserve.runtime.evaluate import evaluate

    dev = load_split(get_task("sst2"), "validation", "sample", samples=32, seed=4)
    assert evaluate(runtime, runtime.get(loaded.name), dev) == store.manifest(outcome.version).metrics


def test_distance_and_sparsity_commands(tmp_path, tiny_checkpoints):
    import json

    from typer.testing import CliRunner

    from ticketserve.cli import app
    from ticketserve.registry import open_store
    from ticketserve.trainers.ticket_report import distances

    registry = str(tmp_path / "registry")
    path = str(tiny_checkpoints["bert"])
    backbone = load_backbone(path)
    masks = _random_masks(backbone, 5, zeros=0.25)
    sparsity = {n: 1 - m.float().mean().item() for n, m in masks.items()}
    manifest = manifest_for(backbone, "masked", kind="supermask").model_copy(
        update={"details": {"sparsity": 0.25, "sparsity_per_matrix": sparsity}})
    artifact.publish(open_store(registry), manifest, encode_masks(masks) | random_head(backbone))
    runner = CliRunner()
    result = runner.invoke(app, ["ticket", "distance", "masked", "--registry", registry, "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["tensor"]: r for r in json.loads(result.output)["distances"]}
    name = next(iter(masks))
    weight = dict(backbone.model.named_parameters())[f"{name}.weight"].detach()
    assert rows[f"{name}.weight"]["l1"] == pytest.approx(float(weight[~masks[name]].abs().sum()), rel=1e-5)
    assert distances({"w": torch.ones(4)}, {"w": -torch.ones(4)})[0]["angular"] == pytest.approx(1.0)
    # fine-tuning's tiny angles do not round to 0 (as arccos of a float32 cosine does)
    big = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    nudge = torch.zeros_like(big)
    nudge[0] = 1e-3 * big.norm()
    assert distances({"w": big}, {"w": big + nudge})[0]["angular"] == pytest.approx(math.atan(1e-3) / math.pi, rel=1e-3)
    figure = tmp_path / "sparsity.png"
    result = runner.invoke(app, ["ticket", "sparsity", "masked", "-o", str(figure), "--registry", registry, "--json"])
    assert result.exit_code == 0, result.output
    layers = json.loads(result.output)["layers"]
    assert [row["layer"] for row in layers] == [0, 1] and 0.15 < layers[0]["Q"] < 0.35
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_full_task_loads_after_a_supermask_task(tiny_backbone):
    """Regression: copying the shared encoder for a full task must skip the mask cache."""
    from ticketserve.core.kinds.full import changed_tensors

    tuned = copy.deepcopy(tiny_backbone.model)  # the "fine-tuned" model, copied before any task attaches
    reference = {k: v.clone() for k, v in tuned.state_dict().items()}
    runtime = ByName(Runtime(tiny_backbone, device="cpu"))
    runtime.add(in_memory_artifact(tiny_backbone, "masked", encode_masks(_random_masks(tiny_backbone, 1)), kind="supermask"))
    runtime.logits(["masked"], runtime.tokenize(TEXTS[:1]))  # the mask cache now exists
    with torch.no_grad():
        tuned.encoder.layer[0].output.dense.weight.mul_(1.5)
    runtime.add(in_memory_artifact(tiny_backbone, "full", changed_tensors(tuned.state_dict(), reference), kind="full"))
    inputs = runtime.tokenize(TEXTS)
    with torch.no_grad():
        expected = tuned(**inputs).last_hidden_state
        served = runtime.get("full").encoder(**inputs).last_hidden_state
    torch.testing.assert_close(served, expected, atol=1e-6, rtol=0)
    mixed = runtime.logits(["full", "masked", "full", "masked"], inputs)
    for i, name in enumerate(["full", "masked", "full", "masked"]):
        torch.testing.assert_close(mixed[i], runtime.logits([name], runtime.tokenize([TEXTS[i]]))[0], atol=1e-5, rtol=0)
