"""Pure cost model: size_bytes, macs and bops of a policy, from the profile alone.

`size_bytes` is the exported model file's size to the byte (orchestrator.export,
docs/export.md): the payload (every stored tensor's bytes) plus the file's header. Each
compressible layer is stored in the smallest of up to four exact encodings of the model
that is scored:

| encoding      | values                                   | extra                       |
|---------------|------------------------------------------|-----------------------------|
| dense float   | numel x dtype bytes                      |                             |
| sparse float  | kept x dtype bytes                       | bitmap ceil(numel / 8)      |
| dense packed  | ceil(numel x bits / 8) (all weight tensors of the layer in one stream) | one float32 scale per output row |
| sparse packed | ceil(kept x bits / 8)                    | scales + bitmap             |

(packed only when bits < 32; a quantized layer stored as float holds its dequantized
values, which are exactly what was scored). Choosing the smallest makes size monotone:
fewer bits or lower keep never cost bytes, and a 32-bit, keep-1.0 policy's payload is
exactly the float model's state-dict size. Every other state-dict tensor (biases, BatchNorm
parameters and buffers) is counted at its stored dtype.

The file is safetensors with one uint8 entry holding the whole payload (the manifest next
to it says where each tensor lies), so its header is `file_header(payload)`: about 120
bytes whatever the model, where one entry per tensor cost ~80 bytes each (27 KB on a
137 KB mobilenet_v3_small; issue 14). The header grows with the payload's digit count
only, so size stays monotone in bits and keep.

`macs` counts the multiply-accumulates of the kept weights over one forward pass on the
task's example inputs (sparse kernels skip pruned weights); `bops` = macs x weight bits
x activation bits (32 where activations stay float; 8 where the `act_bits` kind says).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from search_spaces import LayerInfo, LayerSetting, SearchSpace
from search_spaces.config import FLOAT_BITS
from search_spaces.structure import sliced_shape

ACTIVATION_BITS = FLOAT_BITS  # activations no act_bits knob quantizes
SCALE_BYTES = 4  # one float32 scale per output row of a quantized weight
FILE_FORMAT = "prunesearch-compressed/2"  # the model file's metadata, the manifest's format
FILE_ENTRY = "model"  # the model file's one safetensors entry: the payload, uint8


@dataclass(frozen=True, kw_only=True)
class Cost:
    size_bytes: int  # the exported model file: payload + header (file_bytes)
    macs: int
    bops: int
    params: int = 0  # parameter elements of the rebuilt model (masked ones included)

    def as_dict(self) -> dict[str, int]:
        return {"size_bytes": self.size_bytes, "macs": self.macs, "bops": self.bops,
                "params": self.params}  # fmt: skip


def file_header(payload: int) -> bytes:
    """The model file's header for `payload` bytes of tensors, byte for byte what
    safetensors writes for one uint8 entry: the JSON index's length (8 bytes, little
    endian), then the index, padded with spaces to a multiple of 8."""
    index = (f'{{"__metadata__":{{"format":"{FILE_FORMAT}"}},"{FILE_ENTRY}":{{"dtype":"U8",'
             f'"shape":[{payload}],"data_offsets":[0,{payload}]}}}}')  # fmt: skip
    index += " " * (-len(index) % 8)
    return len(index).to_bytes(8, "little") + index.encode()


def header_bytes(payload: int) -> int:
    """Bytes of `file_header(payload)`; never decreases as the payload grows."""
    return len(file_header(payload))


def file_bytes(payload: int) -> int:
    """The model file's size for `payload` bytes of tensors; strictly increasing."""
    return payload + header_bytes(payload)


