"""The `act_bits` kind (issue 15): whether a layer's activations run in 8-bit integers.

At 8 bits the layer's input and its output are quantized per tensor (uint8, asymmetric,
scales calibrated on the task's calibration batches: orchestrator/compress/activations.py).
Both sides, because an integer kernel needs both: ONNX Runtime fuses
`DequantizeLinear -> Conv -> QuantizeLinear` (with an integer weight) into QLinearConv,
and Gemm or MatMul the same way; the torch target simulates exactly that with fake-quant.

Only Conv and Linear modules whose own forward runs get a knob (the layers with integer
kernels whose input and output hooks can see); with the onnxruntime target, only those
whose weight the exported graph feeds straight into a Conv or Gemm node. The kind is off
unless `space.act_bits` (or a rule) names 8: its default, float only, adds no knob.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from search_spaces.config import DEFAULT_ACT_BITS, FLOAT_BITS
from search_spaces.kinds.base import (
    KnobKind,
    Targets,
    Value,
    per_layer,
    quantization_noise,
    register,
)

if TYPE_CHECKING:
    from search_spaces.space import SearchSpace

# layer types (LayerInfo.kind) with integer kernels for 8-bit inputs and outputs
ACT_TYPES = frozenset({"Conv1d", "Conv2d", "Conv3d", "Linear"})


class ActBits(KnobKind):
    name = "act_bits"
    reference = FLOAT_BITS
    default_choices = DEFAULT_ACT_BITS
    optional = True

    def targets(self, where: Targets) -> list[tuple[str, int]]:
        nodes = None if where.artifact is None else where.artifact.activation_keys
        chosen = []
        for name in where.active:
            layer = where.profile.layer(name)
            if layer.kind not in ACT_TYPES or not layer.called:
                continue
            if nodes is not None and layer.weights[0].key not in nodes:
                continue
            chosen.append((name, 1))
        return chosen

    def settle(self, space: SearchSpace, values: Mapping[str, Value]) -> dict[str, dict[str, Any]]:
        return per_layer(self, space, values)

    def prior_loss(self, value: Value) -> float:
        # as a weight's: the noise power of an 8-bit grid (calibrated per tensor, so a
        # little coarser than per-channel weights)
        return quantization_noise(value, FLOAT_BITS)


ACT_BITS = register(ActBits())


def layer_act_bits(space: SearchSpace, values: Mapping[str, Value]) -> dict[str, int]:
    """Layers whose activations the policy quantizes, with their bits (float ones left out)."""
    settled = ACT_BITS.settle(space, values)
    return {name: s["act_bits"] for name, s in settled.items() if s["act_bits"] < FLOAT_BITS}
