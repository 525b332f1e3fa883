"""Linear: one weight, rows are output features."""

from __future__ import annotations

from typing import Any

from torch import nn

from search_spaces.layers.base import LayerType, register, rows, set_attrs, uses_per_output_channel


class Linear(LayerType):
    types = (nn.Linear,)
    compressible = True
    args = ("in_features", "out_features")
    bias_arg = True
    cut_out = staticmethod(rows("weight", "bias"))

    def uses(self, module: nn.Module, output: Any) -> int:
        return uses_per_output_channel(output, module.out_features)

    def cut_in(self, module: nn.Module):
        return [("weight", 1, 1)]

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        out, inp = module.weight.shape
        set_attrs(module, out_features=out, in_features=inp)


LINEAR = register(Linear())
