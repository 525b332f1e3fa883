"""Policy: one canonical value per knob; hashable, and JSON round-trips exactly."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from search_spaces import SearchSpace, SpaceError
from search_spaces.kinds import BITS, KEEP, kind_of

Value = int | float


@dataclass(frozen=True)
class Policy(Mapping[str, Value]):
    """Canonical knob values (build with `Policy.from_values(space, values)`).

    Keep ratios are rounded to whole element (or channel) counts, so two policies that
    build the same model are equal, hash equal and are evaluated once.
    """

    items_: tuple[tuple[str, Value], ...]

    @classmethod
    def from_values(cls, space: SearchSpace, values: Mapping[str, Any]) -> Policy:
        return cls(tuple(sorted(space.canonicalize(values).items())))

    @classmethod
    def uniform(cls, space: SearchSpace, bits: int, keep: float = 1.0) -> Policy:
        """Every searchable bits knob at `bits`, every searchable keep knob at `keep`, as
        given (`eval --policy uniform:3` is every layer at 3 bits, even one whose choices a
        preset narrows); a knob a rule fixes to one choice (`skip`, `keep: [1.0]`) keeps it."""
        by_kind = {BITS.name: bits, KEEP.name: keep}  # other kinds: their reference
        values = {k.name: by_kind.get(k.kind, kind_of(k).reference) for k in space.searchable}
        return cls.from_values(space, {**space.fixed_values, **values})

    @classmethod
    def parse(cls, space: SearchSpace, text: str) -> Policy:
        """`uniform:BITS[:KEEP]`, or JSON text of {knob: value} (optionally under "policy")."""
        if text.startswith("uniform:"):
            parts = text.split(":")[1:]
            try:
                if not 1 <= len(parts) <= 2:
                    raise ValueError
                bits, keep = int(parts[0]), float(parts[1]) if len(parts) > 1 else 1.0
            except ValueError:
                raise SpaceError(f"policy '{text}': write uniform:BITS or uniform:BITS:KEEP, "
                                 "e.g. uniform:4 or uniform:4:0.5") from None  # fmt: skip
            return cls.uniform(space, bits, keep)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpaceError(f"policy is not valid JSON: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("policy"), dict):
            data = data["policy"]
        if not isinstance(data, dict):
            raise SpaceError("policy JSON must be an object of {knob: value}")
        return cls.from_values(space, data)

    @cached_property
    def _by_name(self) -> dict[str, Value]:
        # the cost model looks up every knob of a policy; a scan per lookup is quadratic
        # in the knob count (issue 15: 40% of a 81-knob repair's time)
        return dict(self.items_)

    def __getitem__(self, key: str) -> Value:
        return self._by_name[key]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.items_)

    def __len__(self) -> int:
        return len(self.items_)

    @cached_property
    def _json(self) -> str:
        # repr-exact floats, sorted keys, no spaces: the canonical text that is hashed.
        return json.dumps(dict(self.items_), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, space: SearchSpace, text: str) -> Policy:
        return cls.from_values(space, json.loads(text))

    def to_json(self) -> str:
        return self._json

    @cached_property  # read several times per trial by the driver: computed once
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
