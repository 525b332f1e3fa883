"""Pure cost model: size_bytes, macs and bops of a policy, from the profile alone.

`size_bytes` is what the exported file holds. Each compressible layer is stored in the
smallest of up to four exact encodings of the model that is scored:

| encoding      | values                                   | extra                       |
|---------------|------------------------------------------|-----------------------------|
| dense float   | numel x dtype bytes                      |                             |
| sparse float  | kept x dtype bytes                       | bitmap ceil(numel / 8)      |
| dense packed  | ceil(numel x bits / 8) (all weight tensors of the layer in one stream) | one float32 scale per output row |
| sparse packed | ceil(kept x bits / 8)                    | scales + bitmap             |

(packed only when bits < 32; a quantized layer stored as float holds its dequantized
values, which are exactly what was scored). Choosing the smallest makes size monotone:
fewer bits or lower keep never cost bytes, and a 32-bit, keep-1.0 policy is exactly the
float model's state-dict size. Every other state-dict tensor (biases, BatchNorm
parameters and buffers) is counted at its stored dtype.

`macs` counts the multiply-accumulates of the kept weights over one forward pass on the
task's example inputs (sparse kernels skip pruned weights); `bops` = macs x weight bits
x activation bits (activations stay float: 32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from search_spaces import LayerInfo, LayerSetting, SearchSpace
from search_spaces.config import FLOAT_BITS

SCALE_BYTES = 4  # one float32 scale per output row of a quantized weight
ACTIVATION_BITS = 32


@dataclass(frozen=True, kw_only=True)
class Cost:
    size_bytes: int
    macs: int
    bops: int

    def as_dict(self) -> dict[str, int]:
        return {"size_bytes": self.size_bytes, "macs": self.macs, "bops": self.bops}


def layer_encodings(layer: LayerInfo, setting: LayerSetting) -> dict[str, int]:
    """Bytes of every exact encoding of a layer's weights under `setting`."""
    kept, bits, numel = setting.keep_count, setting.bits, layer.numel
    bitmap = math.ceil(numel / 8)
    sizes = {"dense-float": numel * layer.dtype_bytes}
    if kept < numel:
        sizes["sparse-float"] = kept * layer.dtype_bytes + bitmap
    if bits < FLOAT_BITS:
        scales = layer.rows * SCALE_BYTES
        sizes["dense-packed"] = math.ceil(numel * bits / 8) + scales
        if kept < numel:
            sizes["sparse-packed"] = math.ceil(kept * bits / 8) + scales + bitmap
    return sizes


def layer_encoding(layer: LayerInfo, setting: LayerSetting) -> tuple[str, int]:
    """The smallest encoding (ties: the first in table order) and its bytes."""
    sizes = layer_encodings(layer, setting)
    name = min(sizes, key=sizes.__getitem__)
    return name, sizes[name]


def layer_bytes(layer: LayerInfo, setting: LayerSetting) -> int:
    return layer_encoding(layer, setting)[1]


def layer_macs(layer: LayerInfo, setting: LayerSetting) -> int:
    return setting.keep_count * layer.uses


def cost_of_settings(space: SearchSpace, settings: Mapping[str, LayerSetting]) -> Cost:
    size = space.profile.other_bytes
    macs = bops = 0
    for layer in space.profile.layers:
        setting = settings[layer.name]
        size += layer_bytes(layer, setting)
        layer_mac = layer_macs(layer, setting)
        macs += layer_mac
        bops += layer_mac * min(setting.bits, FLOAT_BITS) * ACTIVATION_BITS
    return Cost(size_bytes=size, macs=macs, bops=bops)


def policy_cost(space: SearchSpace, policy: Mapping[str, int | float]) -> Cost:
    """Cost of a canonical policy; no model is built."""
    return cost_of_settings(space, space.layer_settings(policy))
