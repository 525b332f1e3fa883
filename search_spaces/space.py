"""SearchSpace: the knobs of one model, derived from its profile and the config's rules."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Any

import yaml

from search_spaces.config import FLOAT_BITS, Rule, SpaceConfig, keep_choices
from search_spaces.errors import SpaceError
from search_spaces.kinds import KINDS, Targets, channel_counts, kind_of, layer_bits
from search_spaces.onnx_layout import OnnxLayout
from search_spaces.profile import LayerInfo, ModelProfile
from search_spaces.structure import GroupPlan, PruningPlan

Value = int | float


@dataclass(frozen=True, kw_only=True)
class Knob:
    """One searchable decision of one kind (search_spaces.kinds) about some layers."""

    name: str  # "<kind>:<layer, group or tie>"; also the Optuna param name
    kind: str  # a registered kind's name (KINDS)
    layers: tuple[str, ...]
    choices: tuple[Value, ...]
    units: int  # keep knobs: elements of the largest member; canonical ratios are counts / units

    @property
    def searchable(self) -> bool:
        return len(self.choices) > 1


@dataclass(frozen=True, kw_only=True)
class LayerSetting:
    """What a policy does to one layer, as the kinds settle it: what is priced and rebuilt."""

    bits: int = FLOAT_BITS
    keep_count: int  # weight elements kept (after slicing or masking)
    act_bits: int = FLOAT_BITS  # its input and output activations (kinds/act_bits.py)


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    profile: ModelProfile
    knobs: tuple[Knob, ...]
    pruning: str  # "structured", "unstructured" or "none"
    skipped: Mapping[str, str] = field(default_factory=dict)  # layer -> reason
    plan: PruningPlan | None = None  # structured mode: the coupling groups
    unpruned: Mapping[str, str] = field(default_factory=dict)  # group root -> why left out
    # the target's artifact when it is not prunesearch's own file (onnxruntime: ONNX): what
    # the cost model prices `size_bytes` by
    artifact: OnnxLayout | None = None

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
        """The value as its kind stores it (bits as int; keep as whole units)."""
        return kind_of(knob).canonical(knob, value)

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
        """Structured mode: channels each group keeps."""
        return channel_counts(self, values)

    def layer_settings(self, values: Mapping[str, Value]) -> dict[str, LayerSetting]:
        """What a canonical policy does to every compressible layer (skipped ones: float,
        full): every kind's settled fields over the defaults."""
        fields: dict[str, dict[str, Any]] = {
            layer.name: {"keep_count": layer.numel} for layer in self.profile.layers
        }
        for kind in KINDS.values():
            for name, settled in kind.settle(self, values).items():
                fields[name].update(settled)
        return {name: LayerSetting(**f) for name, f in fields.items()}

    def layer_bits(self, values: Mapping[str, Value]) -> dict[str, int]:
        return layer_bits(self, values)

    def extreme_values(self, which: str) -> dict[str, Value]:
        """Every knob at its smallest ('min') or largest ('max') choice."""
        pick = min if which == "min" else max
        return {k.name: self.canonical_value(k, pick(k.choices)) for k in self.knobs}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """The space as run.json records it (`to_dict`), for reading a study: the plan's
        groups come back without their index maps (counts, not slices: a report prices
        nothing)."""
        groups = tuple(GroupPlan(name=g["name"], channels=g["channels"], members=tuple(g["members"]),
                                 order=tuple(g["order"]), slices=(), unit=g.get("unit", "channels"))
                       for g in data.get("groups", ()))  # fmt: skip
        knobs = tuple(Knob(name=k["name"], kind=k["kind"], layers=tuple(k["layers"]),
                           choices=tuple(k["choices"]), units=k.get("units", 1))
                      for k in data["knobs"])  # fmt: skip
        plan = PruningPlan(groups=groups) if data.get("pruning") == "structured" else None
        return cls(profile=ModelProfile.from_dict(data["profile"]), knobs=knobs, plan=plan,
                   pruning=data.get("pruning", "unstructured"), skipped=data.get("skipped", {}),
                   unpruned=data.get("unpruned", {}))  # fmt: skip

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
            # the target's file that `size_bytes` prices, where it is not prunesearch's own
            **({"artifact": "onnx"} if self.artifact is not None else {}),
            "groups": [
                {"name": g.name, "channels": g.channels, "unit": g.unit,
                 "members": list(g.members), "order": list(g.order)}
                for g in (self.plan.groups if self.plan else ())
            ],
            "profile": self.profile.to_dict(),
        }  # fmt: skip


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
    choices: dict[str, tuple[Value, ...]]  # kind -> choices
    skip: bool = False
    tie: str | None = None


