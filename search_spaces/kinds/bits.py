"""The `bits` kind: how many bits a layer's weights keep (32: left in float).

One knob per layer (or per tie of layers). A b-bit weight is priced as packed b-bit codes
plus one float32 scale per output row (cost model) and fake-quantized per output channel
in the rebuild; both read a layer's `bits` from the setting this kind settles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from search_spaces.config import DEFAULT_BITS, FLOAT_BITS
from search_spaces.errors import SpaceError
from search_spaces.kinds.base import KnobKind, Value, per_layer, quantization_noise, register

if TYPE_CHECKING:
    from search_spaces.space import Knob, SearchSpace


class Bits(KnobKind):
    name = "bits"
    reference = FLOAT_BITS
    default_choices = DEFAULT_BITS

    def canonical(self, knob: Knob, value: Any) -> Value:
        """Bits as int: 2..16, or 32 for float."""
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value != int(value)
        ):
            raise SpaceError(f"{knob.name}: bits must be an integer, got {value!r}")
        value = int(value)
        if value != FLOAT_BITS and not 2 <= value <= 16:
            raise SpaceError(f"{knob.name}: {value} bits is not supported (2..16 or 32)")
        return value

    def settle(self, space: SearchSpace, values: Mapping[str, Value]) -> dict[str, dict[str, Any]]:
        return per_layer(self, space, values)

    def prior_loss(self, value: Value) -> float:
        return quantization_noise(value, FLOAT_BITS)


BITS = register(Bits())


def layer_bits(space: SearchSpace, values: Mapping[str, Value]) -> dict[str, int]:
    """Bits of every compressible layer's weights (layers no knob covers: float)."""
    bits = {layer.name: FLOAT_BITS for layer in space.profile.layers}
    bits.update({name: s["bits"] for name, s in BITS.settle(space, values).items()})
    return bits
