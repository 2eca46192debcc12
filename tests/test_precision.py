"""The shared encoder in reduced precision (`--dtype bfloat16|float16`): every kind's tasks,
mixed in one batch, give the float32 engine's outputs within the precision's own error.

The tolerance is measured, not assumed: a task's outputs in reduced precision may differ
from float32 by at most 3× what the plain backbone's do (its mean-pooled output through the
same head) plus 2e-3 — so a task term that lost precision beyond the dtype's own (a delta
accumulated in the wrong type, a supermask decoded against rounded weights) fails."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TEXTS, in_memory_artifact
from tests.test_cli import cli
from tests.test_kinds import TASK_KINDS, _artifact
from ticketserve.core.artifact import load as load_artifact
from ticketserve.core.backbone import dense_matrices, load_backbone
from ticketserve.core.kinds.supermask import MaskedEncoder, decode_masks, encode_masks, magnitude_mask
from ticketserve.core.tasks import get_task
from ticketserve.runtime.executor import Runtime
from ticketserve.trainers.config import TrainConfig
from ticketserve.trainers.loop import cpu_has_bf16
from ticketserve.trainers.run import train

DTYPES = [torch.bfloat16, torch.float16]


def _error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g.cpu() - w.cpu()).abs().max()) for g, w in zip(got, want))


def assert_within_precision(exact: Runtime, reduced: Runtime) -> None:
    """Every kind's tasks (two each, and a plain one), mixed in one batch on `reduced`, give
    `exact`'s outputs within 3× the plain task's own error + 2e-3."""
    plain = in_memory_artifact(exact.backbone, "plain", {}, seed=0, kind="row_delta")
    artifacts = [plain, *(_artifact(exact.backbone, kind, seed) for kind in TASK_KINDS for seed in (1, 2))]
    texts = (TEXTS * 4)[:len(artifacts)]
    exact_tasks, reduced_tasks = [exact.add(a) for a in artifacts], [reduced.add(a) for a in artifacts]
    want = exact.logits(exact_tasks, exact.tokenize(texts))
    got = reduced.logits(reduced_tasks, reduced.tokenize(texts))
    assert all(g.dtype == torch.float32 for g in got)
    backbone_error = _error(reduced.logits(reduced_tasks[:1] * len(texts), reduced.tokenize(texts)),
                            exact.logits(exact_tasks[:1] * len(texts), exact.tokenize(texts)))  # the plain task, every text
    for artifact, g, w in zip(artifacts, got, want):
        error = _error([g], [w])
        assert error <= 3 * backbone_error + 2e-3, f"{artifact.manifest.name}: {error:.2e} vs plain {backbone_error:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_every_kind_mixed_in_reduced_precision_equals_float32_within_its_error(arch, dtype, tiny_checkpoints):
    path = str(tiny_checkpoints[arch])
    exact, reduced = Runtime(load_backbone(path), device="cpu"), Runtime(load_backbone(path), device="cpu", dtype=dtype)
    assert reduced.encoder.embeddings.word_embeddings.weight.dtype == dtype
    assert reduced.backbone.model.embeddings.word_embeddings.weight.dtype == torch.float32  # the master stays exact
    assert_within_precision(exact, reduced)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_mixed_batch_equals_each_task_alone_in_reduced_precision(dtype, tiny_backbone):
    runtime = Runtime(tiny_backbone, device="cpu", dtype=dtype)
    tasks = [runtime.add(_artifact(tiny_backbone, kind, 1)) for kind in TASK_KINDS]
    inputs = runtime.tokenize(TEXTS[:1] * len(tasks))  # one text: alone and mixed see the same padding
    mixed = runtime.logits(tasks, inputs)
    for task, row in zip(tasks, mixed):
        alone = runtime.logits([task], runtime.tokenize(TEXTS[:1]))[0]
        torch.testing.assert_close(row, alone, atol=1e-2, rtol=1.6e-2)  # two bfloat16 epsilons: batch shapes change GEMM rounding


def test_supermask_references_decode_against_the_float32_weights(tiny_checkpoints):
    """Relative masks name a magnitude cut of the float32 weights; bfloat16 rounding ties many
    magnitudes, so decoding against the served weights would move weights across the cut."""
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    weights = {n: p.detach().clone() for n, p in backbone.model.named_parameters() if n.endswith("query.weight")}
    names = {n.removesuffix(".weight"): w for n, w in weights.items()}
    dropped = {n: w.numel() * 3 // 4 for n, w in names.items()}  # beyond MAX_CORRECTED_SHARE: materialised
    masks = {n: magnitude_mask(w, dropped[n]) for n, w in names.items()}
    for mask in masks.values():
        mask.view(-1)[:7] ^= True  # a few flips from the start, as training makes
    tensors = encode_masks(masks, names, dropped)
    assert any(k.endswith(".reference") for k in tensors)
    rounded = {n: w.bfloat16() for n, w in names.items()}
    assert any(not torch.equal(decode_masks(tensors, rounded)[n], masks[n]) for n in names), \
        "rounding does not move the cut here: the test would not notice a decode against rounded weights"

    runtime = Runtime(backbone, device="cpu", dtype=torch.bfloat16)
    task = runtime.add(in_memory_artifact(backbone, "masked", tensors, seed=1, kind="supermask"))
    assert isinstance(task.encoder, MaskedEncoder)
    served = task.encoder.masked_weights()
    params = dict(runtime.encoder.named_parameters())
    for name, mask in masks.items():
        expected = params[f"{name}.weight"].detach() * mask.to(torch.bfloat16)
        assert torch.equal(served[f"{name}.weight"], expected), name



def test_a_server_in_bfloat16_answers_what_the_bfloat16_runtime_does_and_says_so(tiny_checkpoints, tmp_path):
    from tests.helpers import serve_and_predict
    from ticketserve.core import artifact

    path = str(tiny_checkpoints["bert"])
    store, served, info = serve_and_predict(path, tmp_path / "registry", dtype="bfloat16")
    assert info.dtype == "bfloat16" and info.quantize == "none"
    runtime = Runtime(load_backbone(path), device="cpu", dtype=torch.bfloat16)
    task = runtime.add(artifact.load(store, "rows", runtime.backbone))
    for got, want in zip(served, runtime.predict([task] * len(TEXTS), TEXTS)):
        assert got.label == want.label and abs(got.score - want.score) < 1e-2


def test_the_onnx_backend_refuses_reduced_precision(tiny_checkpoints, tmp_path):
    from ticketserve.core.errors import InvalidArgument
    from ticketserve.runtime.server.main import ServeConfig, Server

    with pytest.raises(InvalidArgument, match="float32"):
        Server(ServeConfig(port=0, registry=str(tmp_path / "registry"), backbone=str(tiny_checkpoints["bert"]),
                           backend="onnx", dtype="bfloat16"))


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_on_an_int8_encoder_every_kind_mixed_equals_itself_alone_and_float32_within_5_percent(arch, tiny_checkpoints):
    """Activations are quantized per token, so an example's output does not depend on its
    batch-mates or their padding: mixed equals alone to float rounding. Against float32 the
    error is int8's own (relative to the logits' size: tasks that move activations far, as
    these random LoRA factors do, see larger absolute errors)."""
    path = str(tiny_checkpoints[arch])
    exact, quantized = Runtime(load_backbone(path), device="cpu"), Runtime(load_backbone(path), device="cpu", quantize="int8")
    artifacts = [_artifact(exact.backbone, kind, seed) for kind in TASK_KINDS for seed in (1, 2)]
    texts = (TEXTS * 4)[:len(artifacts)]
    tasks = [quantized.add(a) for a in artifacts]
    mixed = quantized.logits(tasks, quantized.tokenize(texts))
    want = exact.logits([exact.add(a) for a in artifacts], exact.tokenize(texts))
    for artifact, task, text, row, w in zip(artifacts, tasks, texts, mixed, want):
        alone = quantized.logits([task], quantized.tokenize([text]))[0]
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5, msg=artifact.manifest.name)
        assert _error([row], [w]) <= 0.05 * float(w.abs().max()) + 2e-3, artifact.manifest.name


def test_task_terms_on_an_int8_encoder_are_exact(tiny_checkpoints):
    """Layer by layer, a task's output minus the plain output is exactly its own term, computed
    from the unquantized activations: row deltas x[idx]·Δ + bias Δ, LoRA s·(x·Aᵀ)·Bᵀ, a
    supermask's correction −x·(W⊙(1−M))ᵀ with the float32 W."""
    from ticketserve.core.backbone import dense_matrices
    from ticketserve.core.kinds.lora import update
    from ticketserve.core.kinds.row_delta import split_payload
    from ticketserve.core.routing import Routing

    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    runtime = Runtime(backbone, device="cpu", quantize="int8")
    rows, lora, masked = (_artifact(backbone, kind, 1) for kind in ("row_delta", "lora", "supermask"))
    rows_task, lora_task, masked_task = runtime.add(rows), runtime.add(lora), runtime.add(masked)
    assert masked_task.encoder is runtime.encoder  # a correction in the shared forward
    name = next(n for n in dense_matrices(runtime.encoder) if n.endswith("query") and f"{n}.index" in rows.tensors)
    layer = dense_matrices(runtime.encoder)[name]
    x = torch.randn(4, 5, layer.in_features)
    with torch.inference_mode():
        with runtime.shared.applying(Routing.single(10_000, 4)):  # a slot no task holds: the shared int8 product alone
            plain = layer(x)
        with runtime.shared.applying(Routing([rows_task.slot, lora_task.slot, 10_000, masked_task.slot])):
            mixed = layer(x)
    assert not torch.allclose(plain, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-4), \
        "the shared product is not int8 here: this test would prove nothing"
    index, delta, bias = split_payload(rows.tensors[f"{name}.index"], rows.tensors[f"{name}.delta"], layer.in_features)
    row_term = x[0][:, index] @ delta + (0 if bias is None else bias)
    lora_term = x[1] @ update(lora.tensors, name).T
    torch.testing.assert_close(mixed[0] - plain[0], row_term, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1] - plain[1], lora_term, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], plain[2], atol=0, rtol=0)
    keep = decode_masks(masked.tensors, {n: m.weight for n, m in dense_matrices(runtime.encoder).items()})[name]
    torch.testing.assert_close(mixed[3] - plain[3], -x[3] @ (layer.weight * ~keep).T, atol=1e-5, rtol=1e-5)


