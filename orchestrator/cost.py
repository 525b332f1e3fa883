"""Pure cost model: size_bytes, macs and bops of a policy, from the profile alone.

`size_bytes` is what the exported file holds, per compressible layer:

- float (32 bits), nothing pruned: every weight element at its stored dtype;
- quantized to b bits: the kept elements of all the layer's weights packed into one
  bit stream, ceil(kept * b / 8) bytes, plus one float32 scale per output row;
- pruned (keep < 1): the kept values (packed or float) plus a bitmap of the layer's
  weight positions, ceil(numel / 8) bytes;

and every other state-dict tensor (biases, BatchNorm parameters and buffers) at its
stored dtype. `macs` counts the multiply-accumulates of the kept weights over one
forward pass on the task's example inputs (sparse kernels skip pruned weights);
`bops` = macs x weight bits x activation bits (activations stay float: 32).
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


def layer_bytes(layer: LayerInfo, setting: LayerSetting) -> int:
    kept, bits = setting.keep_count, setting.bits
    if bits >= FLOAT_BITS:
        values = kept * layer.dtype_bytes
        scales = 0
    else:
        values = math.ceil(kept * bits / 8)
        scales = layer.rows * SCALE_BYTES
    bitmap = math.ceil(layer.numel / 8) if kept < layer.numel else 0
    return values + scales + bitmap


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