def encodings(*, numel: int, rows: int, dtype_bytes: int, bits: int, kept: int) -> dict[str, int]:
    """Bytes of every exact encoding of a layer's weights (see the table above)."""
    bitmap = math.ceil(numel / 8)
    sizes = {"dense-float": numel * dtype_bytes}
    if kept < numel:
        sizes["sparse-float"] = kept * dtype_bytes + bitmap
    if bits < FLOAT_BITS:
        scales = rows * SCALE_BYTES
        sizes["dense-packed"] = math.ceil(numel * bits / 8) + scales
        if kept < numel:
            sizes["sparse-packed"] = math.ceil(kept * bits / 8) + scales + bitmap
    return sizes


def layer_encodings(layer: LayerInfo, setting: LayerSetting) -> dict[str, int]:
    """Bytes of every exact encoding of a (masked, unsliced) layer's weights."""
    return encodings(numel=layer.numel, rows=layer.rows, dtype_bytes=layer.dtype_bytes,
                     bits=setting.bits, kept=setting.keep_count)  # fmt: skip


def smallest(sizes: Mapping[str, int]) -> tuple[str, int]:
    """The smallest encoding (ties: the first in table order) and its bytes."""
    name = min(sizes, key=sizes.__getitem__)
    return name, sizes[name]


def layer_encoding(layer: LayerInfo, setting: LayerSetting) -> tuple[str, int]:
    """The encoding a (masked, unsliced) layer is stored in, and its bytes."""
    return smallest(layer_encodings(layer, setting))


def sliced_encoding(layer: LayerInfo, shapes: list[tuple[int, ...]], bits: int) -> tuple[str, int]:
    """The encoding a structurally sliced layer (weights of `shapes`, none masked) is
    stored in, and its bytes."""
    numel = sum(math.prod(shape) for shape in shapes)
    return smallest(encodings(numel=numel, rows=sum(shape[0] for shape in shapes),
                              dtype_bytes=layer.dtype_bytes, bits=bits, kept=numel))  # fmt: skip


def layer_bytes(layer: LayerInfo, setting: LayerSetting) -> int:
    return layer_encoding(layer, setting)[1]


def layer_macs_of(layer: LayerInfo, setting: LayerSetting) -> int:
    return setting.keep_count * layer.uses


def cost_of_settings(space: SearchSpace, settings: Mapping[str, LayerSetting]) -> Cost:
    """Unstructured (or no) pruning: tensors keep their shapes, masks drop elements."""
    size = space.profile.other_bytes
    macs = bops = 0
    for layer in space.profile.layers:
        setting = settings[layer.name]
        size += layer_bytes(layer, setting)
        layer_mac = layer_macs_of(layer, setting)
        macs += layer_mac
        bops += layer_mac * min(setting.bits, FLOAT_BITS) * setting.act_bits
    params = sum(math.prod(t.shape) for t in space.profile.tensors if t.parameter)
    return Cost(size_bytes=file_bytes(size), macs=macs, bops=bops, params=params)


def _sliced_shapes(space: SearchSpace, counts: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Every state tensor's shape under the channel counts (the base's without a plan)."""
    plan = space.plan
    return {t.key: sliced_shape(t.shape, t.key, plan, counts) if plan else t.shape
            for t in space.profile.tensors}  # fmt: skip


def _structured_cost(space: SearchSpace, settings: Mapping[str, LayerSetting],
                     sliced: Mapping[str, tuple[int, ...]]) -> Cost:  # fmt: skip
    """Structured pruning: every tensor's shape after slicing (`sliced`, from the plan)."""
    profile = space.profile
    weight_keys = {w.key for layer in profile.layers for w in layer.weights}
    size = params = macs = bops = 0
    for tensor in profile.tensors:
        numel = math.prod(sliced[tensor.key])
        params += numel if tensor.parameter else 0
        size += 0 if tensor.key in weight_keys else numel * tensor.dtype_bytes
    for layer in profile.layers:
        shapes = [sliced[w.key] for w in layer.weights]
        numel = sum(math.prod(shape) for shape in shapes)
        setting = settings[layer.name]
        size += sliced_encoding(layer, shapes, setting.bits)[1]
        macs += numel * layer.uses
        bops += numel * layer.uses * min(setting.bits, FLOAT_BITS) * setting.act_bits
    return Cost(size_bytes=file_bytes(size), macs=macs, bops=bops, params=params)