def test_materialised_supermask_tasks_on_an_int8_encoder_run_their_masked_weights_in_float32(tiny_checkpoints):
    path = str(tiny_checkpoints["roberta"])
    exact, quantized = Runtime(load_backbone(path), device="cpu"), Runtime(load_backbone(path), device="cpu", quantize="int8")
    generator = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(m.weight.shape, generator=generator) > 0.7 for n, m in dense_matrices(exact.encoder).items()}
    masked = in_memory_artifact(exact.backbone, "dense-mask", encode_masks(masks), seed=1, kind="supermask")
    want = exact.logits([exact.add(masked)] * 3, exact.tokenize(TEXTS[:3]))
    task = quantized.add(masked)
    assert isinstance(task.encoder, MaskedEncoder)  # 70 % of its weights masked: materialised, not a correction
    got = quantized.logits([task] * 3, quantized.tokenize(TEXTS[:3]))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_int8_is_refused_where_it_cannot_run(tiny_checkpoints):
    from ticketserve.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="float32"):
        Runtime(load_backbone(str(tiny_checkpoints["bert"])), device="cpu", dtype=torch.bfloat16, quantize="int8")
    with pytest.raises(InvalidArgument, match="unknown quantization"):
        Runtime(load_backbone(str(tiny_checkpoints["bert"])), device="cpu", quantize="int4")


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_mixed_precision_training_runs_in_bf16_and_publishes_float32(store, tiny_checkpoints):
    config = TrainConfig(train_samples=40, eval_samples=48, batch_size=8, max_steps=6, log_every=1, seed=1)
    runs = {}
    for precision in ("fp32", "bf16"):
        outcome = train("full", get_task("sst2"), load_backbone(str(tiny_checkpoints["bert"])),
                        config.model_copy(update={"precision": precision}), store, data_dir="sample",
                        name=f"full-{precision}", show_progress=False)
        runs[precision] = store.manifest(outcome.version)
        tensors = load_artifact(store, outcome.version, load_backbone(str(tiny_checkpoints["bert"]))).kind_tensors
        assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert runs["bf16"].hyperparameters["precision"] == "bf16"
    losses = {p: [point["loss"] for point in m.curves["train_loss"]] for p, m in runs.items()}
    assert losses["bf16"] != losses["fp32"]  # autocast ran: bfloat16 matmuls round differently
    assert max(abs(a - b) for a, b in zip(losses["bf16"], losses["fp32"])) < 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused where there is no CUDA")
def test_mixed_precision_the_device_cannot_run_is_refused_in_one_line(tiny_checkpoints, tmp_path):
    result = cli("train", "--method", "bitfit", "--task", "sst2", "--data-dir", "sample", "--backbone",
                 str(tiny_checkpoints["bert"]), "--precision", "fp16", registry=tmp_path, check=False)
    assert result.returncode != 0 and "--precision fp16 needs a CUDA device" in result.stderr
    assert "Traceback" not in result.stderr
