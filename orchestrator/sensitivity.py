"""Per-knob sensitivity and knapsack seeding.

Sensitivity: the metric when only one knob moves through its choices (all bits choices,
a grid of keep choices) and every other layer stays float and unpruned. Evaluated in
parallel on the workers, stored as Parquet, cached by task and space (a later study of
the same task and space reuses it).

Seeding: treating each knob's metric drop and size change as additive, a multiple-choice
knapsack (orchestrator.knapsack) picks the best value of every knob for each of a sweep
of size budgets, in the spirit of HAWQ-V3's bit allocation (Yao et al., 2021). Those
policies, priced exactly by the cost model, are evaluated first.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import knapsack
from orchestrator.atomic import atomic_write_bytes
from orchestrator.errors import RayLostError
from search_spaces import Knob, SearchSpace
from search_spaces.cost import policy_cost
from search_spaces.kinds import kind_of, reference_values
from search_spaces.kinds.keep import KEEP_GRID
from search_spaces.policy import Policy

SEED_BUDGETS = 8  # size budgets in the seeding sweep
RESOLUTION = 2000  # knapsack cost units across the space's size range


def reference(space: SearchSpace) -> dict[str, float]:
    """Nothing compressed: every knob at its kind's reference (float, keep 1)."""
    return reference_values(space.knobs)


def probe_values(knob: Knob) -> list[float]:
    return kind_of(knob).probe_values(knob)


def probes(space: SearchSpace) -> list[tuple[str, float, Policy]]:
    """(knob, value, policy) for every probe: one knob moved, the rest at the reference."""
    base = reference(space)
    out = []
    for knob in space.searchable:
        for value in probe_values(knob):
            out.append((knob.name, value, Policy.from_values(space, {**base, knob.name: value})))
    return out


REFERENCE_KNOB = "(reference)"  # the unchanged model, scored at the probes' share


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Which probes the sensitivity phase scores, on what share of the validation data."""

    # (knob, value, policy), the reference excluded, most telling first (so a phase cut
    # short by its time limit loses the least)
    probes: tuple[tuple[str, float, Policy], ...]
    share: float = 1.0  # of the validation batches per probe (the first ones)
    total: int = 0  # the probes of a full sweep (every probe value of every knob)
    budget: float | None = None  # evaluations allowed (whole-data equivalents)

    @property
    def evaluations(self) -> float:
        """What it costs in whole-data evaluations (the reference probe included)."""
        return (len(self.probes) + (self.share < 1)) * self.share


def _informative_order(values: list[float], reference: float) -> list[float]:
    """Probe values by what one more probe tells: the smallest first (the largest drop, the
    clearest at low fidelity), then by bisection of what lies between, toward the reference."""
    rest = sorted(v for v in values if v != reference)
    if not rest:
        return []
    order, spans = [rest[0]], [(1, len(rest) - 1)]
    while spans:
        lo, hi = spans.pop(0)
        if lo > hi:
            continue
        mid = (lo + hi + 1) // 2
        order.append(rest[mid])
        spans += [(lo, mid - 1), (mid + 1, hi)]
    return order


def schedule(space: SearchSpace, *, budget: float | None = None,
             batches: int | None = None) -> Schedule:  # fmt: skip
    """The probes within `budget` whole-data evaluations. Every probe (every probe value of
    every knob, but the reference) when they fit; else each probe scores the fewest whole
    validation batches that let every probe fit (at least one batch), and when even that
    does not fit, the probes are taken round by round (each knob's most telling value,
    then its next), the knobs holding the most weights first; knobs left unprobed are
    priced by their kind's prior. `batches`: the validation batches (None: unknown, then
    the share is the budget's own fraction, at least 5%)."""
    base = reference(space)
    order = {k.name: _informative_order([float(v) for v in probe_values(k)], float(base[k.name]))
             for k in space.searchable}  # fmt: skip
    total = sum(map(len, order.values()))
    if budget is None or total <= budget:
        share, count = 1.0, total
    else:
        fraction = budget / (total + 1)  # + the reference probe
        share = (max(1, math.floor(fraction * batches)) / batches if batches
                 else max(0.05, fraction))  # fmt: skip
        count = min(total, max(0, math.floor(budget / share) - 1))
    weight = {k.name: sum(space.profile.layer(n).numel for n in k.layers) for k in space.searchable}
    ranked = sorted(space.searchable, key=lambda k: -weight[k.name])
    picked: list[tuple[str, float]] = []
    for level in range(max(map(len, order.values()), default=0)):
        for knob in ranked:
            if len(picked) < count and level < len(order[knob.name]):
                picked.append((knob.name, order[knob.name][level]))
    policies = {(k, float(v)): p for k, v, p in probes(space)}
    found = tuple((k, v, policies[(k, v)]) for k, v in picked)  # in the order to measure them
    return Schedule(probes=found, share=share, total=total, budget=budget)


