"""What every knob kind provides (one module per kind: bits.py, keep.py).

A kind is one sort of decision about some layers: how many bits their weights keep, what
share of their channels (or weights) stays. Its module owns everything that depends on
that sort: the choices and their canonical form, the reference value (nothing changed),
which layers or groups get a knob of it, what a value does to each layer's setting (what
the cost model prices and the rebuild applies), its prior loss and the values the
sensitivity sweep probes. The rest of the code iterates over `KINDS`.

Adding a kind: write a module with a subclass of `KnobKind`, `register()` an instance
when it is imported, and import it where the run starts (a task module is imported by the
driver and by every worker). A kind that the stock cost model and rebuild do not know
prices nothing and changes the model through `apply`; `Bits` and `Keep` show the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search_spaces.errors import SpaceError

if TYPE_CHECKING:
    from torch import nn

    from search_spaces.onnx_layout import OnnxLayout
    from search_spaces.profile import ModelProfile
    from search_spaces.space import Knob, SearchSpace
    from search_spaces.structure import PruningPlan

Value = int | float


@dataclass(frozen=True, kw_only=True)
class Targets:
    """What a kind may attach knobs to: the model's layers that no rule skips, and the
    coupling groups of structured pruning."""

    profile: ModelProfile
    active: Sequence[str]
    pruning: str  # "structured", "unstructured" or "none"
    plan: PruningPlan | None
    artifact: OnnxLayout | None = None  # the target's file, where it is not the torch model


class KnobKind:
    name: str = ""
    reference: Value = 0  # the value that changes nothing
    default_choices: tuple[Value, ...] = ()  # where the config has no key for the kind
    ordered_grid: bool = False  # an even grid the sampler may see as ordered steps
    # a knob whose only choice is the reference is left out (a kind the config turns on)
    optional: bool = False

    def targets(self, where: Targets) -> list[tuple[str, int]]:
        """(layer or group, units for canonical rounding) that get a knob of this kind."""
        return [(name, where.profile.layer(name).numel) for name in where.active]

    def canonical(self, knob: Knob, value: Any) -> Value:
        """The value as the knob stores and hashes it; SpaceError if it is not one."""
        if value not in knob.choices:
            raise SpaceError(f"{knob.name}: {value!r} is not one of {list(knob.choices)}")
        return value

    def settle(self, space: SearchSpace, values: Mapping[str, Value]) -> dict[str, dict[str, Any]]:
        """Per layer, the LayerSetting fields this kind's values set (what is priced and
        rebuilt); nothing for a kind the stock cost model does not price."""
        return {}

    def apply(self, model: nn.Module, space: SearchSpace, knob: Knob, value: Value) -> nn.Module:
        """The model to score for `value`, from the rebuilt one: for kinds the stock rebuild
        does not apply (bits and keep are settled into each layer's setting instead). It
        may wrap the model or swap modules, never write its tensors in place: the rebuild
        reuses them for the next candidate."""
        return model

    def prior_loss(self, value: Value) -> float:
        """Metric lost by `value` before anything is measured (0 at the reference)."""
        return 0.0

    def probe_values(self, knob: Knob) -> list[Value]:
        """Values the sensitivity sweep scores, every other knob at its reference."""
        return list(knob.choices)

    def compresses(self, value: Value) -> bool:
        return value != self.reference


KINDS: dict[str, KnobKind] = {}  # in registration order: each layer's knobs in this order


def per_layer(kind: KnobKind, space: SearchSpace,
              values: Mapping[str, Value]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """`settle` for a kind whose integer value is one LayerSetting field of its name, the
    same for every layer its knob covers (bits, act_bits)."""
    return {name: {kind.name: int(values[k.name])}
            for k in space.knobs if k.kind == kind.name for name in k.layers}  # fmt: skip


def quantization_noise(bits: Value, float_bits: int = 32) -> float:
    """Prior loss of a b-bit grid: its step halves with every bit, so its noise power falls
    4x (HAWQ's perturbation view, Dong et al. 2019); none in float."""
    return 0.0 if bits >= float_bits else 4.0 ** (1 - bits)


def register(kind: KnobKind) -> KnobKind:
    """Make `kind` known by its name (again: replaced, so a re-imported module is fine)."""
    if not kind.name or ":" in kind.name:
        raise ValueError(f"a knob kind needs a name without ':' (got {kind.name!r})")
    KINDS[kind.name] = kind
    return kind


def kind_of(knob: Knob) -> KnobKind:
    try:
        return KINDS[knob.kind]
    except KeyError:
        raise SpaceError(f"{knob.name}: unknown knob kind '{knob.kind}'; import the module "
                         "that registers it before the run starts") from None  # fmt: skip


def reference_values(knobs: Sequence[Knob]) -> dict[str, Value]:
    """Every knob at its kind's reference: nothing compressed."""
    return {k.name: kind_of(k).reference for k in knobs}
