"""Budgets: hard limits on size_bytes, macs and bops (priced by the cost model), latency
(predicted before dispatch, measured by the worker) and a metric floor, parsed from
`size=40KB,macs=2M`, `latency<=2ms`, `metric>=0.95`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, TypeVar

from search_spaces.cost import Cost

SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}  # fmt: skip
COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
# budget key -> (Cost field, unit table)
LIMITS = {"size": ("size_bytes", SIZE_UNITS), "macs": ("macs", COUNT_UNITS),
          "bops": ("bops", COUNT_UNITS)}  # fmt: skip
TIME_UNITS = {"MS": 1.0, "S": 1e3, "US": 1e-3}  # -> milliseconds
R = TypeVar("R")
_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


class BudgetError(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class Budget:
    size_bytes: int | None = None
    macs: int | None = None
    bops: int | None = None
    metric_floor: float | None = None  # `metric>=X`: known only after evaluation
    # `latency=2ms`: milliseconds in the target runtime, measured by the worker and
    # predicted before dispatch (orchestrator/latency.py)
    latency_ms: float | None = None

    @property
    def limits(self) -> dict[str, int]:
        return {f: getattr(self, f) for f, _ in LIMITS.values() if getattr(self, f) is not None}

    def __bool__(self) -> bool:
        return self.priced or self.metric_floor is not None

    @property
    def priced(self) -> bool:
        """Limits known (or predicted) before evaluation: repairs and fills aim at them."""
        return bool(self.limits) or self.latency_ms is not None

    def latency_violation(self, latency_ms: float | None) -> float:
        """Optuna constraint for the latency limit: > 0 over it; 0 without a limit or a
        value (a prediction not yet possible)."""
        if self.latency_ms is None or latency_ms is None:
            return 0.0
        return latency_ms / self.latency_ms - 1.0

    def keeps_latency(self, latency_ms: float | None) -> bool:
        """A measured latency within the limit (a trial never measured keeps none)."""
        if self.latency_ms is None:
            return True
        return latency_ms is not None and latency_ms == latency_ms and latency_ms <= self.latency_ms

    def metric_violation(self, metric: float | None) -> float:
        """Optuna constraint for the floor: > 0 when the metric is below it (or unknown)."""
        if self.metric_floor is None:
            return 0.0
        return 1.0 if metric is None else self.metric_floor - metric

    def keeps(self, metric: float | None) -> bool:
        return self.metric_violation(metric) <= 0

    def violations(self, cost: Cost) -> dict[str, float]:
        """Per limit, the relative excess (> 0: over budget; <= 0: within). Optuna constraints."""
        return {f: getattr(cost, f) / limit - 1.0 for f, limit in self.limits.items()}

    def allows(self, cost: Cost) -> bool:
        return all(v <= 0 for v in self.violations(cost).values())

    def within(self, row: Any) -> bool:
        """A finished trial (attributes size_bytes, macs, bops, metric; latency_ms with a
        latency limit) keeps every limit and the floor."""
        return (self.allows(row) and self.keeps(row.metric)
                and self.keeps_latency(getattr(row, "latency_ms", None)))  # fmt: skip

    def rank(self, size_bytes: float, metric: float) -> tuple[float, float]:
        """Best within budget as a sort key, lowest first: with a metric floor the smallest
        model keeping it (then the better metric), else the best metric (then the smaller
        model). The one rule: the driver's incumbent, SearchResult, export and report."""
        if self.metric_floor is not None:
            return (size_bytes, -metric)
        return (-metric, size_bytes)

    def best(self, rows: Iterable[R]) -> R | None:
        """The best of `rows` (finished trials within this budget, with attributes
        size_bytes and metric) by `rank`; ties: the first."""
        return min(rows, key=lambda r: self.rank(r.size_bytes, r.metric), default=None)

    def describe(self) -> str:
        names = {f: k for k, (f, _) in LIMITS.items()}
        parts = [f"{names[f]}={v}" for f, v in self.limits.items()]
        if self.latency_ms is not None:
            parts.append(f"latency={self.latency_ms:g}ms")
        if self.metric_floor is not None:
            parts.append(f"metric>={self.metric_floor:g}")
        return ",".join(parts) or "none"


def _amount(key: str, text: str, units: dict[str, int]) -> int:
    match = _AMOUNT.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in units:
        names = ", ".join(u for u in units if u) or "none"
        raise BudgetError(f"budget '{key}={text}' is not an amount; write e.g. {key}=40KB "
                          f"(units: {names})")  # fmt: skip
    # Decimal, rounded half up: 1.001KB is 1001 bytes, not float's 1000.9999.
    value = (Decimal(match.group(1)) * units[unit]).to_integral_value(rounding=ROUND_HALF_UP)
    if value < 1:
        raise BudgetError(f"budget '{key}={text}' must be positive (at least 1)")
    return int(value)


def _latency(text: str) -> float:
    match = _AMOUNT.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in TIME_UNITS:
        raise BudgetError(f"budget 'latency={text}' is not a time; write e.g. latency=2ms "
                          "(units: ms, s, us)")  # fmt: skip
    value = float(match.group(1)) * TIME_UNITS[unit]
    if not value > 0 or not math.isfinite(value):
        raise BudgetError(f"budget 'latency={text}' must be positive")
    return value


def _floor(text: str) -> float:
    try:
        value = float(text.removeprefix(">="))
    except ValueError:
        raise BudgetError(f"budget 'metric>={text}' needs a number, e.g. metric>=0.95") from None
    if not math.isfinite(value):
        raise BudgetError("budget metric floor must be a finite number")
    return value


def parse_budget(spec: str | dict | None) -> Budget:
    """`"size=40KB,macs=2M"`, `"latency<=2ms"`, `"metric>=0.95"` (a limit is written
    `KEY=VALUE` or `KEY<=VALUE`), or a mapping (`{"size": "40KB", "metric": 0.95}`) ->
    Budget."""
    if spec is None or spec == "" or spec == {}:
        return Budget()
    if isinstance(spec, str):
        pairs = []
        for part in spec.split(","):
            part = part.replace(">=" if part.strip().startswith("metric") else "<=", "=", 1)
            key, sep, value = part.partition("=")
            if not sep:
                raise BudgetError(f"budget part '{part.strip()}' needs KEY=VALUE, e.g. size=40KB")
            pairs.append((key.strip(), value.strip()))
    elif isinstance(spec, dict):
        pairs = [(str(k), str(v)) for k, v in spec.items()]
    else:
        raise BudgetError("budget must be a string like 'size=40KB' or a mapping")
    fields: dict[str, float] = {}
    for key, value in pairs:
        if key == "metric":
            fields["metric_floor"] = _floor(value)
            continue
        if key == "latency":
            fields["latency_ms"] = _latency(value)
            continue
        if key not in LIMITS:
            raise BudgetError(f"unknown budget '{key}'; use {', '.join(LIMITS)}, latency or "
                              "metric>=X")  # fmt: skip
        field, units = LIMITS[key]
        fields[field] = _amount(key, value, units)
    return Budget(**fields)


def format_bytes(n: float) -> str:
    for unit, scale in (("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
