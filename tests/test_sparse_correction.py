"""The supermask correction kernel: x·Wᵀ − x·(W⊙(1−M))ᵀ equals x·(W⊙M)ᵀ at every dispatch level
this CPU runs (forced one by one) and on the portable torch path, for ragged lengths, every
column index type, empty corrections, 0 % and 100 % masked, and bfloat16 activations."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ticketserve.core import kernels
from ticketserve.core.sparse_correction import MaskedPositions, subtract

LEVELS = [-1, *range(kernels.best_level() + 1)]  # -1: the torch path; 0 portable C++, 1 AVX2, 2 AVX-512


def _case(out: int, width: int, seq: int, shares: list[float], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, width, generator=generator)
    keeps = [torch.rand(out, width, generator=generator) >= share for share in shares]
    x = torch.randn(len(shares) + 1, seq, width, generator=generator)  # the last example has no task
    which = [*range(len(shares)), -1]
    want = torch.stack([x[e] @ (weight * keeps[t]).T if t >= 0 else x[e] @ weight.T for e, t in enumerate(which)])
    return weight, x, [MaskedPositions.of(k) for k in keeps], which, want


def test_the_compiled_kernels_are_built_here():
    """The install builds them (make install); without them every other level here is untested."""
    assert kernels.available() and kernels.best_level() >= 0


def test_the_kernels_run_on_torchs_threads():
    """Built without OpenMP, at::parallel_for runs everything on the calling thread, silently."""
    assert kernels.available() and torch.ops.ticketserve.kernels_parallel()


@pytest.mark.parametrize("level", LEVELS)
def test_every_thread_count_gives_the_same_sums(level):
    """Items (example, 32 tokens) go to whichever thread is free: the result must not care."""
    weight, x, positions, which, want = _case(64, 48, 70, [0.05] * 9 + [0.3, 0.0, 1.0], seed=3)
    lengths = [70 - 5 * e for e in range(len(which))]
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            y = x @ weight.T
            subtract(y, x, weight, positions, which, lengths=lengths, level=level)
            results.append(y)
    finally:
        torch.set_num_threads(threads)
    for y in results[1:]:
        torch.testing.assert_close(y, results[0], atol=0, rtol=0)
    for e, length in enumerate(lengths):
        torch.testing.assert_close(results[0][e, :length], want[e, :length], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("seq", [1, 7, 16, 17, 63, 65, 130])
@pytest.mark.parametrize("width", [40, 48])  # 48: whole 16-feature tiles (AVX-512 lays tokens out by tile)
def test_every_level_equals_the_materialised_weights_for_ragged_lengths(level, seq, width):
    weight, x, positions, which, want = _case(48, width, seq, [0.02, 0.07, 0.3, 0.0, 1.0], seed=seq)
    y = x @ weight.T
    subtract(y, x, weight, positions, which, level=level)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(("width", "index_type"), [(200, torch.uint8), (384, torch.int16), (40_000, torch.int32)])
def test_column_indices_take_the_narrowest_type_and_every_level_reads_it(level, width, index_type):
    weight, x, positions, which, want = _case(8, width, 5, [0.05, 0.5])
    assert {p.cols.dtype for p in positions} == {index_type}
    y = x @ weight.T
    subtract(y, x, weight, positions, which, level=level)
    torch.testing.assert_close(y, want, atol=1e-5 * width ** 0.5, rtol=1e-5)  # float32 sums over `width` terms


@pytest.mark.parametrize("level", LEVELS)
def test_no_task_and_empty_corrections_leave_the_shared_product(level):
    weight, x, positions, _, _ = _case(16, 24, 9, [0.0, 0.0])
    y = x @ weight.T
    before = y.clone()
    subtract(y, x, weight, positions, [0, 1, -1], level=level)
    subtract(y, x, weight, [], [-1, -1, -1], level=level)
    assert torch.equal(y, before)


@pytest.mark.parametrize("level", LEVELS)
def test_bfloat16_activations_are_within_bfloat16s_own_error(level):
    weight, x, positions, which, _ = _case(64, 96, 21, [0.05, 0.3])
    w16, x16 = weight.bfloat16(), x.bfloat16()
    y = x16 @ w16.T
    subtract(y, x16, w16, positions, which, level=level)
    keeps = [_keep_mask(p, weight.shape) for p in positions]
    want = torch.stack([x[e].double() @ (w16.double() * keeps[t]).T if t >= 0 else x[e].double() @ w16.double().T
                        for e, t in enumerate(which)])
    plain_error = float((x16 @ w16.T).double().sub(x.double() @ w16.double().T).abs().max())
    assert float((y.double() - want).abs().max()) <= 3 * plain_error + 1e-3


def _keep_mask(positions: MaskedPositions, shape) -> torch.Tensor:
    """The keep-mask a CSR of masked positions stands for."""
    keep = torch.ones(shape, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(shape[0]), (positions.row_ptr[1:] - positions.row_ptr[:-1]).long())
    keep[rows, positions.cols.long()] = False
    return keep


@pytest.mark.parametrize("level", LEVELS[1:])
def test_padding_after_each_examples_length_is_left_alone(level):
    weight, x, positions, which, want = _case(40, 48, 37, [0.05, 0.3, 0.0])
    lengths = [37, 1, 20, 16]
    y = x @ weight.T
    subtract(y, x, weight, positions, which, lengths, level=level)
    for e, n in enumerate(lengths):
        torch.testing.assert_close(y[e, :n], want[e, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[e, n:], x[e, n:] @ weight.T, atol=0, rtol=0)


def test_a_level_beyond_this_cpu_is_refused():
    weight, x, positions, which, _ = _case(8, 16, 3, [0.1])
    if kernels.best_level() >= 2:
        pytest.skip("this CPU runs every level")
    with pytest.raises(RuntimeError, match="beyond what this CPU runs"):
        subtract(x @ weight.T, x, weight, positions, which, level=kernels.best_level() + 1)


def test_the_serving_form_costs_its_masked_positions():
    """5 % of a 384 × 1536 matrix masked: int16 columns + int32 row pointers, not a weight copy."""
    keep = torch.rand(1536, 384, generator=torch.Generator().manual_seed(0)) >= 0.05
    positions = MaskedPositions.of(keep)
    assert positions.nbytes == int((~keep).sum()) * 2 + (1536 + 1) * 4
    assert positions.nbytes < 0.03 * keep.numel() * 4


def test_without_the_built_library_one_warning_and_the_torch_path(tmp_path):
    code = ("import warnings, torch; warnings.simplefilter('always')\n"
            "from ticketserve.core.sparse_correction import MaskedPositions, subtract\n"
            "w = torch.randn(4, 6); x = torch.randn(1, 3, 6); keep = torch.rand(4, 6) > 0.3\n"
            "y = x @ w.T; subtract(y, x, w, [MaskedPositions.of(keep)], [0])\n"
            "assert torch.allclose(y, x @ (w * keep).T, atol=1e-5); print('fallback ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=os.environ | {"TICKETSERVE_KERNEL_DIR": str(tmp_path)})
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stderr
    warned = [line for line in result.stderr.splitlines() if "compiled kernels not built" in line]
    assert len(warned) == 1 and "python -m ticketserve.core.kernels build" in warned[0]