def policy_encodings(space: SearchSpace,
                     policy: Mapping[str, int | float]) -> dict[str, tuple[str, int]]:  # fmt: skip
    """Per compressible layer, the encoding `size_bytes` counts and its bytes: what the
    export stores (orchestrator.export)."""
    settings = space.layer_settings(policy)
    if space.plan is None:
        return {layer.name: layer_encoding(layer, settings[layer.name])
                for layer in space.profile.layers}  # fmt: skip
    counts = space.channel_counts(policy)
    return {
        layer.name: sliced_encoding(
            layer, [sliced_shape(w.shape, w.key, space.plan, counts) for w in layer.weights],
            settings[layer.name].bits)
        for layer in space.profile.layers
    }  # fmt: skip


def policy_cost(space: SearchSpace, policy: Mapping[str, int | float]) -> Cost:
    """Cost of a canonical policy; no model is built. With a target's artifact
    (`space.artifact`), `size_bytes` is that file's."""
    settings = space.layer_settings(policy)
    counts = space.channel_counts(policy) if space.plan is not None else {}
    shapes = _sliced_shapes(space, counts) if space.plan is not None else {}
    if space.plan is None:
        cost = cost_of_settings(space, settings)
    else:
        cost = _structured_cost(space, settings, shapes)
    if space.artifact is None:
        return cost
    size = space.artifact.file_bytes(shapes or _sliced_shapes(space, {}),
                                     _weight_bits(space, settings),
                                     _act_keys(space, settings))  # fmt: skip
    return dataclasses.replace(cost, size_bytes=size)


def layer_macs(space: SearchSpace, policy: Mapping[str, int | float]) -> dict[str, int]:
    """Multiply-accumulates each compressible layer keeps under `policy` (what `macs`
    sums), by layer: the latency predictor's features (orchestrator/latency.py)."""
    settings = space.layer_settings(policy)
    if space.plan is None:
        return {x.name: layer_macs_of(x, settings[x.name]) for x in space.profile.layers}
    shapes = _sliced_shapes(space, space.channel_counts(policy))
    return {x.name: sum(math.prod(shapes[w.key]) for w in x.weights) * x.uses
            for x in space.profile.layers}  # fmt: skip


def sliced_weight_shapes(space: SearchSpace, policy: Mapping[str, int | float]
                         ) -> list[tuple[LayerInfo, list[tuple[int, ...]]]]:  # fmt: skip
    """Every compressible layer with its weights' shapes under `policy` (structured
    pruning slices them; masks keep them): what a dense runtime computes."""
    shapes = _sliced_shapes(space, space.channel_counts(policy) if space.plan else {})
    return [(x, [shapes[w.key] for w in x.weights]) for x in space.profile.layers]


def _weight_bits(space: SearchSpace, settings: Mapping[str, LayerSetting]) -> dict[str, int]:
    """The bits of each quantized weight, by state key."""
    return {w.key: settings[layer.name].bits for layer in space.profile.layers
            for w in layer.weights if settings[layer.name].bits < FLOAT_BITS}  # fmt: skip


def _act_keys(space: SearchSpace, settings: Mapping[str, LayerSetting]) -> list[str]:
    """The weights (first state key of each layer) whose layer quantizes its activations."""
    return [layer.weights[0].key for layer in space.profile.layers
            if settings[layer.name].act_bits < FLOAT_BITS]  # fmt: skip


def artifact_bytes(space: SearchSpace, policy: Mapping[str, int | float]) -> int:
    """The target artifact's file size (search_spaces/onnx_layout.py), to the byte."""
    counts = space.channel_counts(policy) if space.plan is not None else {}
    settings = space.layer_settings(policy)
    return space.artifact.file_bytes(_sliced_shapes(space, counts), _weight_bits(space, settings),
                                     _act_keys(space, settings))  # fmt: skip
