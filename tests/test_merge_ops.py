"""The per-tensor arithmetic: fp32 formula, one rounding, slices, non-finite detection."""

from __future__ import annotations

import pytest
import torch

from test_merge_support import bits

from lokr_trainer.merge import ops
from lokr_trainer.merge.ops import Delta, NonFiniteResult, cast_exact, combine


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Slices of 1000 elements so every test crosses slice boundaries (and a delta straddles them).
    monkeypatch.setattr(ops, "CHUNK", 1000)


def _t(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_weighted_sum_is_fp32_formula_rounded_once(in_dtype, out_dtype):
    a, b, c = (_t((37, 101), s, in_dtype) for s in (1, 2, 3))
    w = (0.3, 0.45, 0.25)
    got = combine([a, b, c], w, [], out_dtype)
    want = (a.float() * w[0] + b.float() * w[1] + c.float() * w[2]).to(out_dtype)
    assert got.dtype == out_dtype and got.shape == a.shape
    assert torch.equal(bits(got), bits(want))


def test_mixed_input_dtypes_and_deltas_at_offsets():
    a = _t((3 * 700, 3), 4, torch.float16)  # 6300 elements: 7 slices
    b = _t((3 * 700, 3), 5, torch.bfloat16)
    d1 = _t((700, 3), 6, torch.float32)  # rows 700..1399 (a q/k/v-style slice), crosses slices
    d2 = _t((3 * 700, 3), 7, torch.float32)
    got = combine([a, b], (0.5, 0.5), [Delta(d1, 0.7, 700 * 3), Delta(d2, 1.0)], torch.float16)
    acc = a.float() * 0.5 + b.float() * 0.5
    acc = acc.reshape(-1)
    acc[2100:4200] = acc[2100:4200] + d1.reshape(-1) * 0.7
    acc = acc + d2.reshape(-1)
    assert torch.equal(got.reshape(-1), acc.to(torch.float16))


def test_single_input_is_taken_as_is_and_cast_once():
    a = _t((2500,), 8, torch.float32) * 3
    assert torch.equal(combine([a], None, [], torch.bfloat16), a.to(torch.bfloat16))
    assert torch.equal(combine([a], None, [], torch.float32), a)
    d = _t((2500,), 9, torch.float32)
    assert torch.equal(combine([a], None, [Delta(d, -0.25)], torch.float16), (a + d * -0.25).to(torch.float16))


def test_scalars_and_empty_tensors():
    s = torch.tensor(1.5, dtype=torch.float16)
    out = combine([s, s], (2.0, 1.0), [], torch.float32)
    assert out.shape == () and float(out) == 4.5
    e = torch.empty(0, 4)
    assert combine([e], None, [], torch.float16).shape == (0, 4)


def test_non_finite_results_are_counted_and_located():
    a = torch.full((3000,), 60000.0, dtype=torch.float16)
    a[1500:] = 1.0
    with pytest.raises(NonFiniteResult) as e:
        combine([a, a], (1.0, 1.0), [], torch.float16)  # 120000 overflows fp16
    assert e.value.count == 1500 and e.value.first_index == 0
    b = torch.zeros(3000)
    b[2999] = float("nan")
    with pytest.raises(NonFiniteResult) as e:
        combine([b], None, [], torch.float32)
    assert e.value.count == 1 and e.value.first_index == 2999
    # the same values are fine in fp32
    assert combine([a, a], (1.0, 1.0), [], torch.float32)[0] == 120000.0


def test_bad_arguments():
    a = torch.zeros(10)
    with pytest.raises(ValueError):
        combine([a, torch.zeros(11)], (1.0, 1.0), [], torch.float32)
    with pytest.raises(ValueError):
        combine([a], (1.0, 1.0), [], torch.float32)
    with pytest.raises(ValueError):
        combine([a], None, [Delta(torch.zeros(5), 1.0, 6)], torch.float32)
    with pytest.raises(ValueError):
        combine([a], None, [Delta(torch.zeros(5, dtype=torch.float16), 1.0)], torch.float32)


def test_cast_exact():
    assert cast_exact(torch.float16, torch.float32) and cast_exact(torch.bfloat16, torch.float32)
    assert cast_exact(torch.float16, torch.float16)
    assert not cast_exact(torch.float32, torch.float16)
    assert not cast_exact(torch.float16, torch.bfloat16) and not cast_exact(torch.bfloat16, torch.float16)


def test_large_finite_values_are_not_mistaken_for_overflow():
    """The fast check sums each slice; a finite bf16/fp32 slice whose sum overflows must still pass."""
    big = torch.full((2500,), 3.0e38, dtype=torch.bfloat16)
    out = combine([big], None, [], torch.bfloat16)
    assert torch.equal(out, big)
    x = torch.full((2500,), 3.0e38)
    x[1::2] = -3.0e38
    assert torch.equal(combine([x], None, [], torch.float32), x)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1.0, 0.3])
def test_single_delta_slices_one_pass_and_general_path_agree(in_dtype, out_dtype, m):
    """A q/k/v-style delta covers some slices whole (one-pass path) and some in part (general path)."""
    x = _t((3 * 900, 4), 12, in_dtype)  # 10800 elements, slices of 1000
    d = _t((900, 4), 13, torch.float32)
    got = combine([x], None, [Delta(d, m, 900 * 4)], out_dtype)
    acc = x.float().reshape(-1).clone()
    acc[3600:7200] = acc[3600:7200] + (d.reshape(-1) * m if m != 1.0 else d.reshape(-1))
    assert torch.equal(bits(got.reshape(-1)), bits(acc.to(out_dtype)))
