"""Types without tensors of their own that an export can still rebuild from data."""

from __future__ import annotations

from torch import nn

from search_spaces.layers.base import LayerType, register

_POOL = ("kernel_size", "stride", "padding", "ceil_mode")


def _plain(*types: type[nn.Module], args: tuple[str, ...] = ()) -> LayerType:
    layer = type(f"Plain{types[0].__name__}", (LayerType,), {"types": types, "args": args})()
    return register(layer)


for _type in (nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity):
    _plain(_type)
_plain(nn.GELU, args=("approximate",))
_plain(nn.Dropout, args=("p",))
_plain(nn.Flatten, args=("start_dim", "end_dim"))
_plain(nn.MaxPool1d, nn.MaxPool2d, args=(*_POOL, "dilation"))
_plain(nn.AvgPool1d, nn.AvgPool2d, args=(*_POOL, "count_include_pad"))
_plain(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, args=("output_size",))
