"""The `keep` kind: what share of a layer's weights (unstructured: magnitude masks) or of
a coupling group's channels (structured: a smaller model) stays.

Unstructured: one knob per layer (or tie), rounded to whole weight elements. Structured:
one knob per coupling group (never per layer: the group's members are cut together),
rounded to whole channels (or attention heads). `pruning: none` has no keep knobs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from search_spaces.config import KeepRange
from search_spaces.errors import SpaceError
from search_spaces.kinds.base import KnobKind, Targets, Value, register
from search_spaces.structure import sliced_shape

if TYPE_CHECKING:
    from search_spaces.space import Knob, SearchSpace

KEEP_GRID = 6  # keep values the sensitivity sweep probes per knob (its choices, evenly thinned)
KEEP_PRIOR = 1.0  # prior metric loss per unit of channels pruned (vs 0.25 at 2 bits)


class Keep(KnobKind):
    name = "keep"
    reference = 1.0
    default_choices = KeepRange().choices()
    ordered_grid = True

    def targets(self, where: Targets) -> list[tuple[str, int]]:
        if where.pruning == "structured":
            return [(g.name, g.channels) for g in where.plan.groups] if where.plan else []
        return super().targets(where) if where.pruning == "unstructured" else []

    def canonical(self, knob: Knob, value: Any) -> Value:
        """A ratio in (0, 1], rounded to a whole count of the knob's units."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise SpaceError(f"{knob.name}: keep must be a ratio in (0, 1], got {value!r}")
        return round_count(value, knob.units) / knob.units

    def settle(self, space: SearchSpace, values: Mapping[str, Value]) -> dict[str, dict[str, Any]]:
        """Weight elements each layer keeps: after slicing (structured) or masking."""
        if space.plan is not None:
            counts = channel_counts(space, values)
            return {
                layer.name: {"keep_count": sum(
                    math.prod(sliced_shape(w.shape, w.key, space.plan, counts))
                    for w in layer.weights)}
                for layer in space.profile.layers
            }  # fmt: skip
        return {name: {"keep_count": round_count(values[k.name], space.profile.layer(name).numel)}
                for k in space.knobs if k.kind == self.name for name in k.layers}  # fmt: skip

    def prior_loss(self, value: Value) -> float:
        # pruning a pretrained model's channels costs far more metric per byte than a bit
        return KEEP_PRIOR * (1.0 - value)

    def probe_values(self, knob: Knob) -> list[Value]:
        if len(knob.choices) <= KEEP_GRID:
            return list(knob.choices)
        step = (len(knob.choices) - 1) / (KEEP_GRID - 1)
        return sorted({knob.choices[round(i * step)] for i in range(KEEP_GRID)})


KEEP = register(Keep())


def round_count(ratio: float, units: int) -> int:
    """Whole units of a ratio, at least one: floor(x + 0.5), not round(), whose
    round-half-to-even would make 2.5 -> 2."""
    return max(1, min(units, math.floor(ratio * units + 0.5)))


def layer_keeps(space: SearchSpace, values: Mapping[str, Value]) -> dict[str, tuple[float, str]]:
    """Per compressible layer, the share kept and, structured, "kept/channels" of its output
    channels: a group shows on its root layer (whose outputs they are) or, rooted
    elsewhere (attention heads), on its member layers. Unstructured: the share of weights."""
    names = [layer.name for layer in space.profile.layers]
    keeps = dict.fromkeys(names, (1.0, ""))
    if space.plan is not None:
        for group, count in channel_counts(space, values).items():
            plan = space.plan.group(group)
            members = [group] if group in keeps else [m for m in plan.members if m in keeps]
            keeps.update(
                dict.fromkeys(members, (count / plan.channels, f"{count}/{plan.channels}"))
            )
        return keeps
    for k in space.knobs:
        if k.kind == KEEP.name:
            keeps.update(dict.fromkeys(k.layers, (float(values[k.name]), "")))
    return keeps


def channel_counts(space: SearchSpace, values: Mapping[str, Value]) -> dict[str, int]:
    """Structured mode: channels each group keeps (keep knobs name their groups)."""
    if space.plan is None:
        return {}
    return {group: round_count(values[k.name], space.plan.group(group).channels)
            for k in space.knobs if k.kind == KEEP.name for group in k.layers}  # fmt: skip
