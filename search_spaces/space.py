"""SearchSpace: the knobs of one model, derived from its profile and the config's rules."""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Any

import yaml

from search_spaces.config import FLOAT_BITS, Rule, SpaceConfig, keep_choices
from search_spaces.profile import LayerInfo, ModelProfile
from search_spaces.structure import PruningPlan, sliced_shape


class SpaceError(ValueError):
    """A space rule or policy that does not fit the model: the message says what to fix."""


Value = int | float


@dataclass(frozen=True, kw_only=True)
class Knob:
    """One searchable decision: `bits` of some layers' weights, or their `keep` ratio."""

    name: str  # "bits:<layer or tie>" / "keep:<layer or tie>"; also the Optuna param name
    kind: str  # "bits" | "keep"
    layers: tuple[str, ...]
    choices: tuple[Value, ...]
    units: int  # keep knobs: elements of the largest member; canonical ratios are counts / units

    @property
    def searchable(self) -> bool:
        return len(self.choices) > 1


@dataclass(frozen=True, kw_only=True)
class LayerSetting:
    bits: int
    keep_count: int  # weight elements kept (magnitude masks)


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    profile: ModelProfile
    knobs: tuple[Knob, ...]
    pruning: str  # "structured", "unstructured" or "none"
    skipped: Mapping[str, str] = field(default_factory=dict)  # layer -> reason
    plan: PruningPlan | None = None  # structured mode: the coupling groups
    unpruned: Mapping[str, str] = field(default_factory=dict)  # group root -> why left out

    @cached_property
    def by_name(self) -> dict[str, Knob]:
        return {k.name: k for k in self.knobs}

    @property
    def searchable(self) -> tuple[Knob, ...]:
        return tuple(k for k in self.knobs if k.searchable)

    @cached_property
    def fixed_values(self) -> dict[str, Value]:
        """Knobs with one choice: not searched, always at that choice."""
        return {k.name: k.choices[0] for k in self.knobs if not k.searchable}

    def canonical_value(self, knob: Knob, value: Any) -> Value:
        """Bits as int; keep rounded to a whole element count of the largest member."""
        if knob.kind == "bits":
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value != int(value)
            ):
                raise SpaceError(f"{knob.name}: bits must be an integer, got {value!r}")
            value = int(value)
            if value != FLOAT_BITS and not 2 <= value <= 16:
                raise SpaceError(f"{knob.name}: {value} bits is not supported (2..16 or 32)")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise SpaceError(f"{knob.name}: keep must be a ratio in (0, 1], got {value!r}")
        return _round_count(value, knob.units) / knob.units

    def canonicalize(self, values: Mapping[str, Any]) -> dict[str, Value]:
        unknown = sorted(set(values) - set(self.by_name))
        if unknown:
            raise SpaceError(f"policy names unknown knob '{unknown[0]}'; knobs are "
                             f"{', '.join(self.by_name)}")  # fmt: skip
        missing = [k.name for k in self.knobs if k.name not in values]
        if missing:
            raise SpaceError(f"policy has no value for knob '{missing[0]}'")
        return {k.name: self.canonical_value(k, values[k.name]) for k in self.knobs}

    def channel_counts(self, values: Mapping[str, Value]) -> dict[str, int]:
        """Structured mode: channels each group keeps (keep knobs name their groups)."""
        if self.plan is None:
            return {}
        return {
            group: _round_count(values[k.name], self.plan.group(group).channels)
            for k in self.knobs if k.kind == "keep" for group in k.layers
        }  # fmt: skip

    def layer_settings(self, values: Mapping[str, Value]) -> dict[str, LayerSetting]:
        """What a canonical policy does to every compressible layer (skipped ones: float, full).
        `keep_count` is the layer's weight elements left: after slicing (structured) or
        after masking (unstructured)."""
        bits = self.layer_bits(values)
        kept = self._kept_elements(values)
        return {
            layer.name: LayerSetting(bits=int(bits[layer.name]), keep_count=kept[layer.name])
            for layer in self.profile.layers
        }

    def layer_bits(self, values: Mapping[str, Value]) -> dict[str, int]:
        bits = {layer.name: FLOAT_BITS for layer in self.profile.layers}
        for knob in self.knobs:
            if knob.kind == "bits":
                for name in knob.layers:
                    bits[name] = int(values[knob.name])
        return bits

    def _kept_elements(self, values: Mapping[str, Value]) -> dict[str, int]:
        if self.plan is not None:
            counts = self.channel_counts(values)
            return {
                layer.name: sum(math.prod(sliced_shape(w.shape, w.key, self.plan, counts))
                                for w in layer.weights)
                for layer in self.profile.layers
            }  # fmt: skip
        keep = {layer.name: 1.0 for layer in self.profile.layers}
        for knob in self.knobs:
            if knob.kind == "keep":
                for name in knob.layers:
                    keep[name] = values[knob.name]
        return {
            layer.name: self.keep_count(layer, keep[layer.name]) for layer in self.profile.layers
        }

    def keep_count(self, layer: LayerInfo, ratio: float) -> int:
        return _round_count(ratio, layer.numel)

    def extreme_values(self, which: str) -> dict[str, Value]:
        """Every knob at its smallest ('min') or largest ('max') choice."""
        pick = min if which == "min" else max
        return {k.name: self.canonical_value(k, pick(k.choices)) for k in self.knobs}

    def to_dict(self) -> dict[str, Any]:
        return {
            "pruning": self.pruning,
            "knobs": [
                {"name": k.name, "kind": k.kind, "layers": list(k.layers),
                 "choices": list(k.choices), "units": k.units}
                for k in self.knobs
            ],
            "skipped": dict(self.skipped),
            "unpruned": dict(self.unpruned),
            "groups": [
                {"name": g.name, "channels": g.channels, "unit": g.unit,
                 "members": list(g.members), "order": list(g.order)}
                for g in (self.plan.groups if self.plan else ())
            ],
            "profile": self.profile.to_dict(),
        }  # fmt: skip


