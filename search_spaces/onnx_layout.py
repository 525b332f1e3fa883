"""The ONNX artifact's size to the byte, from plain data (issue 15: the artifact is the
candidate, and the cost model prices it before any worker builds it).

An ONNX file is one protobuf message (ModelProto). A candidate's file is the base
model's export (the *skeleton*: its graph without the weights of the state dict) plus,
per state tensor, either one float initializer or, for a quantized weight, its integer
codes, one float32 scale per output row and the nodes that give the float tensor its old
name (a `DequantizeLinear`, or `Cast` and `Mul`: `weight_encoding`); grouped convolutions
get their new `group`. Protobuf's encoding is simple enough to count: every field is a tag
(one byte for most field numbers used here), and a length-delimited field adds its length
as a varint. So the file's size is arithmetic over names, shapes and bits
(`OnnxLayout.file_bytes`); the builder (orchestrator/targets/onnx_artifact.py) writes
exactly these fields, and a test holds the two to the byte.

A BatchNormalization right after a Conv is folded into it in the skeleton (`Fold`): its
four tensors and its node are gone, the Conv gets its bias.

A layer whose activations are quantized (`act_bits` 8) gets a QuantizeLinear /
DequantizeLinear pair on its node's input and another on its output (uint8, one scale and
zero point each, scalar initializers), the node's input and output renamed to meet them:
ONNX Runtime fuses the pattern into an integer kernel (`ActNode`).

A quantized weight is written as codes only where that is smaller than its dequantized
values in float (a tiny layer's scales, names and node can outweigh its weights): the
values are the same either way, and fewer bits never cost bytes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

FLOAT_BITS = 32
# ONNX TensorProto.DataType of the integer codes of b-bit weights (opset 21: INT4), by the
# container width that holds them (3-bit codes in int4, 5..8-bit in int8: same values)
CODE_TYPES = {4: 22, 8: 3, 16: 5}


def container(bits: int) -> int:
    """The integer width ONNX stores b-bit codes in."""
    return next(width for width in CODE_TYPES if bits <= width)


def code_width(bits: int, integer: bool = False) -> int:
    """The width a weight's codes are stored in; `integer` (its layer's activations are
    quantized too): at least 8, since ONNX Runtime's integer kernels (QLinearConv, QGemm)
    take int8 weights only and would leave an int4 one to a float kernel, dequantizing
    weights and activations on every run. Its 2..4-bit codes are exact in int8."""
    width = container(bits)
    return max(width, 8) if integer else width


FLOAT32 = 1
UINT8 = 2
INT32 = 6
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


def zero_name(key: str) -> str:
    return f"{key}_zero_point"


def float_codes_name(key: str) -> str:
    return f"{key}_codes_float"


def cast_name(key: str) -> str:
    return f"{key}_cast"


def rescale_name(key: str) -> str:
    return f"{key}_rescale"


CAST_TO_FLOAT = 9  # AttributeProto{name: "to", i: 1 (FLOAT), type: INT}


def rescale_nodes_bytes(key: str) -> int:
    """The two NodeProtos that turn a float-activation layer's codes into its weight:
    Cast (codes -> float, attribute `to`) and Mul (by the per-row scales), each with
    inputs, output, name and op_type."""
    cast = (text_bytes(codes_name(key)) + text_bytes(float_codes_name(key))
            + text_bytes(cast_name(key)) + text_bytes("Cast")
            + field_bytes(CAST_TO_FLOAT))  # fmt: skip
    mul = (text_bytes(float_codes_name(key)) + text_bytes(scale_name(key)) + text_bytes(key)
           + text_bytes(rescale_name(key)) + text_bytes("Mul"))  # fmt: skip
    return field_bytes(cast) + field_bytes(mul)


def dequantize_node_bytes(key: str, zero: bool = False) -> int:
    """NodeProto: inputs (codes, scale, and with `zero` a zero point), output (the float
    tensor's name), name, op_type, the axis attribute."""
    return (text_bytes(codes_name(key)) + text_bytes(scale_name(key)) + text_bytes(key)
            + text_bytes(node_name(key)) + text_bytes("DequantizeLinear")
            + field_bytes(AXIS_ATTRIBUTE)
            + (text_bytes(zero_name(key)) if zero else 0))  # fmt: skip


# a search prices thousands of policies (a repair walks knob by knob): each tensor takes
# few shapes and bits, so its bytes are looked up, not recounted
@functools.lru_cache(maxsize=1 << 16)
def weight_encoding(key: str, shape: tuple[int, ...], bits: int, element: int,
                    data_type: int = FLOAT32, zero: bool = False) -> tuple[str, int]:  # fmt: skip
    """("float" or "codes", bytes in the graph) of a state tensor of `shape` at `bits`:
    the smaller of its float values and its codes (with scales and nodes). `zero`: its
    layer's activations are quantized, so the codes go to a DequantizeLinear with an
    explicit zero point (all 0) per row, as ONNX Runtime's integer kernels ask; otherwise
    they go through Cast and Mul by scales shaped to broadcast over each row (`scale_dims`),
    which ONNX Runtime folds into a float weight when the session is made (a weight's
    DequantizeLinear it keeps for its QDQ fusion once any layer is integer, and would
    dequantize on every run: mobilenet_v2 at keep 0.5, 8-bit weights, 0.31 -> 1.41 ms)."""
    numel = math.prod(shape)
    plain = field_bytes(tensor_bytes(key, shape, numel * element, data_type))
    if bits >= FLOAT_BITS:
        return "float", plain
    width = code_width(bits, zero)
    coded = field_bytes(tensor_bytes(codes_name(key), shape, code_bytes(numel, width),
                                     CODE_TYPES[width]))  # fmt: skip
    if zero:
        coded += (field_bytes(tensor_bytes(scale_name(key), (shape[0],), 4 * shape[0], FLOAT32))
                  + field_bytes(dequantize_node_bytes(key, zero))
                  + field_bytes(tensor_bytes(zero_name(key), (shape[0],),
                                             code_bytes(shape[0], width), CODE_TYPES[width])))  # fmt: skip
    else:
        coded += (field_bytes(tensor_bytes(scale_name(key), scale_dims(shape), 4 * shape[0],
                                           FLOAT32))
                  + rescale_nodes_bytes(key))  # fmt: skip
    return ("codes", coded) if coded < plain else ("float", plain)


def scale_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-row scales shaped to multiply a weight of `shape` (rows: its first dimension)."""
    return (shape[0], *[1] * (len(shape) - 1))


INTEGER_WEIGHT_BITS = 8


def integer_bits(bits: Mapping[str, int], acts: Collection[str]) -> dict[str, int]:
    """`bits` (by weight key) with the weight of each layer on 8-bit activations (`acts`)
    at most 8 bits: ONNX Runtime's integer kernels take int8 weights, and a float one it
    quantizes itself into a slower kernel (mobilenet_v2 with every layer on 8-bit
    activations ran 0.35 ms with float weights, 0.24 ms with 8-bit ones)."""
    return {**bits, **{k: min(bits.get(k, FLOAT_BITS), INTEGER_WEIGHT_BITS) for k in acts}}


def bias_codes_bytes(key: str, count: int) -> int:
    """An integer layer's bias as ONNX Runtime's integer kernels take it: int32 codes at
    scale input scale x weight scale (one per output channel) behind DequantizeLinear."""
    return (field_bytes(tensor_bytes(codes_name(key), (count,), 4 * count, INT32))
            + field_bytes(tensor_bytes(scale_name(key), (count,), 4 * count, FLOAT32))
            + field_bytes(dequantize_node_bytes(key)))  # fmt: skip


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
        """`group` for a weight of `shape` [out, in/groups, ...]: a depthwise conv keeps
        one group per channel; any other keeps its groups, its cuts taking the same place
        in each (search_spaces/layers/conv.py), its inputs and outputs per group cut
        apart (regnet_y_400mf: 8 -> 7 inputs and 8 -> 5 outputs in each of 13 groups)."""
        depthwise = self.weight[1] == 1 and self.group == self.weight[0]
        return shape[0] if depthwise else self.group

    def bytes(self, group: int) -> int:
        return self.node_rest + field_bytes(self.attribute_rest + 1 + varint_bytes(group))


# the names an activation pair adds, per side ("in", "out") of a layer with weight `key`
def act_name(key: str, side: str, what: str) -> str:
    """what: scale, zero, quantized, quantize (node), dequantize (node), float (the layer's
    own output before its pair) or dequantized (the pair's output on the input side)."""
    return f"{key}_{side}_{what}"


def quantize_node_bytes(inputs: tuple[str, str, str], output: str, name: str, op: str) -> int:
    """A QuantizeLinear / DequantizeLinear NodeProto, per tensor: three inputs, one
    output, name, op_type, no attribute."""
    return (sum(text_bytes(x) for x in inputs) + text_bytes(output) + text_bytes(name)
            + text_bytes(op))  # fmt: skip


def _pair_bytes(key: str, side: str, source: str, result: str) -> int:
    """One side's pair: its scale and zero point (scalar initializers) and two nodes."""
    scale, zero, quantized = (act_name(key, side, w) for w in ("scale", "zero", "quantized"))
    return (field_bytes(tensor_bytes(scale, (), 4, FLOAT32))
            + field_bytes(tensor_bytes(zero, (), 1, UINT8))
            + field_bytes(quantize_node_bytes((source, scale, zero), quantized,
                                              act_name(key, side, "quantize"), "QuantizeLinear"))
            + field_bytes(quantize_node_bytes((quantized, scale, zero), result,
                                              act_name(key, side, "dequantize"),
                                              "DequantizeLinear")))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ActNode:
    """The Conv or Gemm node that applies a layer's weight `key` (its input 1), where an
    `act_bits` knob quantizes its input 0 and its output 0."""

    key: str
    node: int  # its index in the skeleton's graph
    input: str  # its input 0 in the skeleton
    output: str  # the tensor the output pair ends in: the node's output 0, or `after`'s
    node_bytes: int  # its bytes in the skeleton (grouped convs: see GroupedConv)
    bias: str | None = None  # its input 2, a state tensor
    # a Relu, or a Clip from 0 (ReLU6), that alone reads the node's output: the output
    # pair goes after it, with a range from 0 (its zero point 0), so quantizing applies
    # it and ONNX Runtime drops it: the integer kernel feeds the next one with no float
    # step between (mobilenet_v2 at W8A8: 0.32 -> 0.23 ms here)
    after: int | None = None  # its index in the skeleton's graph
    after_bytes: int = 0  # its bytes in the skeleton
    after_high: float = math.inf  # its upper bound (a Clip's max)

    @property
    def renamed(self) -> tuple[str, str]:
        """The node's input 0 and its (or `after`'s) output 0 with the pairs in place."""
        return act_name(self.key, "in", "dequantized"), act_name(self.key, "out", "float")

    @property
    def _output_growth(self) -> int:
        return text_bytes(self.renamed[1]) - text_bytes(self.output)

    @property
    def growth(self) -> int:
        """Bytes the node itself gains by the renaming."""
        own = text_bytes(self.renamed[0]) - text_bytes(self.input)
        return own + (self._output_growth if self.after is None else 0)

    @property
    def after_growth(self) -> int:
        """Bytes the graph gains by renaming `after`'s output (0 without one)."""
        if self.after is None:
            return 0
        return field_bytes(self.after_bytes + self._output_growth) - field_bytes(self.after_bytes)

    @property
    def pairs_bytes(self) -> int:
        """The graph's bytes the two pairs add (initializers and nodes)."""
        new_input, new_output = self.renamed
        return (_pair_bytes(self.key, "in", self.input, new_input)
                + _pair_bytes(self.key, "out", new_output, self.output))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Fold:
    """A BatchNormalization folded into the Conv before it: the skeleton has no node for it
    and the Conv writes its output. Per output channel, with factor = scale / sqrt(var +
    epsilon), the weight is the conv's times the factor (a quantized weight keeps its codes:
    its scales take the factor's magnitude, its codes the sign) and the bias is (conv bias
    - mean) x factor + BatchNorm bias. Unfolded, ONNX Runtime folds it itself only for a
    float weight: behind DequantizeLinear (any integer layer in the model) it stayed a node
    of its own, and an 8-bit layer's output went back to float for it."""

    weight: str  # the conv's weight key
    bias: str  # the folded bias: the BatchNorm's bias key, the conv's input 2 in the skeleton
    conv_bias: str | None  # the conv's own bias, if any (folded into `bias`)
    scale: str  # the BatchNorm's weight (gamma)
    mean: str
    var: str
    epsilon: float

    @property
    def module(self) -> str:
        """The BatchNorm module's name (its state keys' prefix)."""
        return self.scale.rpartition(".")[0]


@dataclass(frozen=True, kw_only=True)
class OnnxLayout:
    """What prices and builds a candidate's ONNX file: the skeleton and where the state
    tensors go. Made once from the base model by the driver
    (orchestrator/targets/onnx_artifact.py)."""

    skeleton: bytes  # the ModelProto without the state tensors' initializers
    model_rest: int  # the ModelProto's bytes without its graph field
    graph_rest: int  # the graph's bytes without those initializers and the grouped convs
    tensors: tuple[tuple[str, int, int], ...]  # (state key, element bytes, ONNX data type)
    convs: tuple[GroupedConv, ...] = ()
    inputs: tuple[str, ...] = ()  # the graph's input names, in call order
    acts: tuple[ActNode, ...] = ()  # nodes whose activations an act_bits knob may quantize
    folds: tuple[Fold, ...] = ()  # BatchNorms folded into their conv (their tensors absent)

    @functools.cached_property
    def activation_keys(self) -> dict[str, ActNode]:
        """The weights (state keys) whose node can take activation pairs."""
        return {a.key: a for a in self.acts}

    def weight_encoding(self, key: str, shape: tuple[int, ...], bits: int, element: int,
                        data_type: int = FLOAT32, zero: bool = False) -> tuple[str, int]:  # fmt: skip
        """("float" or "codes", bytes in the graph) of a tensor at `bits`."""
        return weight_encoding(key, shape, bits, element, data_type, zero)

    def integer_biases(self, shapes: Mapping[str, tuple[int, ...]], bits: Mapping[str, int],
                       acts: Collection[str]) -> dict[str, str]:  # fmt: skip
        """Biases stored as int32 codes, with their node's weight key: those of the nodes
        whose activations are quantized and whose weight is stored as codes (the integer
        kernel's inputs; a weight too small for codes to pay keeps its node float, and its
        bias). `bits` as `integer_bits` made them."""
        element = {key: (size, data_type) for key, size, data_type in self.tensors}
        return {act.bias: act.key for act in map(self.activation_keys.__getitem__, acts)
                if act.bias is not None and bits.get(act.key, FLOAT_BITS) < FLOAT_BITS
                and weight_encoding(act.key, shapes[act.key], bits[act.key],
                                    *element[act.key], True)[0] == "codes"}  # fmt: skip

    def file_bytes(self, shapes: Mapping[str, tuple[int, ...]], bits: Mapping[str, int],
                   acts: Collection[str] = ()) -> int:  # fmt: skip
        """The file's bytes for tensors of `shapes` (by state key), weights of `bits` (by
        key; float where absent), activation pairs around the nodes of the weights `acts`
        (whose weights are at most 8 bits: `integer_bits`)."""
        bits = integer_bits(bits, acts)
        graph = self.graph_rest
        integer = self.integer_biases(shapes, bits, acts)
        for key, element, data_type in self.tensors:
            if key in integer:
                graph += bias_codes_bytes(key, shapes[key][0])
                continue
            graph += weight_encoding(key, shapes[key], bits.get(key, FLOAT_BITS), element,
                                     data_type, key in acts)[1]  # fmt: skip
        grouped = {conv.key for conv in self.convs}
        for conv in self.convs:
            growth = self.activation_keys[conv.key].growth if conv.key in acts else 0
            graph += field_bytes(conv.bytes(conv.group_of(shapes[conv.key])) + growth)
        for key in acts:
            act = self.activation_keys[key]
            graph += act.pairs_bytes + act.after_growth
            if key not in grouped:  # a grouped conv's node is counted above
                graph += field_bytes(act.node_bytes + act.growth) - field_bytes(act.node_bytes)
        return self.model_rest + field_bytes(graph)
