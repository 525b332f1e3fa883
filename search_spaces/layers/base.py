"""What prunesearch knows of one layer type (one module per family of types: conv.py,
linear.py, rnn.py, norm.py, plain.py).

A layer type says which of its tensors are compressible weights and how often each of
their elements is multiplied per forward pass (profile and cost model), which tensor
dimensions cutting its output or input channels touches (structured pruning plan), how
its shape attributes follow sliced tensors (rebuild), and which constructor arguments
rebuild it from data (export). Quantization, packing and pricing are the same for every
type: per output row (dim 0) of each weight tensor.

Adding a layer type: a module with a `LayerType` subclass, `register()`ed, imported from
search_spaces/layers/__init__.py.
"""

from __future__ import annotations

from typing import Any

from torch import nn

Cut = tuple[str, int, int]  # (tensor name, dim, gates: the channel's indices repeat per gate)


class LayerType:
    types: tuple[type[nn.Module], ...] = ()
    compressible = False  # its weights get knobs
    family: str | None = None  # the model family it marks for presets (`rnn` before `cnn`)
    args: tuple[str, ...] | None = None  # constructor arguments an export rebuilds it from
    bias_arg = False  # the constructor takes `bias=` (read back from `module.bias`)
    # children whose weights its forward uses functionally (no hook of theirs fires):
    # they get its uses per weight element (nn.MultiheadAttention's out_proj)
    drives: tuple[str, ...] = ()
    uncut_why = ""  # why cut_out / cut_in give None, said with a group it would block

    def weights(self, module: nn.Module) -> list[str]:
        """Names of its compressible weight tensors (quantized, pruned, priced)."""
        return ["weight"]

    def uses(self, module: nn.Module, output: Any) -> int:
        """Multiplications per weight element in one forward call that gave `output`."""
        return 0

    def cut_out(self, module: nn.Module) -> list[Cut] | None:
        """Tensors cutting its output channels slices; None: it cannot be sliced."""
        return None

    def cut_in(self, module: nn.Module) -> list[Cut] | None:
        """Tensors cutting its input channels slices; None: it cannot be sliced."""
        return None

    def channel_groups(self, module: nn.Module, role: str = "out") -> int:
        """Into how many equal groups its channels on the `role` side ("out" or "in") fall,
        each of which must keep the same count (a grouped conv's groups, GroupNorm's, a
        bidirectional RNN's two directions): a cut takes one position from each."""
        return 1

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this instance cannot be sliced although its type can."""
        return None

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        """Set its shape attributes from its (sliced) tensors; `old`: the base model's."""


def set_attrs(module: nn.Module, **attrs: object) -> None:
    # plain int attributes: Module.__setattr__'s parameter checks cost more than the rebuild
    module.__dict__.update(attrs)


def rows(*names: str):
    """A cut of dim 0 of each named tensor the module has (weight, bias, statistics)."""
    return lambda m: [(n, 0, 1) for n in names if getattr(m, n, None) is not None]


def uses_per_output_channel(output: Any, channels: int) -> int:
    """Output elements per output channel: how often each weight element is multiplied."""
    return output.numel() // channels


LAYERS: dict[type[nn.Module], LayerType] = {}
# types of optional packages, by "module.QualName", so registering them imports nothing
# (e.g. "transformers.pytorch_utils.Conv1D"); matched on first sight of such a module
LAYERS_BY_NAME: dict[str, LayerType] = {}
_RESOLVED: dict[type, LayerType | None] = {}


def register(layer: LayerType, *names: str) -> LayerType:
    """Register `layer` for its `types` and for classes named "module.QualName"."""
    for t in layer.types:
        LAYERS[t] = layer
    for name in names:
        LAYERS_BY_NAME[name] = layer
    _RESOLVED.clear()
    return layer


def unregister(layer: LayerType) -> None:
    for t in layer.types:
        LAYERS.pop(t, None)
    for name in [n for n, found in LAYERS_BY_NAME.items() if found is layer]:
        del LAYERS_BY_NAME[name]
    _RESOLVED.clear()


def _resolve(cls: type) -> LayerType | None:
    # the nearest registered class in the MRO: a subclass (torchvision's LayerNorm2d,
    # MultiheadAttention's out_proj Linear) slices and rebuilds as its base does; one
    # computing differently is caught by the plan's test rebuilds, which run the model
    for klass in cls.__mro__:
        found = LAYERS.get(klass) or LAYERS_BY_NAME.get(f"{klass.__module__}.{klass.__qualname__}")
        if found is not None:
            return found
    return None


def layer_type(module: nn.Module) -> LayerType | None:
    """The registered type of `module` or of its nearest registered base class."""
    cls = type(module)
    if cls not in _RESOLVED:
        _RESOLVED[cls] = _resolve(cls)
    return _RESOLVED[cls]
