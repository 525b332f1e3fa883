"""The ONNX artifact's size to the byte, from plain data (issue 15: the artifact is the
candidate, and the cost model prices it before any worker builds it).

An ONNX file is one protobuf message (ModelProto). A candidate's file is the base
model's export (the *skeleton*: its graph without the weights of the state dict) plus,
per state tensor, either one float initializer or, for a quantized weight, its integer
codes, one float32 scale per output row and a `DequantizeLinear` node (axis 0) that gives
the float tensor its old name; grouped convolutions get their new `group`. Protobuf's
encoding is simple enough to count: every field is a tag (one byte for the field numbers
used here, all below 16), and a length-delimited field adds its length as a varint. So
the file's size is arithmetic over names, shapes and bits (`OnnxLayout.file_bytes`); the
builder (orchestrator/targets/onnx.py) writes exactly these fields, and a test holds the two
to the byte.

A quantized weight is written as codes only where that is smaller than its dequantized
values in float (a tiny layer's scales, names and node can outweigh its weights): the
values are the same either way, and fewer bits never cost bytes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

FLOAT_BITS = 32
# ONNX TensorProto.DataType of the integer codes of b-bit weights (opset 21: INT4), by the
# container width that holds them (3-bit codes in int4, 5..8-bit in int8: same values)
CODE_TYPES = {4: 22, 8: 3, 16: 5}


def container(bits: int) -> int:
    """The integer width ONNX stores b-bit codes in."""
    return next(width for width in CODE_TYPES if bits <= width)
FLOAT32 = 1
AXIS_ATTRIBUTE = 11  # AttributeProto{name: "axis", i: 0, type: INT}


def varint_bytes(n: int) -> int:
    """Bytes of a non-negative integer as a protobuf varint."""
    return 1 if n < 128 else (n.bit_length() + 6) // 7


def field_bytes(n: int) -> int:
    """A length-delimited field of `n` bytes (one-byte tag): tag + length + payload."""
    return 1 + varint_bytes(n) + n


def text_bytes(text: str) -> int:
    return field_bytes(len(text.encode()))


def tensor_bytes(name: str, dims: tuple[int, ...], payload: int, data_type: int) -> int:
    """A TensorProto with dims (unpacked varints), data_type, name and raw_data."""
    return (sum(1 + varint_bytes(d) for d in dims) + 1 + varint_bytes(data_type)
            + text_bytes(name) + field_bytes(payload))  # fmt: skip


def code_bytes(numel: int, bits: int) -> int:
    """Raw bytes of `numel` b-bit codes (int4: two per byte, low nibble first)."""
    return math.ceil(numel * bits / 8)


def codes_name(key: str) -> str:
    return f"{key}_quantized"


def scale_name(key: str) -> str:
    return f"{key}_scale"


def node_name(key: str) -> str:
    return f"{key}_dequantize"


def dequantize_node_bytes(key: str) -> int:
    """NodeProto: inputs (codes, scale), output (the float tensor's name), name, op_type,
    the axis attribute."""
    return (text_bytes(codes_name(key)) + text_bytes(scale_name(key)) + text_bytes(key)
            + text_bytes(node_name(key)) + text_bytes("DequantizeLinear")
            + field_bytes(AXIS_ATTRIBUTE))  # fmt: skip


# a search prices thousands of policies (a repair walks knob by knob): each tensor takes
# few shapes and bits, so its bytes are looked up, not recounted
@functools.lru_cache(maxsize=1 << 16)
def weight_encoding(key: str, shape: tuple[int, ...], bits: int, element: int,
                    data_type: int = FLOAT32) -> tuple[str, int]:  # fmt: skip
    """("float" or "codes", bytes in the graph) of a state tensor of `shape` at `bits`:
    the smaller of its float values and its codes (with scales and node)."""
    numel = math.prod(shape)
    plain = field_bytes(tensor_bytes(key, shape, numel * element, data_type))
    if bits >= FLOAT_BITS:
        return "float", plain
    width = container(bits)
    coded = (field_bytes(tensor_bytes(codes_name(key), shape, code_bytes(numel, width),
                                      CODE_TYPES[width]))
             + field_bytes(tensor_bytes(scale_name(key), (shape[0],), 4 * shape[0], FLOAT32))
             + field_bytes(dequantize_node_bytes(key)))  # fmt: skip
    return ("codes", coded) if coded < plain else ("float", plain)


@dataclass(frozen=True, kw_only=True)
class GroupedConv:
    """A Conv node whose `group` attribute follows its weight's shape."""

    node: int  # its index in the skeleton's graph
    key: str  # its weight's state key
    group: int  # in the base model
    weight: tuple[int, ...]  # the base model's weight shape
    node_rest: int  # the node's bytes without its group attribute field
    attribute_rest: int  # the group attribute's bytes without its `i` field

    def group_of(self, shape: tuple[int, ...]) -> int:
        """`group` for a weight of `shape` [out, in/groups, ...]: cutting whole groups
        scales `out`, cutting channels within every group scales both."""
        return self.group * shape[0] * self.weight[1] // (self.weight[0] * shape[1])

    def bytes(self, group: int) -> int:
        return self.node_rest + field_bytes(self.attribute_rest + 1 + varint_bytes(group))


@dataclass(frozen=True, kw_only=True)
class OnnxLayout:
    """What prices and builds a candidate's ONNX file: the skeleton and where the state
    tensors go. Made once from the base model by the driver (orchestrator/targets/onnx.py)."""

    skeleton: bytes  # the ModelProto without the state tensors' initializers
    model_rest: int  # the ModelProto's bytes without its graph field
    graph_rest: int  # the graph's bytes without those initializers and the grouped convs
    tensors: tuple[tuple[str, int, int], ...]  # (state key, element bytes, ONNX data type)
    convs: tuple[GroupedConv, ...] = ()
    inputs: tuple[str, ...] = ()  # the graph's input names, in call order

    def weight_encoding(self, key: str, shape: tuple[int, ...], bits: int, element: int,
                        data_type: int = FLOAT32) -> tuple[str, int]:  # fmt: skip
        """("float" or "codes", bytes in the graph) of a tensor at `bits`."""
        return weight_encoding(key, shape, bits, element, data_type)

    def file_bytes(self, shapes: Mapping[str, tuple[int, ...]], bits: Mapping[str, int]) -> int:
        """The file's bytes for tensors of `shapes` (by state key), weights of `bits` (by
        key; float where absent)."""
        graph = self.graph_rest
        for key, element, data_type in self.tensors:
            graph += weight_encoding(key, shapes[key], bits.get(key, FLOAT_BITS), element,
                                     data_type)[1]  # fmt: skip
        for conv in self.convs:
            graph += field_bytes(conv.bytes(conv.group_of(shapes[conv.key])))
        return self.model_rest + field_bytes(graph)
