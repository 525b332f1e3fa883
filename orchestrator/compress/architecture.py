"""Plain nn.Sequential models as data: an export rebuilds them without the task's code."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import nn

_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
         "groups", "padding_mode")  # fmt: skip
_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_POOL = ("kernel_size", "stride", "padding", "ceil_mode")
# module type -> constructor arguments read back from its attributes
ARCHITECTURE_ARGS: dict[type, tuple[str, ...]] = {
    nn.Conv1d: _CONV, nn.Conv2d: _CONV, nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: _NORM, nn.BatchNorm2d: _NORM,
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine"),
    nn.ReLU: (), nn.GELU: ("approximate",), nn.SiLU: (), nn.Tanh: (), nn.Sigmoid: (),
    nn.Identity: (), nn.Dropout: ("p",), nn.Flatten: ("start_dim", "end_dim"),
    nn.MaxPool1d: (*_POOL, "dilation"), nn.MaxPool2d: (*_POOL, "dilation"),
    nn.AvgPool1d: (*_POOL, "count_include_pad"), nn.AvgPool2d: (*_POOL, "count_include_pad"),
    nn.AdaptiveAvgPool1d: ("output_size",), nn.AdaptiveAvgPool2d: ("output_size",),
}  # fmt: skip
_WITH_BIAS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.LayerNorm)
_BY_NAME = {cls.__name__: cls for cls in ARCHITECTURE_ARGS}


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def architecture(model: nn.Module) -> dict[str, Any] | None:
    """The model as plain data when it is an nn.Sequential (nested allowed) of the types in
    ARCHITECTURE_ARGS without hooks; None otherwise (loading then needs the task)."""
    if model._forward_hooks or model._forward_pre_hooks:
        return None
    if type(model) is nn.Sequential:
        children = [(name, architecture(child)) for name, child in model.named_children()]
        if any(spec is None for _, spec in children):
            return None
        return {"type": "Sequential", "children": [[n, s] for n, s in children]}
    kind = type(model)
    if kind not in ARCHITECTURE_ARGS or any(True for _ in model.children()):
        return None
    args = {a: _json_value(getattr(model, a)) for a in ARCHITECTURE_ARGS[kind]}
    if isinstance(model, _WITH_BIAS):
        args["bias"] = model.bias is not None
    return {"type": kind.__name__, "args": args}


def build_architecture(spec: Mapping[str, Any]) -> nn.Module:
    if spec["type"] == "Sequential":
        return nn.Sequential(OrderedDict((n, build_architecture(s)) for n, s in spec["children"]))
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["args"].items()}
    return _BY_NAME[spec["type"]](**args)
