"""Bit packing: signed integer codes at 2..16 bits, and boolean masks as bitmaps.

The layout (docs/export.md) is one little-endian bit stream: element i occupies stream
bits [i*bits, (i+1)*bits), lowest bit first, and stream bit j is bit (j % 8) of byte
j // 8. Codes are stored in two's complement at `bits` (quantize.py's codes lie in
[-qmax, qmax], so -2^(bits-1) never occurs); a bitmap is the same stream at 1 bit per
element. The last byte's unused high bits are zero, so equal inputs give equal bytes.

Pure torch functions (no numpy), so a packed model can be decoded on any device.
"""

from __future__ import annotations

import math

import torch

MAX_BITS = 16


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` elements at `bits` each (the cost model's ceil(count x bits / 8))."""
    return math.ceil(count * bits / 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"packing supports 1..{MAX_BITS} bits per element, got {bits}")


def pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers in [0, 2^bits) -> uint8 stream of packed_bytes(n, bits) bytes."""
    _check_bits(bits)
    flat = values.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) to pack at {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = packed_bytes(flat.numel(), bits) * 8 - stream.numel()
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=flat.device)
    return (stream.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_uint(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of `pack_uint`: `count` values (int32) from a uint8 stream."""
    _check_bits(bits)
    if stream.dtype != torch.uint8 or stream.numel() != packed_bytes(count, bits):
        raise ValueError(f"a stream of {count} values at {bits} bits is "
                         f"{packed_bytes(count, bits)} uint8 bytes, got {stream.numel()} "
                         f"{stream.dtype}")  # fmt: skip
    shifts = torch.arange(8, dtype=torch.int32, device=stream.device)
    flat = ((stream.reshape(-1).to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)
    flat = flat[: count * bits].reshape(count, bits)
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=stream.device)
    return (flat * weights).sum(dim=1, dtype=torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes in [-(2^(bits-1)), 2^(bits-1)) -> uint8 stream (two's complement)."""
    flat = codes.reshape(-1).to(torch.int32)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if flat.numel() and (int(flat.min()) < low or int(flat.max()) > high):
        raise ValueError(f"codes must lie in [{low}, {high}] to pack at {bits} bits")
    return pack_uint(flat & ((1 << bits) - 1), bits)


def unpack_codes(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of `pack_codes`: `count` signed codes (int32)."""
    values = unpack_uint(stream, bits, count)
    return values - ((values >> (bits - 1)) & 1) * (1 << bits)  # sign extension


def pack_bitmap(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (any shape, read flat) -> ceil(numel / 8) bytes, 1 bit per element."""
    return pack_uint(mask.reshape(-1).to(torch.int32), 1)


def unpack_bitmap(stream: torch.Tensor, count: int) -> torch.Tensor:
    """The inverse of `pack_bitmap`: a flat boolean mask of `count` elements."""
    return unpack_uint(stream, 1, count).bool()
