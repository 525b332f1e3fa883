"""SearchSpace: the knobs of one model, derived from its profile and the config's rules."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Any

import yaml

from search_spaces.config import FLOAT_BITS, Rule, SpaceConfig, keep_choices
from search_spaces.profile import LayerInfo, ModelProfile


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
    pruning: str
    skipped: Mapping[str, str] = field(default_factory=dict)  # layer -> reason

    @cached_property
    def by_name(self) -> dict[str, Knob]:
        return {k.name: k for k in self.knobs}

    @property
    def searchable(self) -> tuple[Knob, ...]:
        return tuple(k for k in self.knobs if k.searchable)

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

    def layer_settings(self, values: Mapping[str, Value]) -> dict[str, LayerSetting]:
        """What a canonical policy does to every compressible layer (skipped ones: float, full)."""
        bits = {layer.name: FLOAT_BITS for layer in self.profile.layers}
        keep = {layer.name: 1.0 for layer in self.profile.layers}
        for knob in self.knobs:
            target = bits if knob.kind == "bits" else keep
            for name in knob.layers:
                target[name] = values[knob.name]
        return {
            layer.name: LayerSetting(
                bits=int(bits[layer.name]), keep_count=self.keep_count(layer, keep[layer.name])
            )
            for layer in self.profile.layers
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
        matched = [n for p in rule.patterns for n in _selector_matches(p, profile.layers)]
        if not matched:
            names = ", ".join(layer.name for layer in profile.layers)
            raise SpaceError(f"{where}.layers {list(rule.patterns)} matches no layer; the model's "
                             f"compressible layers are: {names}")  # fmt: skip
        for name in matched:
            r = resolved[name]
            r.bits = rule.bits if rule.bits is not None else r.bits
            r.keep = keep_choices(rule.keep) if rule.keep is not None else r.keep
            r.skip = r.skip or rule.skip
            r.tie = rule.tie if rule.tie is not None else r.tie
    return resolved


def derive_space(
    profile: ModelProfile, config: SpaceConfig | None = None, *, pruning: str = "unstructured"
) -> SearchSpace:
    """The knobs of a model: defaults, then the preset's rules, then the user's, in order."""
    config = config or SpaceConfig()
    preset = profile.family if config.preset == "auto" else config.preset
    preset_rules = () if preset == "none" else load_preset(preset)
    rules = [(f"preset {preset} rule {i}", r) for i, r in enumerate(preset_rules)]
    rules += [(f"space.rules[{i}]", r) for i, r in enumerate(config.rules)]
    resolved = _apply_rules(profile, config, rules)

    skipped = {name: "skipped by a space rule" for name, r in resolved.items() if r.skip}
    groups: dict[str, list[str]] = {}
    for name, r in resolved.items():
        if not r.skip:
            groups.setdefault(r.tie or name, []).append(name)

    knobs: list[Knob] = []
    for key, members in groups.items():
        first = resolved[members[0]]
        for other in members[1:]:
            if (resolved[other].bits, resolved[other].keep) != (first.bits, first.keep):
                raise SpaceError(f"tie '{key}': layers {members[0]} and {other} have different "
                                 "choices; give the tied layers one rule")  # fmt: skip
        units = max(profile.layer(m).numel for m in members)
        knobs.append(Knob(name=f"bits:{key}", kind="bits", layers=tuple(members),
                          choices=first.bits, units=units))  # fmt: skip
        if pruning != "none":
            knobs.append(Knob(name=f"keep:{key}", kind="keep", layers=tuple(members),
                              choices=first.keep, units=units))  # fmt: skip
    space = SearchSpace(profile=profile, knobs=tuple(knobs), pruning=pruning, skipped=skipped)
    if not space.searchable:
        raise SpaceError("the search space is empty: every layer is skipped or has one choice; "
                         "remove a skip rule or give more bits/keep choices under 'space'")  # fmt: skip
    return space