def _config_choices(source: SpaceConfig | Rule) -> dict[str, tuple[Value, ...]]:
    """The choices a config or rule gives per kind (None: not given). The `space:` keys
    name the built-in kinds; a registered kind without a key takes its defaults."""
    given = {"bits": source.bits, "act_bits": source.act_bits,
             "keep": None if source.keep is None else keep_choices(source.keep)}  # fmt: skip
    return {name: given.get(name, kind.default_choices if isinstance(source, SpaceConfig)
                            else None) for name, kind in KINDS.items()}  # fmt: skip


def _apply_rules(
    profile: ModelProfile, config: SpaceConfig, rules: Iterable[tuple[str, Rule]]
) -> dict[str, _Resolved]:
    defaults = _config_choices(config)
    resolved = {layer.name: _Resolved(choices=dict(defaults)) for layer in profile.layers}
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
            r.choices.update({k: c for k, c in _config_choices(rule).items() if c is not None})
            r.skip = r.skip or rule.skip
            r.tie = rule.tie if rule.tie is not None else r.tie
    return resolved


def derive_space(
    profile: ModelProfile,
    config: SpaceConfig | None = None,
    *,
    pruning: str = "unstructured",
    plan: PruningPlan | None = None,
    fallback: Mapping[str, str] | None = None,
    stored: StoredBits | None = None,
    artifact: OnnxLayout | None = None,
) -> SearchSpace:
    """The knobs of a model: defaults, then the preset's rules, then the user's, in order.

    Structured mode (`plan` given) has one keep knob per coupling group, taking the keep
    choices (and tie) of the group's root layer; unstructured mode one per layer.
    `fallback`: why structured pruning was not possible (`pruning: auto`), by group root
    (or "model"): kept in `unpruned`, so `space` and run.json say it."""
    config = config or SpaceConfig()
    preset = profile.family if config.preset == "auto" else config.preset
    preset_rules = () if preset == "none" else load_preset(preset)
    rules = [(f"preset {preset} rule {i}", r) for i, r in enumerate(preset_rules)]
    rules += [(f"space.rules[{i}]", r) for i, r in enumerate(config.rules)]
    resolved = _apply_rules(profile, config, rules)
    if stored is not None:
        _only_stored(profile, config, resolved, stored)

    ruled = {name: "skipped by a space rule" for name, r in resolved.items() if r.skip}
    active = [name for name, r in resolved.items() if not r.skip]
    unpruned: dict[str, str] = dict(fallback or {})
    if pruning == "structured":
        if plan is None:
            raise SpaceError("structured pruning needs a pruning plan of the model")
        plan, unpruned = _without_skipped(plan, ruled)
    where = Targets(profile=profile, active=active, pruning=pruning, plan=plan,
                    artifact=artifact)  # fmt: skip
    knobs = [knob for kind in KINDS.values() for knob in _knobs(kind.name, kind.targets(where),
                                                                 resolved)]  # fmt: skip
    position = {layer.name: i for i, layer in enumerate(profile.layers)}
    order = {name: i for i, name in enumerate(KINDS)}
    knobs.sort(key=lambda k: (position[k.layers[0]], order[k.kind]))  # a layer's knobs by kind
    skipped = {**profile.left_out, **ruled}
    space = SearchSpace(profile=profile, knobs=tuple(knobs), pruning=pruning, skipped=skipped,
                        plan=plan if pruning == "structured" else None, unpruned=unpruned,
                        artifact=artifact)  # fmt: skip
    if not space.searchable:
        raise SpaceError("the search space is empty: every layer is skipped or has one choice; "
                         "remove a skip rule or give more bits/keep choices under 'space'")  # fmt: skip
    return space