def _round_count(ratio: float, units: int) -> int:
    # floor(x + 0.5), not round(): Python's round-half-to-even would make 2.5 -> 2.
    return max(1, min(units, math.floor(ratio * units + 0.5)))


def load_preset(name: str) -> tuple[Rule, ...]:
    path = resources.files("search_spaces") / "presets" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.name[:-5] for p in (resources.files("search_spaces") / "presets")
                           .iterdir() if p.name.endswith(".yaml"))  # fmt: skip
        raise SpaceError(f"unknown preset '{name}' (key 'space.preset'); use auto, none or one "
                         f"of {', '.join(available)}")  # fmt: skip
    data = yaml.safe_load(path.read_text()) or {}
    return tuple(Rule.model_validate(r) for r in data.get("rules", ()))


_RNN_KINDS = ("LSTM", "GRU")


def _selector_matches(pattern: str, layers: tuple[LayerInfo, ...]) -> list[str]:
    """Layer names a pattern selects: `$first`, `$last`, `$rnn`, an exact name or a glob."""
    selectors = {
        "$first": [layers[0].name] if layers else [],
        "$last": [layers[-1].name] if layers else [],
        "$rnn": [layer.name for layer in layers if layer.kind in _RNN_KINDS],
    }
    if pattern in selectors:
        return selectors[pattern]
    return [layer.name for layer in layers if fnmatch.fnmatchcase(layer.name, pattern)]


@dataclass
class _Resolved:
    bits: tuple[int, ...]
    keep: tuple[float, ...]
    skip: bool = False
    tie: str | None = None


