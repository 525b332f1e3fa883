"""The `space:` section of a config: default choices, a preset, and per-layer rules."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

DEFAULT_BITS = (2, 3, 4, 5, 6, 8, 32)
FLOAT_BITS = 32  # "left in float"
Bits = Annotated[StrictInt, Field(description="weight bits: 2..16, or 32 for float")]
# activation bits (issue 15): 8 (integer kernels' inputs and outputs) or float; the default
# (32 only) gives no activation knob at all
ACT_BITS = (8, FLOAT_BITS)
DEFAULT_ACT_BITS = (FLOAT_BITS,)
Ratio = StrictFloat | StrictInt


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_bits(values: tuple[int, ...]) -> tuple[int, ...]:
    if not values:
        raise ValueError("needs at least one choice")
    for bits in values:
        if bits != FLOAT_BITS and not 2 <= bits <= 16:
            raise ValueError(f"{bits} is not a bit width: use 2..16, or 32 for float")
    return tuple(sorted(set(values)))


def _check_act_bits(values: tuple[int, ...]) -> tuple[int, ...]:
    if not values:
        raise ValueError("needs at least one choice")
    for bits in values:
        if bits not in ACT_BITS:
            raise ValueError(f"{bits} is not an activation width: use 8, or 32 for float")
    return tuple(sorted(set(values)))


class KeepRange(_Frozen):
    """Keep ratios min, min+step, ..., max."""

    min: Ratio = 0.1
    max: Ratio = 1.0
    step: Ratio = 0.05

    @model_validator(mode="after")
    def _check(self) -> KeepRange:
        if not 0 < self.min <= self.max <= 1:
            raise ValueError("needs 0 < min <= max <= 1")
        if self.step <= 0:
            raise ValueError("step must be positive")
        return self

    def choices(self) -> tuple[float, ...]:
        n = int((self.max - self.min) / self.step + 1e-9)
        values = [round(self.min + i * self.step, 10) for i in range(n + 1)]
        if values[-1] < self.max:
            values.append(float(self.max))
        return tuple(values)


def keep_choices(keep: KeepRange | tuple[float, ...]) -> tuple[float, ...]:
    values = keep.choices() if isinstance(keep, KeepRange) else keep
    if not values:
        raise ValueError("needs at least one choice")
    for v in values:
        if not 0 < v <= 1:
            raise ValueError(f"keep ratio {v} is outside (0, 1]")
    return tuple(sorted({float(v) for v in values}))


class Rule(_Frozen):
    """Settings for the layers matching `layers` (names or globs; `$first`, `$last`)."""

    layers: StrictStr | tuple[StrictStr, ...]
    bits: tuple[Bits, ...] | None = None
    act_bits: tuple[StrictInt, ...] | None = None
    keep: KeepRange | tuple[Ratio, ...] | None = None
    skip: StrictBool = False  # left in float and unpruned
    tie: StrictStr | None = None  # layers with the same tie name share one bits and one keep knob

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return None if v is None else _check_bits(v)

    @field_validator("act_bits")
    @classmethod
    def _act_bits(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return None if v is None else _check_act_bits(v)

    @field_validator("keep")
    @classmethod
    def _keep(cls, v):
        if v is not None:
            keep_choices(v)
        return v

    @property
    def patterns(self) -> tuple[str, ...]:
        return (self.layers,) if isinstance(self.layers, str) else self.layers


class SpaceConfig(_Frozen):
    bits: tuple[Bits, ...] = DEFAULT_BITS
    # [8, 32]: a knob per Conv/Linear layer quantizing its input and output to 8 bits
    act_bits: tuple[StrictInt, ...] = DEFAULT_ACT_BITS
    keep: KeepRange | tuple[Ratio, ...] = KeepRange()
    preset: StrictStr = "auto"  # "auto" (by model family), "none", or a preset name
    rules: tuple[Rule, ...] = ()

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return _check_bits(v)

    @field_validator("act_bits")
    @classmethod
    def _act_bits(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return _check_act_bits(v)

    @field_validator("keep")
    @classmethod
    def _keep(cls, v):
        keep_choices(v)
        return v


# auto: structured where the model has coupling groups that can be cut, else unstructured
PruningMode = Literal["auto", "structured", "unstructured", "none"]
Importance = Literal["l1", "l2", "bn_scale"]
