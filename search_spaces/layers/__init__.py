"""Layer types (issue 13): one handler per type, in one registry. See base.py."""

from search_spaces.layers import (  # noqa: F401  (they register)
    attention,
    conv,
    embedding,
    huggingface,
    linear,
    norm,
    plain,
    rnn,
)
from search_spaces.layers.base import LAYERS, LayerType, layer_type, register, unregister

__all__ = ["LAYERS", "LayerType", "layer_type", "register", "unregister"]