def cache_key(task_spec: str, space: SearchSpace, recovery: dict[str, Any],
              base_metric: float, share: float = 1.0) -> str:  # fmt: skip
    # the base metric fingerprints the trained weights (a retrained model is a new table);
    # probes on part of the data are another table
    data = {"version": 2, "task": task_spec, "space": space.to_dict(), "recovery": recovery,
            "keep_grid": KEEP_GRID, "base_metric": repr(base_metric), "share": share}  # fmt: skip
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def cached_table(path: Path) -> pd.DataFrame | None:
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowInvalid):
        return None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the sensitivity phase: `table` holds the probes scored so far (cached,
    so the resumed study measures only the rest)."""

    def __init__(self, table: pd.DataFrame) -> None:
        super().__init__()
        self.table = table


class Lost(RayLostError):
    """Ray went away during the sensitivity phase: `table` holds the probes scored so far
    (cached as on Ctrl-C)."""

    def __init__(self, message: str, table: pd.DataFrame) -> None:
        super().__init__(message)
        self.table = table


def table_for(task_spec: str, space: SearchSpace, recovery: dict[str, Any], pool: Any,
              base_metric: float, *, plan: Schedule | None = None,
              seconds: float | None = None, quiet: bool = True) -> pd.DataFrame:  # fmt: skip
    """The sensitivity table of this task and space for the probes of `plan` (default:
    every probe on all the data): those cached are read, the rest measured with a progress
    bar (probes done / total) and cached. A probe that fails (its policy did not rebuild or
    score) is a row with its error and no metric: reported in one line (count and the
    first error) and left out of the loss model; the rest is cached, and a later study
    measures only the failed probes again (a lost worker is no lasting failure). Ctrl-C
    caches the probes done and raises `Interrupted`. After `seconds` no more probes start
    (a probe costs its rebuild too, however little data it scores): those not measured
    are measured by a later study of the same task, space and share, if it has time."""
    from orchestrator.cache import cache_dir

    plan = plan or schedule(space)
    key = cache_key(task_spec, space, recovery, base_metric, plan.share)
    path = cache_dir() / "sensitivity" / f"{key}.parquet"
    known = cached_table(path)
    try:
        raw = measure(space, pool, plan, known=known, quiet=quiet, seconds=seconds)
    except (Interrupted, Lost) as stop:
        write_table(stop.table, path)
        raise
    if known is None or not raw.equals(known):  # a table read back as it was: left alone
        write_table(raw, path)
    table = finish_table(space, raw, plan, base_metric)
    report_failures(table)
    planned = {(k, float(v)) for k, v, _ in plan.probes}
    measured = sum(
        (k, float(v)) in planned for k, v in zip(table["knob"], table["value"], strict=True)
    )
    if not quiet and measured < len(plan.probes):
        print(f"sensitivity: {measured} of {len(plan.probes)} probes measured within the time "
              "limit; the rest are priced by the kinds' priors (a later study of this task and "
              "space measures more)", file=sys.stderr)  # fmt: skip
    return table


def describe(plan: Schedule, trials: int, seconds: float | None = None) -> str:
    """One line: what the sensitivity phase scores, and why not more."""
    limit = f"; at most {seconds:.1f} s" if seconds is not None else ""
    if len(plan.probes) == plan.total and plan.share >= 1:
        return (f"sensitivity: {plan.total} probes (every knob value), all the validation "
                f"data{limit}")  # fmt: skip
    share = f"{plan.share:.0%}" if plan.share < 1 else "all"
    return (f"sensitivity: {len(plan.probes)} of {plan.total} probes on {share} of the "
            f"validation data ({plan.evaluations:.1f} evaluations; budget "
            f"{plan.budget:g} = sensitivity.share of {trials} trials{limit}); knobs not "
            "probed are priced by their kind's prior")  # fmt: skip


def report_failures(table: pd.DataFrame) -> None:
    failed = table[table["metric"].isna()]
    if len(failed):
        first = failed.iloc[0]
        error = " ".join(str(first["error"]).split())[:300]
        print(f"sensitivity: {len(failed)} of {len(table)} probes failed and are left out of "
              f"the loss model (first: {first['knob']} = {first['value']:g}: {error})",
              file=sys.stderr)  # fmt: skip


def measure(space: SearchSpace, pool: Any, plan: Schedule, *, known: pd.DataFrame | None = None,
            quiet: bool = True, seconds: float | None = None) -> pd.DataFrame:  # fmt: skip
    """Score the plan's probes on the worker pool (but those `known` scored), and on part of
    the data the unchanged model too; the raw rows as scored (what is cached)."""
    from tqdm import tqdm

    every = [*plan.probes]
    if plan.share < 1:  # first: every other probe's drop is measured from it
        every.insert(0, (REFERENCE_KNOB, 0.0, Policy.from_values(space, reference(space))))
    rows = [] if known is None else known[known["metric"].notna()].to_dict("records")
    scored = {(r["knob"], r["value"]) for r in rows}
    todo = [(k, float(v), p) for k, v, p in every if (k, float(v)) not in scored]
    context = {"share": plan.share} if plan.share < 1 else None
    results: dict[int, dict[str, Any]] = {}

    def done(index: int, result: dict[str, Any]) -> None:
        results[index] = result
        bar.update(1)

    with tqdm(total=len(todo), desc="sensitivity", unit="probe", disable=quiet,
              file=sys.stderr, dynamic_ncols=True) as bar:  # fmt: skip
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            pool.map([dict(policy) for _, _, policy in todo], done, context, deadline)
        except KeyboardInterrupt:
            raise Interrupted(_raw(space, todo, results, rows, plan)) from None
        except RayLostError as lost:
            raise Lost(str(lost), _raw(space, todo, results, rows, plan)) from None
    return _raw(space, todo, results, rows, plan)


def _raw(space: SearchSpace, todo: list, results: dict[int, dict[str, Any]], rows: list,
         plan: Schedule) -> pd.DataFrame:  # fmt: skip
    rows = list(rows)
    for i, (knob, value, policy) in enumerate(todo):
        if i in results:
            result = results[i]
            rows.append({"knob": knob, "value": value, "metric": result.get("metric"),
                         "error": result.get("error"), "share": plan.share,
                         **policy_cost(space, policy).as_dict(), "policy_hash": policy.hash})  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


COLUMNS = ["knob", "value", "metric", "error", "share", "size_bytes", "macs", "bops", "params",
           "policy_hash"]  # fmt: skip


def finish_table(space: SearchSpace, raw: pd.DataFrame, plan: Schedule,
                 base_metric: float) -> pd.DataFrame:  # fmt: skip
    """The table the loss model reads: the plan's probes (on part of the data, each
    metric is the base metric less the probe's drop from the unchanged model on that part)
    and a row per knob at its reference value (the unchanged model, not scored again)."""
    table = raw[raw["knob"] != REFERENCE_KNOB].copy()
    if plan.share < 1:
        ref = raw.loc[raw["knob"] == REFERENCE_KNOB, "metric"].dropna()
        table["metric"] = table["metric"] + (
            base_metric - ref.iloc[0] if len(ref) else float("nan")
        )
    wanted = {(k, float(v)) for k, v, _ in plan.probes}
    table = table[[(k, v) in wanted for k, v in zip(table["knob"], table["value"], strict=True)]]
    base = reference(space)
    policy = Policy.from_values(space, base)
    cost = policy_cost(space, policy).as_dict()
    refs = [{"knob": knob.name, "value": float(base[knob.name]), "metric": base_metric,
             "error": None, "share": 1.0, **cost, "policy_hash": policy.hash}
            for knob in space.searchable]  # the unchanged model: known without a probe  # fmt: skip
    position = {(k, float(v)): i for i, (k, v, _) in enumerate(probes(space))}
    out = pd.concat([table, pd.DataFrame(refs)], ignore_index=True)
    out["order"] = [position.get((k, float(v)), len(position))
                    for k, v in zip(out["knob"], out["value"], strict=True)]  # fmt: skip
    return out.sort_values("order", kind="stable").drop(columns="order").reset_index(drop=True)


def write_table(table: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def seed_policies(space: SearchSpace, table: pd.DataFrame, base_metric: float,
                  *, budgets: int = SEED_BUDGETS) -> list[dict[str, float]]:  # fmt: skip
    """Knapsack-optimal values of the searchable knobs (choices as the sampler sees them,
    under the additive model) for a sweep of size budgets from the smallest model in the
    space to the float model; distinct policies only."""
    base_size = policy_cost(space, Policy.from_values(space, reference(space))).size_bytes
    items, values = [], []
    for knob in space.searchable:
        rows = table[(table["knob"] == knob.name) & table["metric"].notna()]
        if rows.empty:
            continue
        deltas = [(int(r.size_bytes) - base_size, float(r.metric) - base_metric, r.value)
                  for r in rows.itertuples()]  # fmt: skip
        items.append(deltas)
        values.append(knob.name)
    if not items:
        return []
    # Knapsack costs: each knob's size change above its own smallest. Treated as additive,
    # the changes of a layer's bits and keep knobs overlap, so the additive sizes do not
    # match true sizes; the sweep runs over the additive range instead (1% to 100% of it,
    # geometric), and every seed is priced exactly by the cost model before it is used.
    spans = [max(d for d, _, _ in item) - min(d for d, _, _ in item) for item in items]
    unit = max(1, math.ceil(sum(spans) / RESOLUTION))
    options = [[(math.ceil((d - min(x for x, _, _ in item)) / unit), gain) for d, gain, _ in item]
               for item in items]  # fmt: skip
    full = sum(max(c for c, _ in option) for option in options)
    seeds: list[dict[str, float]] = []
    seen: set[str] = set()
    for i in range(budgets):
        capacity = int(full * 0.01 ** (1 - i / max(1, budgets - 1)))
        chosen = knapsack.solve(options, capacity)
        if chosen is None:
            continue
        picked = {name: item[j][2] for name, item, j in zip(values, items, chosen, strict=True)}
        picked = {k.name: picked.get(k.name, max(k.choices)) for k in space.searchable}
        policy = Policy.from_values(space, {**reference(space), **picked})
        if policy.hash not in seen:
            seen.add(policy.hash)
            seeds.append(picked)
    return seeds
