"""Bit packing of quantization codes and mask bitmaps (compress/pack.py): exact round trips,
the documented layout, and the cost model's byte counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.compress.pack import (
    pack_bitmap,
    pack_codes,
    packed_bytes,
    unpack_bitmap,
    unpack_codes,
)
from orchestrator.compress.quantize import dequantize, fake_quantize, qmax, quantize


@st.composite
def codes_at_bits(draw, max_bits: int = 16):
    bits = draw(st.integers(2, max_bits))
    top = qmax(bits)
    values = draw(st.lists(st.integers(-top, top), min_size=0, max_size=300))
    return bits, torch.tensor(values, dtype=torch.int32)


@settings(max_examples=200, deadline=None)
@given(codes_at_bits())
def test_codes_round_trip_in_the_cost_models_bytes(case):
    bits, codes = case
    stream = pack_codes(codes, bits)
    assert stream.dtype == torch.uint8
    count = codes.numel()
    assert stream.numel() == math.ceil(count * bits / 8) == packed_bytes(count, bits)
    assert torch.equal(unpack_codes(stream, bits, codes.numel()), codes)


@settings(max_examples=100, deadline=None)
@given(codes_at_bits())
def test_unused_bits_of_the_last_byte_are_zero(case):
    """Equal codes give equal bytes: the padding is never left to chance."""
    bits, codes = case
    used = codes.numel() * bits % 8
    stream = pack_codes(codes, bits)
    if used and stream.numel():
        assert int(stream[-1]) >> used == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_bitmap_round_trip(values):
    mask = torch.tensor(values, dtype=torch.bool)
    stream = pack_bitmap(mask)
    assert stream.numel() == math.ceil(len(values) / 8)
    assert torch.equal(unpack_bitmap(stream, len(values)), mask)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.integers(1, 6), st.integers(1, 20), st.integers(0, 2**16))
def test_quantized_weights_survive_packing_bit_for_bit(bits, rows, cols, seed):
    """pack -> unpack -> dequantize gives exactly the fake-quantized (scored) weights."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    codes, scale = quantize(weight, bits)
    unpacked = unpack_codes(pack_codes(codes, bits), bits, codes.numel()).reshape(codes.shape)
    assert torch.equal(dequantize(unpacked, scale, weight.dtype), fake_quantize(weight, bits))


def test_layout_is_little_endian_twos_complement():
    """docs/export.md: element i at stream bits [i*bits, (i+1)*bits), lowest bit first."""
    assert pack_codes(torch.tensor([1, -1]), 4).tolist() == [0xF1]
    assert pack_codes(torch.tensor([1, -2, 3]), 3).tolist() == [0b11110001, 0b0]
    assert pack_codes(torch.tensor([-127, 127]), 8).tolist() == [0x81, 0x7F]
    assert pack_codes(torch.tensor([-300]), 10).tolist() == [0xD4, 0x02]
    assert pack_bitmap(torch.tensor([True, False, False, True, True, False, False, False, True])
                       ).tolist() == [0b00011001, 0b1]  # fmt: skip


def test_out_of_range_input_is_refused():
    with pytest.raises(ValueError, match="lie in"):
        pack_codes(torch.tensor([8]), 4)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 7)
    with pytest.raises(ValueError, match="bits per element"):
        pack_codes(torch.tensor([1]), 17)
