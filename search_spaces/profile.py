"""What the cost model needs to know about a model, measured once with forward hooks.

A ModelProfile is plain data (no modules): the compressible layers with their weight
shapes and how often each weight element is used per forward pass, plus the bytes of
every other tensor in the state dict. The cost model works from it alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.layers import LAYERS, LayerType, layer_type


@dataclass(frozen=True, kw_only=True)
class WeightInfo:
    """One weight tensor of a layer: `rows` output channels, one scale each when quantized."""

    key: str  # state-dict key
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0]


@dataclass(frozen=True, kw_only=True)
class LayerInfo:
    """A compressible layer (Conv, Linear, LSTM, GRU): its weights share one bits and keep knob."""

    name: str
    kind: str
    weights: tuple[WeightInfo, ...]
    uses: int  # multiply-accumulates per weight element in one forward over example_inputs
    dtype_bytes: int
    # its module's forward runs (False: its weights are used functionally by another
    # module, e.g. nn.MultiheadAttention's out_proj): what activation hooks can see
    called: bool = True

    @property
    def numel(self) -> int:
        return sum(w.numel for w in self.weights)

    @property
    def rows(self) -> int:
        return sum(w.rows for w in self.weights)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weights[0].shape


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    """Any state-dict tensor (structured pruning shrinks biases and norms too)."""

    key: str
    shape: tuple[int, ...]
    dtype_bytes: int
    parameter: bool  # a parameter (counted in `params`) rather than a buffer


@dataclass(frozen=True, kw_only=True)
class ModelProfile:
    layers: tuple[LayerInfo, ...]
    other_bytes: int  # every state-dict tensor that is not a layer weight, at its stored dtype
    has_batchnorm: bool
    family: str  # "cnn", "rnn" or "mlp": picks the preset
    tensors: tuple[TensorInfo, ...] = ()  # the whole state dict
    # what is not compressed although it holds weights, with why (never left out silently)
    left_out: Mapping[str, str] = field(default_factory=dict)

    @property
    def float_bytes(self) -> int:
        return self.other_bytes + sum(layer.numel * layer.dtype_bytes for layer in self.layers)

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "left_out": dict(self.left_out)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelProfile:
        layers = tuple(
            LayerInfo(
                **{**layer, "weights": tuple(
                    WeightInfo(key=w["key"], shape=tuple(w["shape"])) for w in layer["weights"]
                )}
            )
            for layer in data["layers"]
        )  # fmt: skip
        tensors = tuple(TensorInfo(**{**t, "shape": tuple(t["shape"])})
                        for t in data.get("tensors", ()))  # fmt: skip
        return cls(**{**data, "layers": layers, "tensors": tensors,
                      "left_out": dict(data.get("left_out", {}))})  # fmt: skip


FAMILY_ORDER = ("rnn", "cnn")  # a model with any recurrent layer is an rnn; "mlp" if none


def _compressible(module: nn.Module) -> LayerType | None:
    layer = layer_type(module)
    return layer if layer is not None and layer.compressible else None


# How each kind of inputs is passed to the model (Task contract).
_CALLERS: dict[type, Callable[[nn.Module, Any], Any]] = {
    tuple: lambda model, x: model(*x),
    list: lambda model, x: model(*x),
    dict: lambda model, x: model(**x),
}


def call_model(model: nn.Module, inputs: Any) -> Any:
    """`model(x)`, `model(*x)` or `model(**x)` by the kind of inputs."""
    for kind, caller in _CALLERS.items():
        if isinstance(inputs, kind):
            return caller(model, inputs)
    return model(inputs)


def profile_model(model: nn.Module, example_inputs: Any) -> ModelProfile:
    """Profile `model` with one forward pass over `example_inputs` (hooks count weight uses)."""
    uses: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        layer = _compressible(module)
        if layer is None:
            continue

        def hook(mod, _inputs, output, name=name, count=layer.uses):
            uses[name] = uses.get(name, 0) + count(mod, output)  # shared modules add up

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call_model(model.eval(), example_inputs)
    finally:
        for h in hooks:
            h.remove()
    called = set(uses)
    _driven_uses(model, uses)
    uncalled = {
        name: module for name, module in model.named_modules()
        if name not in uses and _compressible(module) is not None
    }  # fmt: skip
    if uncalled:
        uses.update(_functional_uses(model, example_inputs, uncalled))
    return _assemble(model, uses, called)


def _driven_uses(model: nn.Module, uses: dict[str, int]) -> None:
    """Children a called layer uses functionally get its uses (its type's `drives`)."""
    for name, module in model.named_modules():
        layer = layer_type(module)
        if layer is None or name not in uses:
            continue
        prefix = f"{name}." if name else ""
        for child in layer.drives:
            if isinstance(getattr(module, child, None), nn.Module):
                uses.setdefault(prefix + child, uses[name])


# functions whose second argument is a weight applied per output row (dim 0)
_WEIGHTED = {F.linear, F.conv1d, F.conv2d, F.conv3d}


def _functional_uses(model: nn.Module, example_inputs: Any,
                     layers: Mapping[str, nn.Module]) -> dict[str, int]:  # fmt: skip
    """Uses of layers whose forward never runs but whose weights the model passes to
    F.linear / F.conv* itself (Swin's attention calls F.linear on `qkv.weight`), found by
    a second forward pass under a TorchFunctionMode; views of a weight (split q/k/v)
    count toward it. Layers still unseen are not part of the forward pass."""
    from torch.overrides import TorchFunctionMode

    owner = {}
    for name, module in layers.items():
        for w in _compressible(module).weights(module):
            owner[id(module.get_parameter(w))] = name
    macs: dict[str, int] = {}

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
            if func in _WEIGHTED and isinstance(weight, torch.Tensor):
                base = weight if id(weight) in owner else weight._base
                if base is not None and id(base) in owner and weight.shape[0]:
                    per_row = out.numel() // weight.shape[0]
                    macs[owner[id(base)]] = macs.get(owner[id(base)], 0) + weight.numel() * per_row
            return out

    with torch.no_grad(), Count():
        call_model(model.eval(), example_inputs)
    numel = {n: sum(m.get_parameter(w).numel() for w in _compressible(m).weights(m))
             for n, m in layers.items()}  # fmt: skip
    return {name: total // max(1, numel[name]) for name, total in macs.items()}


def _assemble(model: nn.Module, uses: dict[str, int], called: set[str]) -> ModelProfile:
    state = model.state_dict()
    layers, weight_keys, left_out = [], set(), {}
    for name, module in model.named_modules():
        layer = _compressible(module)
        if layer is None:
            continue
        if name not in uses:
            left_out[name] = (f"{type(module).__name__} not called by the forward pass on the "
                              "example inputs (kept in float)")  # fmt: skip
            continue
        prefix = f"{name}." if name else ""
        weights = tuple(
            WeightInfo(key=prefix + w, shape=tuple(state[prefix + w].shape))
            for w in layer.weights(module)
        )
        weight_keys.update(w.key for w in weights)
        dtype_bytes = state[weights[0].key].element_size()
        layers.append(LayerInfo(name=name, kind=type(module).__name__, weights=weights,
                                uses=uses[name], dtype_bytes=dtype_bytes,
                                called=name in called))  # fmt: skip
    other = sum(t.numel() * t.element_size() for k, t in state.items() if k not in weight_keys)
    modules = list(model.modules())
    marked = {layer.family for layer in LAYERS.values()
              if layer.family and any(isinstance(m, layer.types) for m in modules)}  # fmt: skip
    family = next((fam for fam in FAMILY_ORDER if fam in marked), "mlp")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    params = {k for k, _ in model.named_parameters()}
    tensors = tuple(TensorInfo(key=k, shape=tuple(t.shape), dtype_bytes=t.element_size(),
                               parameter=k in params) for k, t in state.items())  # fmt: skip
    left_out.update(_unowned_weights(model, weight_keys))
    return ModelProfile(layers=tuple(layers), other_bytes=other, has_batchnorm=has_bn,
                        family=family, tensors=tensors, left_out=left_out)  # fmt: skip


def _unowned_weights(model: nn.Module, weight_keys: set[str]) -> dict[str, str]:
    """Parameters of module types no layer type knows (position tables, class tokens,
    a custom layer's weights): kept in float, and said so."""
    found = {}
    for name, module in model.named_modules():
        if layer_type(module) is not None:
            continue
        prefix = f"{name}." if name else ""
        for pname, param in module.named_parameters(recurse=False):
            if prefix + pname not in weight_keys and param.dim() >= 1:
                found[prefix + pname] = (f"a parameter of {type(module).__name__} "
                                         f"({param.numel():,} values) no layer type quantizes "
                                         "(kept in float)")  # fmt: skip
    return found
