"""What the cost model needs to know about a model, measured once with forward hooks.

A ModelProfile is plain data (no modules): the compressible layers with their weight
shapes and how often each weight element is used per forward pass, plus the bytes of
every other tensor in the state dict. The cost model works from it alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
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

    @property
    def float_bytes(self) -> int:
        return self.other_bytes + sum(layer.numel * layer.dtype_bytes for layer in self.layers)

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        return cls(**{**data, "layers": layers, "tensors": tensors})


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
    return _assemble(model, uses)


def _assemble(model: nn.Module, uses: dict[str, int]) -> ModelProfile:
    state = model.state_dict()
    layers, weight_keys = [], set()
    for name, module in model.named_modules():
        layer = _compressible(module)
        if layer is None or name not in uses:  # never called: not part of the forward pass
            continue
        prefix = f"{name}." if name else ""
        weights = tuple(
            WeightInfo(key=prefix + w, shape=tuple(state[prefix + w].shape))
            for w in layer.weights(module)
        )
        weight_keys.update(w.key for w in weights)
        dtype_bytes = state[weights[0].key].element_size()
        layers.append(LayerInfo(name=name, kind=type(module).__name__, weights=weights,
                                uses=uses[name], dtype_bytes=dtype_bytes))  # fmt: skip
    other = sum(t.numel() * t.element_size() for k, t in state.items() if k not in weight_keys)
    modules = list(model.modules())
    marked = {layer.family for layer in LAYERS.values()
              if layer.family and any(isinstance(m, layer.types) for m in modules)}  # fmt: skip
    family = next((fam for fam in FAMILY_ORDER if fam in marked), "mlp")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    params = {k for k, _ in model.named_parameters()}
    tensors = tuple(TensorInfo(key=k, shape=tuple(t.shape), dtype_bytes=t.element_size(),
                               parameter=k in params) for k, t in state.items())  # fmt: skip
    return ModelProfile(layers=tuple(layers), other_bytes=other, has_batchnorm=has_bn,
                        family=family, tensors=tensors)  # fmt: skip