def _apply_rules(
    profile: ModelProfile, config: SpaceConfig, rules: Iterable[tuple[str, Rule]]
) -> dict[str, _Resolved]:
    keep = keep_choices(config.keep)
    resolved = {layer.name: _Resolved(bits=config.bits, keep=keep) for layer in profile.layers}
    for where, rule in rules:
        by_pattern = {p: _selector_matches(p, profile.layers) for p in rule.patterns}
        matched = [n for names in by_pattern.values() for n in names]
        if not matched:
            names = ", ".join(layer.name for layer in profile.layers)
            raise SpaceError(f"{where}.layers {list(rule.patterns)} matches no layer; the model's "
                             f"compressible layers are: {names}")  # fmt: skip
        missing = [p for p, names in by_pattern.items() if not names]
        if missing and where.startswith("space.rules"):  # a typo beside a good name
            close = difflib.get_close_matches(missing[0], [x.name for x in profile.layers], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SpaceError(f"{where}.layers: '{missing[0]}' matches no layer{hint}; every name "
                             "or glob of a rule must match (presets may not)")  # fmt: skip
        for name in matched:
            r = resolved[name]
            r.bits = rule.bits if rule.bits is not None else r.bits
            r.keep = keep_choices(rule.keep) if rule.keep is not None else r.keep
            r.skip = r.skip or rule.skip
            r.tie = rule.tie if rule.tie is not None else r.tie
    return resolved


def derive_space(
    profile: ModelProfile,
    config: SpaceConfig | None = None,
    *,
    pruning: str = "unstructured",
    plan: PruningPlan | None = None,
) -> SearchSpace:
    """The knobs of a model: defaults, then the preset's rules, then the user's, in order.

    Structured mode (`plan` given) has one keep knob per coupling group, taking the keep
    choices (and tie) of the group's root layer; unstructured mode one per layer."""
    config = config or SpaceConfig()
    preset = profile.family if config.preset == "auto" else config.preset
    preset_rules = () if preset == "none" else load_preset(preset)
    rules = [(f"preset {preset} rule {i}", r) for i, r in enumerate(preset_rules)]
    rules += [(f"space.rules[{i}]", r) for i, r in enumerate(config.rules)]
    resolved = _apply_rules(profile, config, rules)

    skipped = {name: "skipped by a space rule" for name, r in resolved.items() if r.skip}
    active = [name for name, r in resolved.items() if not r.skip]
    knobs = _knobs("bits", active, resolved, lambda name: profile.layer(name).numel)
    unpruned: dict[str, str] = {}
    if pruning == "unstructured":
        knobs += _knobs("keep", active, resolved, lambda name: profile.layer(name).numel)
    elif pruning == "structured":
        if plan is None:
            raise SpaceError("structured pruning needs a pruning plan of the model")
        unpruned = dict(plan.excluded)
        groups = []
        for group in plan.groups:
            touched = [m for m in group.members if m in skipped]
            if touched:
                unpruned[group.name] = f"touches skipped layer {touched[0]}"
            else:
                groups.append(group)
        plan = PruningPlan(groups=tuple(groups), excluded=unpruned, importance=plan.importance)
        # one keep knob per coupling group (never per layer); `layers` names the groups
        roots = [g.name for g in plan.groups]
        knobs += _knobs("keep", roots, resolved, lambda name: plan.group(name).channels)
    position = {layer.name: i for i, layer in enumerate(profile.layers)}
    knobs.sort(key=lambda k: (position[k.layers[0]], k.kind))  # each layer's bits, then keep
    space = SearchSpace(profile=profile, knobs=tuple(knobs), pruning=pruning, skipped=skipped,
                        plan=plan if pruning == "structured" else None, unpruned=unpruned)  # fmt: skip
    if not space.searchable:
        raise SpaceError("the search space is empty: every layer is skipped or has one choice; "
                         "remove a skip rule or give more bits/keep choices under 'space'")  # fmt: skip
    return space


def _tied(names: list[str], resolved: dict[str, _Resolved]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(resolved[name].tie or name, []).append(name)
    return groups


def _check_tie(key: str, members: list[str], resolved: dict[str, _Resolved], what: str) -> None:
    first = resolved[members[0]]
    for other in members[1:]:
        if getattr(resolved[other], what) != getattr(first, what):
            raise SpaceError(f"tie '{key}': layers {members[0]} and {other} have different "
                             f"{what} choices; give the tied layers one rule")  # fmt: skip


def _knobs(kind: str, names: list[str], resolved: dict[str, _Resolved],
           units_of: Callable[[str], int]) -> list[Knob]:  # fmt: skip
    """One knob of `kind` per name, or per tie of names; `units` for canonical rounding."""
    knobs = []
    for key, members in _tied(names, resolved).items():
        _check_tie(key, members, resolved, kind)
        knobs.append(Knob(name=f"{kind}:{key}", kind=kind, layers=tuple(members),
                          choices=getattr(resolved[members[0]], kind),
                          units=max(units_of(m) for m in members)))  # fmt: skip
    return knobs
