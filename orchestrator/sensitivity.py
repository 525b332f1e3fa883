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
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import knapsack
from orchestrator.atomic import atomic_write_bytes
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


def cache_key(task_spec: str, space: SearchSpace, recovery: dict[str, Any],
              base_metric: float) -> str:  # fmt: skip
    # the base metric fingerprints the trained weights (a retrained model is a new table)
    data = {"version": 1, "task": task_spec, "space": space.to_dict(), "recovery": recovery,
            "keep_grid": KEEP_GRID, "base_metric": repr(base_metric)}  # fmt: skip
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def cached_table(path: Path) -> pd.DataFrame | None:
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowInvalid):
        return None


def table_for(task_spec: str, space: SearchSpace, recovery: dict[str, Any], pool: Any,
              base_metric: float, *, quiet: bool = True) -> pd.DataFrame:  # fmt: skip
    """The sensitivity table of this task and space: from the cache, else measured with a
    progress bar (probes done / total) and cached. A probe that fails (its policy did not
    rebuild or score) is a row with its error and no metric: reported in one line (count
    and the first error) and left out of the loss model; the rest is cached, and a later
    study measures only the failed probes again (a lost worker is no lasting failure)."""
    from orchestrator.cache import cache_dir

    key = cache_key(task_spec, space, recovery, base_metric)
    path = cache_dir() / "sensitivity" / f"{key}.parquet"
    table = cached_table(path)
    if table is None or table["metric"].isna().any():
        table = measure(space, pool, quiet=quiet, known=table)
        write_table(table, path)
    report_failures(table)
    return table


def report_failures(table: pd.DataFrame) -> None:
    failed = table[table["metric"].isna()]
    if len(failed):
        first = failed.iloc[0]
        error = " ".join(str(first["error"]).split())[:300]
        print(f"sensitivity: {len(failed)} of {len(table)} probes failed and are left out of "
              f"the loss model (first: {first['knob']} = {first['value']:g}: {error})",
              file=sys.stderr)  # fmt: skip


def measure(space: SearchSpace, pool: Any, *, quiet: bool = True,
            known: pd.DataFrame | None = None) -> pd.DataFrame:  # fmt: skip
    """Evaluate every probe on the worker pool (but those `known` scored); one row per
    (knob, value)."""
    from tqdm import tqdm

    every = probes(space)
    position = {(k, float(v)): i for i, (k, v, _) in enumerate(every)}
    rows = [] if known is None else known[known["metric"].notna()].to_dict("records")
    scored = {(r["knob"], r["value"]) for r in rows}
    found = [(k, v, p) for k, v, p in every if (k, float(v)) not in scored]
    with tqdm(total=len(found), desc="sensitivity", unit="probe", disable=quiet,
              file=sys.stderr, dynamic_ncols=True) as bar:  # fmt: skip
        results = pool.map([dict(policy) for _, _, policy in found], lambda _: bar.update(1))
    for (knob, value, policy), result in zip(found, results, strict=True):
        cost = policy_cost(space, policy)
        rows.append({"knob": knob, "value": float(value), "metric": result.get("metric"),
                     "error": result.get("error"), **cost.as_dict(),
                     "policy_hash": policy.hash})  # fmt: skip
    rows.sort(key=lambda r: position.get((r["knob"], r["value"]), len(position)))
    return pd.DataFrame(rows)


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
