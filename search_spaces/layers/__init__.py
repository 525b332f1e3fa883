"""Layer types (issue 13): one handler per type, in one registry. See base.py."""

from search_spaces.layers import conv, linear, norm, plain, rnn  # noqa: F401  (they register)
from search_spaces.layers.base import LAYERS, LayerType, layer_type, register, unregister

__all__ = ["LAYERS", "LayerType", "layer_type", "register", "unregister"]
