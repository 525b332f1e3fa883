"""Conv1d/2d/3d: one weight; depthwise convs follow their producer's channels."""

from __future__ import annotations

from typing import Any

from torch import nn

from search_spaces.layers.base import LayerType, register, rows, set_attrs, uses_per_output_channel


class Conv(LayerType):
    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    compressible = True
    family = "cnn"
    args = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "groups", "padding_mode")  # fmt: skip
    bias_arg = True
    cut_out = staticmethod(rows("weight", "bias"))

    def uses(self, module: nn.Module, output: Any) -> int:
        return uses_per_output_channel(output, module.out_channels)

    def cut_in(self, module: nn.Module):
        # depthwise: its output group cuts it; grouped: dim 1 holds one group's inputs, so
        # a cut takes the same position in every group (channel_groups)
        return [] if _depthwise(module) else [("weight", 1, 1)]

    def channel_groups(self, module: nn.Module, role: str = "out") -> int:
        return 1 if _depthwise(module) else module.groups

    def unsupported(self, module: nn.Module) -> str | None:
        if module.groups > 1 and module.groups == module.in_channels != module.out_channels:
            return "a depthwise conv with a channel multiplier is not sliced"
        return None

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        out, per_group = module.weight.shape[:2]
        if old["groups"] > 1 and old["groups"] == old["in_channels"] == old["out_channels"]:
            set_attrs(module, groups=out, in_channels=out, out_channels=out)  # depthwise stays so
            return
        set_attrs(module, out_channels=out, in_channels=per_group * module.groups)


def _depthwise(module: nn.Module) -> bool:
    return module.groups > 1 and module.groups == module.in_channels


CONV = register(Conv())