@dataclass(frozen=True, kw_only=True)
class StoredBits:
    """The weight bits a deployment target stores, by layer type (`LayerInfo.kind`);
    `other`: any type not named."""

    target: str
    by_kind: Mapping[str, tuple[int, ...]]
    other: tuple[int, ...] = (FLOAT_BITS,)

    def of(self, kind: str) -> tuple[int, ...]:
        return self.by_kind.get(kind, self.other)


def _only_stored(profile: ModelProfile, config: SpaceConfig, resolved: dict[str, _Resolved],
                 stored: StoredBits) -> None:  # fmt: skip
    """Bits the target cannot store leave every layer's choices (the defaults and
    `space.bits` hold for every target: a study's config names them all); a rule asking for
    them for a layer is refused."""
    kinds = {layer.name: layer.kind for layer in profile.layers}
    for i, rule in enumerate(config.rules):
        for name in (n for p in rule.patterns for n in _selector_matches(p, profile.layers)):
            wrong = sorted(set(rule.bits or ()) - set(stored.of(kinds[name])))
            if wrong:
                raise SpaceError(f"space.rules[{i}].bits: target {stored.target} stores no "
                                 f"{wrong[0]}-bit weights of {kinds[name]} layers ({name}); use "
                                 f"{_listed(stored.of(kinds[name]))}")  # fmt: skip
    for name, r in resolved.items():
        r.choices["bits"] = tuple(b for b in r.choices["bits"] if b in stored.of(kinds[name]))
        r.choices["bits"] = r.choices["bits"] or (FLOAT_BITS,)


def _listed(bits: Iterable[int]) -> str:
    return ", ".join(str(b) for b in sorted(bits)) + " (32: float)"


def _without_skipped(plan: PruningPlan, skipped: Mapping[str, str]) -> tuple[PruningPlan, dict]:
    """The plan without the groups that touch a skipped layer, and every group left out
    (the plan's own exclusions too) with why."""
    unpruned = dict(plan.excluded)
    groups = []
    for group in plan.groups:
        touched = [m for m in group.members if m in skipped]
        if touched:
            unpruned[group.name] = f"touches skipped layer {touched[0]}"
        else:
            groups.append(group)
    return PruningPlan(groups=tuple(groups), excluded=unpruned,
                       importance=plan.importance), unpruned  # fmt: skip


def _tied(names: list[str], resolved: dict[str, _Resolved]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(resolved[name].tie or name, []).append(name)
    return groups


def _check_tie(key: str, members: list[str], resolved: dict[str, _Resolved], what: str) -> None:
    first = resolved[members[0]]
    for other in members[1:]:
        if resolved[other].choices[what] != first.choices[what]:
            raise SpaceError(f"tie '{key}': layers {members[0]} and {other} have different "
                             f"{what} choices; give the tied layers one rule")  # fmt: skip


def _knobs(kind: str, targets: list[tuple[str, int]],
           resolved: dict[str, _Resolved]) -> list[Knob]:  # fmt: skip
    """One knob of `kind` per target (layer or group), or per tie of targets; `units` (the
    largest member's) for canonical rounding."""
    units = dict(targets)
    knobs = []
    optional = KINDS[kind].optional
    for key, members in _tied([name for name, _ in targets], resolved).items():
        _check_tie(key, members, resolved, kind)
        if optional and resolved[members[0]].choices[kind] == (KINDS[kind].reference,):
            continue
        knobs.append(Knob(name=f"{kind}:{key}", kind=kind, layers=tuple(members),
                          choices=resolved[members[0]].choices[kind],
                          units=max(units[m] for m in members)))  # fmt: skip
    return knobs
