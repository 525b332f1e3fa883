"""BatchNorm and LayerNorm: not compressed; cut with the channels they normalize."""

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

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        set_attrs(module, normalized_shape=(module.weight.shape[0],))


BATCH_NORM = register(BatchNorm())
LAYER_NORM = register(LayerNorm())
