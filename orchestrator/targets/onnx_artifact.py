"""ONNX artifacts (issue 15): the base model exported once, each candidate written into it.

`skeleton_of` exports the base model with torch's TorchScript-based exporter (no constant
folding, so every initializer keeps its state-dict name), folds each BatchNormalization
that follows a Conv into it (`Fold`: exact, per output channel) and keeps the graph
without the state tensors: an `OnnxLayout` (search_spaces/onnx_layout.py), which also
prices every candidate's file to the byte. `write_artifact` fills the skeleton
with a rebuilt candidate's tensors: float initializers, or for a quantized weight its
integer codes (int8, or int4 two to a byte), one float32 scale per output row and the
nodes that make the float tensor of them under its old name, so the rest of the graph is
unchanged (`_coded_weight`: DequantizeLinear for a layer on 8-bit activations, Cast and
Mul for a float one); a grouped convolution gets the `group` its sliced weight implies. Nothing is
exported per candidate: writing is a copy of the tensors into protobuf, milliseconds.

A candidate whose graph the skeleton does not fit (a structural constant that depends on a
channel count, e.g. a reshape to a fixed width) fails in ONNX Runtime when its session is
made, with the error named (orchestrator/targets/onnxrt.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.batches import call_model
from orchestrator.compress.quantize import quantize
from search_spaces.onnx_layout import (
    CODE_TYPES,
    FLOAT32,
    INT32,
    UINT8,
    ActNode,
    Fold,
    GroupedConv,
    OnnxLayout,
    act_name,
    cast_name,
    code_width,
    codes_name,
    field_bytes,
    float_codes_name,
    integer_bits,
    node_name,
    rescale_name,
    scale_dims,
    scale_name,
    varint_bytes,
    zero_name,
)

OPSET = 21  # DequantizeLinear on int4 initializers, per axis
# torch dtype -> ONNX TensorProto.DataType (the tensors a state dict holds)
DATA_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int16: 5, torch.int32: 6,
              torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.float64: 11,
              torch.bfloat16: 16}  # fmt: skip


def input_names(inputs: Any) -> list[str]:
    count = len(inputs) if isinstance(inputs, (tuple, list)) else 1
    return [f"input_{i}" for i in range(count)]


def _as_args(inputs: Any) -> tuple:
    if isinstance(inputs, dict):
        raise TypeError("inputs given as a dict (keyword arguments) cannot be exported to "
                        "ONNX here yet; give the task's inputs as a tensor or a tuple")  # fmt: skip
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _leaf_count(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return 1
    values = output.values() if isinstance(output, Mapping) else output
    return sum(_leaf_count(v) for v in values)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The TorchScript exporter warns (deprecation, tracer) on every call."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_base(model: nn.Module, example_inputs: Any) -> bytes:
    """The model as ONNX, every dimension of inputs and outputs dynamic."""
    args = _as_args(example_inputs)
    with torch.no_grad():
        outputs = _leaf_count(call_model(model, example_inputs))
    names = input_names(example_inputs)
    output_names = [f"output_{i}" for i in range(outputs)]
    axes = {n: dict(enumerate(f"{n}_{d}" for d in range(a.dim())))
            for n, a in zip(names, args, strict=True) if isinstance(a, torch.Tensor)}  # fmt: skip
    axes.update({n: {0: "batch"} for n in output_names})
    buffer = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, args, buffer, dynamo=False, do_constant_folding=False,
                          opset_version=OPSET, input_names=names, output_names=output_names,
                          dynamic_axes=axes)  # fmt: skip
    return buffer.getvalue()


def _distinct(model: nn.Module) -> nn.Module:
    """A copy whose state tensors all differ: the exporter merges initializers of equal
    values (a random-init model's BatchNorm weights are all ones) into one name, and a
    candidate cuts them differently. Values do not matter: the skeleton drops them."""
    copy = deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, tensor in enumerate(copy.state_dict().values()):
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 1.0)
            elif tensor.dtype != torch.bool:
                tensor.fill_(i + 1)
    return copy


def skeleton_of(model: nn.Module, example_inputs: Any) -> OnnxLayout:
    """The base model's export as a layout: its graph without the state tensors."""
    import onnx

    proto = onnx.load_from_string(export_base(_distinct(model), example_inputs))
    state = model.state_dict()
    graph = proto.graph
    graph.ClearField("value_info")  # intermediate shapes: a sliced candidate changes them
    folds = _fold_batchnorms(graph, state)
    kept = [t for t in graph.initializer if t.name not in state]
    tensors = tuple((t.name, state[t.name].element_size(), t.data_type)
                    for t in graph.initializer if t.name in state)  # fmt: skip
    del graph.initializer[:]
    graph.initializer.extend(kept)
    convs = tuple(_grouped(i, node, tuple(state[node.input[1]].shape))
                  for i, node in enumerate(graph.node)
                  if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in state
                  and _group(node) > 1)  # fmt: skip
    graph_bytes = graph.ByteSize()
    return OnnxLayout(
        skeleton=proto.SerializeToString(),
        model_rest=proto.ByteSize() - field_bytes(graph_bytes),
        graph_rest=graph_bytes - sum(field_bytes(graph.node[c.node].ByteSize()) for c in convs),
        tensors=tensors, convs=convs, inputs=tuple(i.name for i in graph.input),
        acts=_act_nodes(graph, state), folds=folds,
    )  # fmt: skip


def _uses(graph: Any) -> dict[str, list[int]]:
    """Each tensor name's consuming nodes, by index."""
    uses: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            uses.setdefault(name, []).append(i)
    return uses


def _fold_of(graph: Any, index: int, uses: Mapping[str, list[int]],
             state: Mapping[str, torch.Tensor]) -> Fold | None:  # fmt: skip
    """The fold of the BatchNormalization after Conv node `index`, if it is the conv's only
    consumer and all the tensors involved are float32 state tensors used there alone."""
    conv = graph.node[index]
    if conv.op_type != "Conv" or len(conv.input) < 2 or len(conv.output) != 1:
        return None
    users = uses.get(conv.output[0], [])
    if len(users) != 1 or conv.output[0] in {o.name for o in graph.output}:
        return None
    norm = graph.node[users[0]]
    conv_bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
    if norm.op_type != "BatchNormalization" or len(norm.output) != 1 or len(norm.input) != 5:
        return None
    own = [(conv.input[1], index), *([(conv_bias, index)] if conv_bias else [])]
    own += [(key, users[0]) for key in norm.input[1:]]
    if not all(key in state and state[key].dtype == torch.float32 and uses[key] == [node]
               for key, node in own):  # fmt: skip
        return None
    epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
    scale, bias, mean, var = norm.input[1:]
    return Fold(weight=conv.input[1], bias=bias, conv_bias=conv_bias, scale=scale, mean=mean,
                var=var, epsilon=epsilon)  # fmt: skip


def _fold_batchnorms(graph: Any, state: Mapping[str, torch.Tensor]) -> tuple[Fold, ...]:
    """Fold every BatchNormalization that follows a Conv into it, in `graph`: the conv
    writes the norm's output with the norm's bias as its input 2; the norm's node and its
    other tensors (and the conv's own bias) leave the graph."""
    uses = _uses(graph)
    folds, norms = [], set()
    for i, conv in enumerate(graph.node):
        fold = _fold_of(graph, i, uses, state)
        if fold is None:
            continue
        norm = uses[conv.output[0]][0]
        conv.output[0] = graph.node[norm].output[0]
        if fold.conv_bias:
            conv.input[2] = fold.bias
        else:
            conv.input.append(fold.bias)
        folds.append(fold)
        norms.add(norm)
    gone = {k for f in folds for k in (f.scale, f.mean, f.var, f.conv_bias) if k}
    nodes = [node for i, node in enumerate(graph.node) if i not in norms]
    initializers = [t for t in graph.initializer if t.name not in gone]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    return tuple(folds)


# nodes that apply a layer's weight (input 1) and have integer kernels in ONNX Runtime
ACT_OPS = ("Conv", "Gemm")


def _act_nodes(graph: Any, state: Mapping[str, torch.Tensor]) -> tuple[ActNode, ...]:
    """The Conv/Gemm nodes fed a state weight directly, one per weight (a weight applied
    twice gets no activation knob: its two uses would need one pair each), each with the
    ReLU after it that its output pair can take in (`ActNode.after`)."""
    uses, values = _uses(graph), _constants(graph)
    acts = []
    for i, node in enumerate(graph.node):
        key = node.input[1] if node.op_type in ACT_OPS and len(node.input) > 1 else None
        if key in state and uses[key] == [i] and len(node.output) == 1:
            bias = node.input[2] if len(node.input) > 2 and node.input[2] in state else None
            after = _relu_after(graph, i, uses, values)
            output = node.output[0] if after is None else graph.node[after[0]].output[0]
            acts.append(ActNode(
                key=key, node=i, input=node.input[0], output=output, node_bytes=node.ByteSize(),
                bias=bias if bias and uses[bias] == [i] else None,
                **({} if after is None else {"after": after[0], "after_high": after[1],
                                             "after_bytes": graph.node[after[0]].ByteSize()}),
            ))  # fmt: skip
    return tuple(acts)


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """The values of the graph's Constant nodes and non-state initializers, by name."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _relu_after(graph: Any, index: int, uses: Mapping[str, list[int]],
                values: Mapping[str, np.ndarray]) -> tuple[int, float] | None:  # fmt: skip
    """(index, upper bound) of the Relu, or Clip from exactly 0 (ReLU6), that alone reads
    node `index`'s output: a uint8 range from 0 computes it exactly, so the output pair
    can sit after it (a Clip from elsewhere would need a zero point the range sets)."""
    users = uses.get(graph.node[index].output[0], [])
    if len(users) != 1 or graph.node[index].output[0] in {o.name for o in graph.output}:
        return None
    node = graph.node[users[0]]
    if node.op_type == "Relu":
        return users[0], math.inf
    if node.op_type != "Clip" or len(node.input) != 3:
        return None
    low, high = (values.get(name) for name in node.input[1:])
    if low is None or high is None or low.size != 1 or high.size != 1 or float(low) != 0.0:
        return None
    return users[0], float(high)


def _group(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _grouped(index: int, node: Any, weight: tuple[int, ...]) -> GroupedConv:
    attribute = next(a for a in node.attribute if a.name == "group")
    size = attribute.ByteSize()
    return GroupedConv(node=index, key=node.input[1], group=attribute.i, weight=weight,
                       node_rest=node.ByteSize() - field_bytes(size),
                       attribute_rest=size - 1 - varint_bytes(attribute.i))  # fmt: skip


def _tensor(name: str, dims: tuple[int, ...], data_type: int, raw: bytes) -> Any:
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=data_type, raw_data=raw)
    tensor.dims.extend(dims)
    return tensor


def _code_bytes(codes: torch.Tensor, bits: int) -> bytes:
    """Raw codes: int8 as they are; int4 two to a byte, the first in the low nibble."""
    flat = codes.reshape(-1).to(torch.int16)
    if bits == 8:
        return flat.to(torch.int8).numpy().tobytes()
    if bits == 16:
        return flat.numpy().tobytes()
    nibbles = (flat & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return (nibbles[0::2] | (nibbles[1::2] << 4)).numpy().tobytes()


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()


def _scalar(name: str, value: float | int, data_type: int) -> Any:
    dtype = "<f4" if data_type == FLOAT32 else "u1"
    return _tensor(name, (), data_type, np.asarray(value, dtype=dtype).tobytes())


def _pair(key: str, side: str, params: Any, source: str, result: str) -> tuple[list, list]:
    """One side's QuantizeLinear -> DequantizeLinear: (initializers, nodes)."""
    from onnx import helper

    scale, zero, quantized = (act_name(key, side, w) for w in ("scale", "zero", "quantized"))
    tensors = [_scalar(scale, params.scale, FLOAT32), _scalar(zero, params.zero, UINT8)]
    nodes = [helper.make_node("QuantizeLinear", [source, scale, zero], [quantized],
                              name=act_name(key, side, "quantize")),
             helper.make_node("DequantizeLinear", [quantized, scale, zero], [result],
                              name=act_name(key, side, "dequantize"))]  # fmt: skip
    return tensors, nodes


def _with_pairs(layout: OnnxLayout, graph: Any, activations: Mapping[str, Any]) -> list:
    """The graph's nodes with activation pairs around the nodes of `activations`' weights,
    in topological order (the input's pair just before its node, the output's just after);
    adds the pairs' initializers to the graph."""
    around = {layout.activation_keys[key].node: key for key in activations}
    # a ReLU the output pair takes in: the pair follows it, where it stands in the graph
    # (after the Constants of its bounds)
    relus = {act.after: key for key in activations
             if (act := layout.activation_keys[key]).after is not None}  # fmt: skip
    nodes = []
    for i, node in enumerate(graph.node):
        key = around.get(i, relus.get(i))
        if key is None:
            nodes.append(node)
            continue
        act = layout.activation_keys[key]
        new_input, new_output = act.renamed
        if i == act.node:
            before = _pair(key, "in", activations[key][0], act.input, new_input)
            node.input[0] = new_input
            graph.initializer.extend(before[0])
            nodes.extend([*before[1], node])
        if i == (act.node if act.after is None else act.after):
            after = _pair(key, "out", activations[key][1], new_output, act.output)
            node.output[0] = new_output
            graph.initializer.extend(after[0])
            nodes.extend([node, *after[1]] if i != act.node else after[1])
    return nodes


def _fold_state(layout: OnnxLayout, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each folded conv's factor per output channel, by weight key; `state` gets the folded
    biases in place of the BatchNorms' (the layout's `Fold`)."""
    factors = {}
    for fold in layout.folds:
        factor = state[fold.scale] / torch.sqrt(state[fold.var] + fold.epsilon)
        bias = state[fold.conv_bias] if fold.conv_bias else 0.0
        state[fold.bias] = (bias - state[fold.mean]) * factor + state[fold.bias]
        factors[fold.weight] = factor
    return factors


def _codes(weight: torch.Tensor, bits: int,
           factor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A quantized weight's codes and float32 scales (the fake-quantized values' own), with
    a folded BatchNorm's `factor`: the codes take its sign (they are symmetric, so -code is
    a code), the scales its magnitude; a row the factor zeroes gets zero codes."""
    codes, scale = quantize(weight, bits)
    scale = scale.float()
    if factor is None:
        return codes, scale
    sign = torch.sign(factor).to(codes.dtype).view(-1, *[1] * (codes.dim() - 1))
    return codes * sign, torch.where(factor != 0, scale * factor.abs(), scale)


def _coded_weight(key: str, codes: torch.Tensor, scale: torch.Tensor, width: int,
                  integer: bool) -> tuple[list, list]:  # fmt: skip
    """A weight as codes (`width` bits), per-row scales and the nodes that make the float
    tensor `key` of them (search_spaces/onnx_layout.py, `weight_encoding`): for an
    `integer` layer a DequantizeLinear with a zero point (what ONNX Runtime fuses into its
    integer kernel), otherwise Cast and Mul (folded when the session is made)."""
    from onnx import helper

    shape = tuple(codes.shape)
    tensors = [_tensor(codes_name(key), shape, CODE_TYPES[width], _code_bytes(codes, width))]
    if integer:
        tensors += [_tensor(scale_name(key), (shape[0],), FLOAT32, _raw(scale)),
                    _tensor(zero_name(key), (shape[0],), CODE_TYPES[width],
                            _code_bytes(torch.zeros(shape[0]), width))]  # fmt: skip
        return tensors, [helper.make_node(
            "DequantizeLinear", [codes_name(key), scale_name(key), zero_name(key)], [key],
            name=node_name(key), axis=0)]  # fmt: skip
    tensors.append(_tensor(scale_name(key), scale_dims(shape), FLOAT32, _raw(scale)))
    return tensors, [
        helper.make_node("Cast", [codes_name(key)], [float_codes_name(key)], name=cast_name(key),
                         to=FLOAT32),
        helper.make_node("Mul", [float_codes_name(key), scale_name(key)], [key],
                         name=rescale_name(key)),
    ]  # fmt: skip


def write_artifact(layout: OnnxLayout, model: nn.Module, bits: Mapping[str, int],
                   activations: Mapping[str, Any] | None = None) -> bytes:  # fmt: skip
    """The candidate `model` (rebuilt, recovered; its quantized weights fake-quantized to
    `bits`, by state key) as an ONNX file of `layout`; `activations`: (input, output)
    QParams (compress/activations.py) by the weight key of each layer whose activations
    are quantized."""
    from onnx import ModelProto, helper

    proto = ModelProto()
    proto.ParseFromString(layout.skeleton)
    graph = proto.graph
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    factors = _fold_state(layout, state)
    shapes = {key: tuple(state[key].shape) for key, _, _ in layout.tensors}
    activations = activations or {}
    bits = integer_bits(bits, activations)  # a layer on 8-bit activations: int8 weights
    biases = layout.integer_biases(shapes, bits, activations)
    nodes = []
    for key, element, data_type in layout.tensors:
        tensor = state[key]
        shape = tuple(tensor.shape)
        if key in biases:
            weight = biases[key]
            scale = _codes(state[weight], bits[weight], factors.get(weight))[1].reshape(-1)
            scale = scale * np.float32(activations[weight][0].scale)
            graph.initializer.extend([
                _tensor(codes_name(key), shape, INT32,
                        _raw(torch.round(tensor.float() / scale).to(torch.int32))),
                _tensor(scale_name(key), shape, FLOAT32, _raw(scale))])  # fmt: skip
            nodes.append(helper.make_node("DequantizeLinear", [codes_name(key), scale_name(key)],
                                          [key], name=node_name(key), axis=0))  # fmt: skip
            continue
        b = bits.get(key)
        zero = key in activations
        encoding = (layout.weight_encoding(key, shape, b, element, data_type, zero)
                    if b else None)  # fmt: skip
        if encoding is not None and encoding[0] == "codes":
            codes, scale = _codes(tensor, b, factors.get(key))
            tensors, made = _coded_weight(key, codes, scale, code_width(b, zero), zero)
            graph.initializer.extend(tensors)
            nodes.extend(made)
        else:
            if key in factors:
                tensor = tensor * factors[key].view(-1, *[1] * (tensor.dim() - 1))
            graph.initializer.append(_tensor(key, shape, data_type, _raw(tensor)))
    for conv in layout.convs:
        attribute = next(a for a in graph.node[conv.node].attribute if a.name == "group")
        attribute.i = conv.group_of(tuple(state[conv.key].shape))
    if activations:
        nodes.extend(_with_pairs(layout, graph, activations))
    else:
        nodes.extend(graph.node)
    # the nodes that make a weight of its codes read only initializers: first in order
    del graph.node[:]
    graph.node.extend(nodes)
    return proto.SerializeToString()
