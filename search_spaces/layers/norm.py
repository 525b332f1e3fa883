"""Norms and per-channel activations: not compressed; cut with the channels they hold."""

from __future__ import annotations

from typing import Any

from torch import nn

from search_spaces.layers.base import LayerType, register, rows, set_attrs


class BatchNorm(LayerType):
    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    args = ("num_features", "eps", "momentum", "affine", "track_running_stats")
    cut_out = staticmethod(rows("weight", "bias", "running_mean", "running_var"))

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        ref = module.weight if module.weight is not None else module.running_mean
        set_attrs(module, num_features=ref.shape[0])


class LayerNorm(LayerType):
    types = (nn.LayerNorm,)
    args = ("normalized_shape", "eps", "elementwise_affine")
    bias_arg = True
    cut_out = staticmethod(rows("weight", "bias"))

    def unsupported(self, module: nn.Module) -> str | None:
        return None if module.weight is not None else "a LayerNorm without weights is not sliced"

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        set_attrs(module, normalized_shape=tuple(module.weight.shape))


class GroupNorm(LayerType):
    types = (nn.GroupNorm,)
    args = ("num_groups", "num_channels", "eps", "affine")
    cut_out = staticmethod(rows("weight", "bias"))
    cut_in = staticmethod(rows("weight", "bias"))

    def channel_groups(self, module: nn.Module, role: str = "out") -> int:
        return module.num_groups  # every group keeps the same count: the groups stay aligned

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        if module.weight is not None:
            set_attrs(module, num_channels=module.weight.shape[0])


class PReLU(LayerType):
    """One slope per channel (or one shared slope, which no cut touches)."""

    types = (nn.PReLU,)
    args = ("num_parameters",)

    def cut_out(self, module: nn.Module):
        return [("weight", 0, 1)] if module.num_parameters > 1 else []

    cut_in = cut_out

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        set_attrs(module, num_parameters=module.weight.shape[0])


BATCH_NORM = register(BatchNorm())
LAYER_NORM = register(LayerNorm())
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    RMS_NORM = register(type("RMSNorm", (LayerNorm,), {"types": (nn.RMSNorm,),
                                                       "args": ("normalized_shape", "eps",
                                                                "elementwise_affine"),
                                                       "bias_arg": False})())  # fmt: skip
GROUP_NORM = register(GroupNorm())
PRELU = register(PReLU())
