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


def _uses_per_output_channel(module: nn.Module, output: Any, channels: int) -> int:
    """Output elements per output channel: how often each weight element is multiplied."""
    return output.numel() // channels


def _conv_uses(module: nn.Module, output: Any) -> int:
    return _uses_per_output_channel(module, output, module.out_channels)


def _linear_uses(module: nn.Module, output: Any) -> int:
    return _uses_per_output_channel(module, output, module.out_features)


def _rnn_uses(module: nn.Module, output: Any) -> int:
    # One step multiplies every gate weight once per sequence element: output is
    # (batch, time, directions*out) or its packed/unbatched forms; steps = elements / width.
    seq = output[0]
    seq = seq.data if hasattr(seq, "batch_sizes") else seq
    width = (module.proj_size or module.hidden_size) * (2 if module.bidirectional else 1)
    return seq.numel() // width


def _single_weight(module: nn.Module) -> list[str]:
    return ["weight"]


def _rnn_weights(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters(recurse=False) if name.startswith("weight")]


# Per layer type: (weight names, uses per weight element). Add a type here to support it.
LAYER_HANDLERS: dict[type, tuple[Callable, Callable]] = {
    nn.Conv1d: (_single_weight, _conv_uses),
    nn.Conv2d: (_single_weight, _conv_uses),
    nn.Conv3d: (_single_weight, _conv_uses),
    nn.Linear: (_single_weight, _linear_uses),
    nn.LSTM: (_rnn_weights, _rnn_uses),
    nn.GRU: (_rnn_weights, _rnn_uses),
}

_FAMILY_ORDER = ((nn.LSTM, "rnn"), (nn.GRU, "rnn"), (nn.Conv2d, "cnn"), (nn.Conv1d, "cnn"),
                 (nn.Conv3d, "cnn"))  # fmt: skip


def _handler(module: nn.Module) -> tuple[Callable, Callable] | None:
    return LAYER_HANDLERS.get(type(module))


def profile_model(model: nn.Module, example_inputs: Any) -> ModelProfile:
    """Profile `model` with one forward pass over `example_inputs` (hooks count weight uses)."""
    from orchestrator.batches import call_model

    uses: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        handler = _handler(module)
        if handler is None:
            continue

        def hook(mod, _inputs, output, name=name, count=handler[1]):
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
        handler = _handler(module)
        if handler is None or name not in uses:  # never called: not part of the forward pass
            continue
        prefix = f"{name}." if name else ""
        weights = tuple(
            WeightInfo(key=prefix + w, shape=tuple(state[prefix + w].shape))
            for w in handler[0](module)
        )
        weight_keys.update(w.key for w in weights)
        dtype_bytes = state[weights[0].key].element_size()
        layers.append(LayerInfo(name=name, kind=type(module).__name__, weights=weights,
                                uses=uses[name], dtype_bytes=dtype_bytes))  # fmt: skip
    other = sum(t.numel() * t.element_size() for k, t in state.items() if k not in weight_keys)
    modules = list(model.modules())
    family = next(
        (fam for kind, fam in _FAMILY_ORDER if any(isinstance(m, kind) for m in modules)), "mlp"
    )
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    params = {k for k, _ in model.named_parameters()}
    tensors = tuple(TensorInfo(key=k, shape=tuple(t.shape), dtype_bytes=t.element_size(),
                               parameter=k in params) for k, t in state.items())  # fmt: skip
    return ModelProfile(layers=tuple(layers), other_bytes=other, has_batchnorm=has_bn,
                        family=family, tensors=tensors)  # fmt: skip
