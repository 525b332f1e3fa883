"""Structured pruning plan as plain data: coupling groups, their index maps (which index
of which state tensor belongs to which channel of which group) and channel order.

The plan is *what* can be cut; how it is found (tracing with Torch-Pruning, one test cut
per group) and how a model is sliced along it live in orchestrator/compress (plan.py,
structured.py), so the cost model prices a policy from this data alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


@dataclass(frozen=True, kw_only=True)
class DimSlice:
    """One dimension of one state tensor that a group shrinks: `index[c]` are the indices
    of that dimension that belong to the group's channel c (same count for every c)."""

    key: str
    dim: int
    index: tuple[tuple[int, ...], ...]

    @property
    def multiplicity(self) -> int:
        return len(self.index[0])


@dataclass(frozen=True, kw_only=True)
class GroupPlan:
    name: str  # the root layer whose output channels define the group
    channels: int
    members: tuple[str, ...]  # modules the group touches (for display)
    order: tuple[int, ...]  # channels by importance, most important first
    slices: tuple[DimSlice, ...]
    unit: str = "channels"  # what one of `channels` is ("heads" for attention heads)
    count_attr: str = ""  # "module.attribute" set to the kept count (e.g. attn.num_heads)

    def kept_channels(self, count: int) -> list[int]:
        return sorted(self.order[:count])


@dataclass(frozen=True, kw_only=True)
class PruningPlan:
    groups: tuple[GroupPlan, ...]
    excluded: Mapping[str, str] = field(default_factory=dict)  # group root -> reason
    importance: str = "l1"

    def group(self, name: str) -> GroupPlan:
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, GroupPlan]:
        return {g.name: g for g in self.groups}

    def to_dict(self) -> dict[str, Any]:
        """Everything but the channel order (which follows the weights, not the structure)."""
        return {
            "importance": self.importance,
            "excluded": dict(self.excluded),
            "groups": [
                {"name": g.name, "channels": g.channels, "members": list(g.members),
                 "unit": g.unit, "count_attr": g.count_attr,
                 "slices": [{"key": s.key, "dim": s.dim, "index": [list(i) for i in s.index]}
                            for s in g.slices]}
                for g in self.groups
            ],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        groups = tuple(
            GroupPlan(name=g["name"], channels=g["channels"], members=tuple(g["members"]),
                      order=tuple(range(g["channels"])), unit=g["unit"],
                      count_attr=g["count_attr"],
                      slices=tuple(DimSlice(key=s["key"], dim=s["dim"],
                                            index=tuple(map(tuple, s["index"])))
                                   for s in g["slices"]))
            for g in data["groups"]
        )  # fmt: skip
        return cls(groups=groups, excluded=dict(data["excluded"]), importance=data["importance"])

    @cached_property
    def cuts(self) -> dict[str, list[tuple[str, int, int, int]]]:
        """tensor key -> [(group, group channels, dim, multiplicity)]: the cost model's index."""
        by_key: dict[str, list[tuple[str, int, int, int]]] = {}
        for g in self.groups:
            for s in g.slices:
                by_key.setdefault(s.key, []).append((g.name, g.channels, s.dim, s.multiplicity))
        return by_key


def sliced_shape(shape: tuple[int, ...], key: str, plan: PruningPlan,
                 counts: Mapping[str, int]) -> tuple[int, ...]:  # fmt: skip
    """The shape of state tensor `key` after the policy, from the plan alone (cost model)."""
    new = list(shape)
    for group, channels, dim, multiplicity in plan.cuts.get(key, ()):
        new[dim] -= (channels - counts.get(group, channels)) * multiplicity
    return tuple(new)
