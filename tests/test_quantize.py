"""Per-output-channel symmetric quantization: error bound, code range, exact row maxima."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.compress.quantize import (
    dequantize,
    fake_quantize,
    fake_quantize_many,
    qmax,
    quantize,
)

FEW = settings(max_examples=80, deadline=None)
_shapes = st.one_of(
    st.tuples(st.integers(1, 16), st.integers(1, 40)),  # Linear
    st.tuples(st.integers(1, 8), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
    st.tuples(st.integers(1, 64)),  # a vector: one element per row
)


@st.composite
def weights(draw) -> torch.Tensor:
    shape = draw(_shapes)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(shape, generator=gen)
    # rows of very different ranges, as real layers have
    row_scale = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=gen) + 0.01
    w = w * row_scale * draw(st.sampled_from([1e-4, 1e-2, 1.0, 30.0]))
    if draw(st.booleans()):  # integer-valued weights: many exact ties and exact halves
        w = torch.round(w * 4)
    return w


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


@pytest.mark.parametrize(("bits", "top"), [(2, 1), (3, 3), (4, 7), (8, 127), (16, 32767)])
def test_qmax_is_symmetric_restricted_range(bits, top):
    assert qmax(bits) == top


def test_one_bit_is_refused():
    with pytest.raises(ValueError, match="at least 2 bits"):
        qmax(1)


@FEW
@given(w=weights(), bits=st.integers(2, 8))
def test_error_is_at_most_half_a_step_per_row(w, bits):
    codes, scale = quantize(w, bits)
    assert scale.shape == (w.shape[0],) and scale.dtype == torch.float32
    fq = fake_quantize(w, bits)
    assert fq.shape == w.shape and fq.dtype == w.dtype
    err = _rows((w - fq).abs()).amax(dim=1)
    tol = 1e-6 * _rows(w.abs()).amax(dim=1) + 1e-12  # float32 rounding of q * scale
    assert torch.all(err <= scale / 2 + tol), (err, scale)


@FEW
@given(w=weights(), bits=st.integers(2, 16))
def test_codes_lie_in_the_symmetric_range(w, bits):
    codes, scale = quantize(w, bits)
    assert codes.shape == w.shape
    assert codes.dtype == (torch.int8 if bits <= 8 else torch.int16)
    top = qmax(bits)
    assert int(codes.min()) >= -top and int(codes.max()) <= top
    assert torch.all(scale > 0)


@FEW
@given(w=weights(), bits=st.integers(2, 8))
def test_row_maximum_is_represented_exactly(w, bits):
    codes, scale = quantize(w, bits)
    rows, code_rows = _rows(w), _rows(codes).long()
    top = qmax(bits)
    idx = rows.abs().argmax(dim=1, keepdim=True)
    nonzero = rows.abs().amax(dim=1) > 0
    picked = code_rows.gather(1, idx)[:, 0]
    sign = torch.sign(rows.gather(1, idx)[:, 0]).long()
    # the largest magnitude of each row gets the extreme code, with its sign
    assert torch.equal(picked[nonzero], (sign * top)[nonzero])
    # and dequantizes to itself (up to float32 rounding of (max / qmax) * qmax)
    back = _rows(dequantize(codes, scale, w.dtype)).gather(1, idx)[:, 0]
    assert torch.allclose(back, rows.gather(1, idx)[:, 0], rtol=2e-7, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_zero_row_stays_zero(bits):
    w = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 0.25], [0.0, 0.0, 0.0]])
    codes, scale = quantize(w, bits)
    assert torch.equal(codes[0], torch.zeros(3, dtype=codes.dtype))
    assert torch.all(torch.isfinite(scale))
    fq = fake_quantize(w, bits)
    assert torch.equal(fq[0], torch.zeros(3)) and torch.equal(fq[2], torch.zeros(3))
    assert fq[1, 1] == -1.0


def test_rows_are_quantized_independently():
    small = torch.tensor([[0.01, -0.02, 0.005]])
    big = torch.tensor([[100.0, 3.0, -50.0]])
    alone = fake_quantize(small, 4)
    together = fake_quantize(torch.cat([small, big]), 4)
    assert torch.equal(together[0], alone[0])


def test_known_values_at_two_and_three_bits():
    w = torch.tensor([[1.0, 0.6, 0.4, -0.2, -1.0]])
    # 2 bits: codes -1, 0, 1 with scale = max = 1; 0.6 -> 1, 0.4 -> 0
    codes, scale = quantize(w, 2)
    assert codes.tolist() == [[1, 1, 0, 0, -1]] and scale.tolist() == [1.0]
    # 3 bits: qmax 3, scale 1/3: 0.6*3 = 1.8 -> 2, 0.4*3 = 1.2 -> 1, -0.6 -> -1
    codes, scale = quantize(w, 3)
    assert codes.tolist() == [[3, 2, 1, -1, -3]]
    assert torch.allclose(fake_quantize(w, 3), torch.tensor([[1.0, 2 / 3, 1 / 3, -1 / 3, -1.0]]))


@FEW
@given(w=weights(), bits=st.integers(2, 8))
def test_fake_quantize_is_dequantize_of_quantize(w, bits):
    codes, scale = quantize(w, bits)
    assert torch.equal(fake_quantize(w, bits), dequantize(codes, scale, w.dtype))
    assert len(torch.unique(_rows(codes)[0])) <= 2 * qmax(bits) + 1


@FEW
@given(
    w=weights(),
    tiny=st.booleans(),
    bits=st.lists(st.integers(2, 16), min_size=1, max_size=7, unique=True),
    half=st.booleans(),
)
def test_quantizing_at_many_bits_at_once_gives_each_bits_bit_for_bit(w, tiny, bits, half):
    """The rebuild caches `fake_quantize_many` stacks and scores with them, and export
    takes codes from `quantize`: they must agree exactly, also where a row's scale
    underflows to a subnormal (there the clamp of the codes matters) or is zero."""
    w = w * 1e-40 if tiny else w  # float32 subnormals
    w[0] = 0.0  # an all-zero row
    w = w.half() if half else w
    stack = fake_quantize_many(w, bits)
    assert stack.shape == (len(bits), *w.shape) and stack.dtype == w.dtype
    for i, b in enumerate(bits):
        assert torch.equal(stack[i], fake_quantize(w, b))
        assert torch.equal(stack[i], dequantize(*quantize(w, b), w.dtype))


def test_float16_weights_keep_their_dtype():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).half()
    fq = fake_quantize(w, 4)
    assert fq.dtype == torch.float16
    err = (w.float() - fq.float()).abs().amax(dim=1)
    _, scale = quantize(w, 4)
    assert torch.all(err <= scale / 2 + 1e-3 * w.float().abs().amax(dim=1))
