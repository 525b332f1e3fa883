"""Plain nn.Sequential models as data: an export rebuilds them without the task's code."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import nn

from search_spaces.layers import LAYERS

# module type -> constructor arguments read back from its attributes (its layer type's)
_BY_NAME = {t.__name__: t for t, layer in LAYERS.items() if layer.args is not None}


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def architecture(model: nn.Module) -> dict[str, Any] | None:
    """The model as plain data when it is an nn.Sequential (nested allowed) of the types in
    the layer types an export can rebuild (search_spaces/layers) without hooks; None otherwise (loading then needs the task)."""
    if model._forward_hooks or model._forward_pre_hooks:
        return None
    if type(model) is nn.Sequential:
        children = [(name, architecture(child)) for name, child in model.named_children()]
        if any(spec is None for _, spec in children):
            return None
        return {"type": "Sequential", "children": [[n, s] for n, s in children]}
    layer = LAYERS.get(type(model))  # exactly: a subclass is rebuilt by its own code only
    if layer is None or layer.args is None or any(True for _ in model.children()):
        return None
    args = {a: _json_value(getattr(model, a)) for a in layer.args}
    if layer.bias_arg:
        args["bias"] = model.bias is not None
    return {"type": type(model).__name__, "args": args}


def build_architecture(spec: Mapping[str, Any]) -> nn.Module:
    if spec["type"] == "Sequential":
        return nn.Sequential(OrderedDict((n, build_architecture(s)) for n, s in spec["children"]))
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["args"].items()}
    return _BY_NAME[spec["type"]](**args)
