"""The GPU path, marked `gpu` (skipped without CUDA; `make gpu-check` runs it on a GPU machine):
every kind on the device equals the CPU engine — float32 to 1e-4, bfloat16 within the
precision budget of tests/test_precision.py — in mixed batches; the server on the device;
and no host synchronisation in a mixed batch's forward (CUDA's sync debug mode raises on one).

TICKETSERVE_GPU_TEST_DEVICE=cpu runs the same code on the CPU: the dry run that keeps the
check from failing on a GPU machine for a typo (tests/test_gpu_check.py does it)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import TEXTS, serve_and_predict
from tests.test_kinds import TASK_KINDS, _artifact
from tests.test_precision import assert_within_precision
from ticketserve.core import artifact
from ticketserve.core.backbone import load_backbone
from ticketserve.runtime.executor import Runtime

DEVICE = os.environ.get("TICKETSERVE_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_every_kind_mixed_on_the_device_equals_the_cpu_in_float32(arch, tiny_checkpoints):
    path = str(tiny_checkpoints[arch])
    cpu, device = Runtime(load_backbone(path), device="cpu"), Runtime(load_backbone(path), device=DEVICE)
    artifacts = [_artifact(cpu.backbone, kind, seed) for kind in TASK_KINDS for seed in (1, 2)]
    texts = (TEXTS * 4)[:len(artifacts)]
    want = cpu.logits([cpu.add(a) for a in artifacts], cpu.tokenize(texts))
    got = device.logits([device.add(a) for a in artifacts], device.tokenize(texts))
    for a, g, w in zip(artifacts, got, want):
        assert g.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(g.cpu(), w, atol=1e-4, rtol=0, msg=a.manifest.name)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_every_kind_mixed_on_the_device_in_bfloat16_is_within_its_precision(arch, tiny_checkpoints):
    path = str(tiny_checkpoints[arch])
    assert_within_precision(Runtime(load_backbone(path), device="cpu"),
                            Runtime(load_backbone(path), device=DEVICE, dtype=torch.bfloat16))


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="the sync debug mode is CUDA's")
def test_a_mixed_batch_forward_never_waits_for_the_host(tiny_checkpoints):
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    runtime = Runtime(backbone, device=DEVICE)
    assert_never_waits(runtime, [runtime.add(_artifact(backbone, kind, seed))
                                 for kind in ("row_delta", "lora", "structure_mask") for seed in (1, 2)])


def assert_never_waits(runtime: Runtime, tasks: list) -> None:
    """A second mixed forward (the first builds tables, gate caches, masked positions) under
    CUDA's sync debug mode: any device-to-host wait raises."""
    inputs = runtime.tokenize(TEXTS[:len(tasks)])
    runtime.logits(tasks, inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runtime.logits(tasks, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="the sync debug mode is CUDA's")
def test_supermask_corrections_never_wait_for_the_host(tiny_checkpoints):
    """The CUDA correction (torch's sparse CSR matmul) inside a mixed batch: any device-to-host
    wait is an error here."""
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    runtime = Runtime(backbone, device=DEVICE)
    assert_never_waits(runtime, [runtime.add(_artifact(backbone, kind, seed)) for kind in ("supermask", "row_delta")
                                 for seed in (1, 2)])


def test_the_server_on_the_device_answers_what_the_runtime_does(tiny_checkpoints, tmp_path):
    path = str(tiny_checkpoints["roberta"])
    store, served, info = serve_and_predict(path, tmp_path / "registry", device=DEVICE)
    assert info.device.startswith(torch.device(DEVICE).type)
    runtime = Runtime(load_backbone(path), device="cpu")
    task = runtime.add(artifact.load(store, "rows", runtime.backbone))
    for got, want in zip(served, runtime.predict([task] * len(TEXTS), TEXTS)):
        assert got.label == want.label and abs(got.score - want.score) < 1e-4


def test_mixed_precision_training_on_the_device(store, tiny_checkpoints):
    """`train --precision bf16|fp16` where the device runs it (the accelerator picks CUDA when
    there is one): finite losses, float32 artifacts."""
    from ticketserve.core.tasks import get_task
    from ticketserve.trainers.config import TrainConfig
    from ticketserve.trainers.loop import cpu_has_bf16
    from ticketserve.trainers.run import train

    cuda = DEVICE.startswith("cuda")
    precisions = (["bf16"] if (torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16()) else []) + \
        (["fp16"] if cuda else [])
    for precision in precisions:
        config = TrainConfig(train_samples=32, eval_samples=32, batch_size=8, max_steps=4, log_every=1,
                             precision=precision)
        outcome = train("full", get_task("sst2"), load_backbone(str(tiny_checkpoints["bert"])), config, store,
                        data_dir="sample", name=f"device-{precision}", show_progress=False)
        manifest = store.manifest(outcome.version)
        assert all(point["loss"] == point["loss"] for point in manifest.curves["train_loss"])  # no NaN
        tensors = artifact.load(store, outcome.version, load_backbone(str(tiny_checkpoints["bert"]))).kind_tensors
        assert {t.dtype for t in tensors.values()} == {torch.float32}, precision


def test_supermask_corrections_on_the_device_equal_the_materialised_weights():
    """On CUDA the correction runs as a sparse CSR matmul (cuSPARSE through torch)."""
    from ticketserve.core.sparse_correction import MaskedPositions, subtract

    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 64, generator=generator), torch.randn(3, 11, 64, generator=generator)
    keeps = [torch.rand(96, 64, generator=generator) >= share for share in (0.05, 0.3)]
    want = torch.stack([x[0] @ (weight * keeps[0]).T, x[1] @ weight.T, x[2] @ (weight * keeps[1]).T])
    on_device = weight.to(DEVICE), x.to(DEVICE)
    y = on_device[1] @ on_device[0].T
    subtract(y, on_device[1], on_device[0], [MaskedPositions.of(k).to(torch.device(DEVICE)) for k in keeps],
             [0, -1, 1])
    torch.testing.assert_close(y.cpu(), want, atol=1e-4, rtol=1e-4)
