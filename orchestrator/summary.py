"""Human-readable tables: the space, the front, the end-of-run summary."""

from __future__ import annotations

from typing import Any

import pandas as pd

from orchestrator.budget import format_bytes
from orchestrator.storage import redact
from search_spaces import SearchSpace
from search_spaces.kinds import KEEP, reference_values


def _print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def print_space(space: SearchSpace) -> None:
    profile = space.profile
    rows = []
    for knob in space.knobs:
        if knob.kind == KEEP.name and space.plan is not None:  # one knob per coupling group
            groups = [space.plan.group(g) for g in knob.layers]
            members = ",".join(m for g in groups for m in g.members)
            shapes = ", ".join(f"{g.channels} {g.unit}" for g in groups)
        else:
            members = ",".join(knob.layers)
            shapes = ", ".join("x".join(map(str, profile.layer(n).shape)) for n in knob.layers)
        choices = ",".join(f"{c:g}" for c in knob.choices)
        rows.append([knob.name, members, shapes, choices])
    _print_table(["knob", "layers", "shape", "choices"], rows)
    for name, reason in space.skipped.items():
        print(f"skipped {name}: {reason}")
    for name, reason in space.unpruned.items():
        where = (
            "the model" if name == "model" and space.pruning != "structured" else f"group of {name}"
        )
        print(f"not pruned: {where}: {reason}")
    if space.pruning == "unstructured" and space.unpruned:  # pruning: auto fell back
        print("structured pruning found no group to cut (above); pruning unstructured: masks")
    from search_spaces.cost import policy_cost
    from search_spaces.policy import Policy

    smallest = policy_cost(space, Policy.from_values(space, space.extreme_values("min")))
    full = policy_cost(space, Policy.from_values(space, reference_values(space.knobs)))
    artifact = " (ONNX)" if space.artifact is not None else ""
    print(f"\n{len(space.searchable)} searchable knobs; pruning: {space.pruning}; "
          f"float model{artifact} {format_bytes(full.size_bytes)}, smallest in space "
          f"{format_bytes(smallest.size_bytes)}")  # fmt: skip


def print_front(front: pd.DataFrame, *, base: dict[str, Any], axis: str = "size_bytes") -> None:
    base_size, base_metric = base.get("size_bytes"), base.get("metric")
    timed = front["latency_ms"].notna().any() if "latency_ms" in front else False
    rows = []
    for r in front.sort_values([axis, "size_bytes"]).itertuples():
        ratio = f"{base_size / r.size_bytes:.1f}x" if base_size else ""
        delta = f"{r.metric - base_metric:+.4f}" if base_metric is not None else ""
        latency = [f"{r.latency_ms:.3f}" if r.latency_ms == r.latency_ms else "-"] if timed else []
        rows.append([r.trial, format_bytes(r.size_bytes), ratio, *latency, f"{r.metric:.4f}",
                     delta, f"{r.macs:,}", f"{r.bops:,}"])  # fmt: skip
    _print_table(["trial", "size", "smaller", *(["latency ms"] if timed else []), "metric",
                  "vs base", "macs", "bops"], rows)  # fmt: skip


def print_summary(result: Any, prepared: Any) -> None:
    trials = result.trials
    counts = trials["state"].value_counts().to_dict()
    print(f"\nbase model: {format_bytes(result.base_size)}, metric {result.base_metric:.4f}")
    print(f"trials: {len(trials)} finished ({', '.join(f'{v} {k}' for k, v in counts.items())}) "
          f"in {result.seconds:.0f} s with sampler {result.sampler}")  # fmt: skip
    axis = prepared.config.front_axis
    print(f"\nfront ({prepared.config.front} against metric):")
    print_front(result.front, base={"size_bytes": result.base_size, "metric": result.base_metric},
                axis=axis)  # fmt: skip
    baselines = trials[trials["origin"] == "baseline"].sort_values("size_bytes")
    if not baselines.empty:
        on_front = set(result.front["trial"])
        shown = [f"{format_bytes(r.size_bytes)} {r.metric:.4f}" + (" (on front)" if r.trial in on_front else "")
                 for r in baselines.itertuples() if r.state == "COMPLETE"]  # fmt: skip
        print(f"\nuniform baselines (size, metric): {'; '.join(shown)}")
    best = result.best_within_budget()
    where = f"within budget {prepared.budget.describe()}" if prepared.budget else "overall"
    if best is not None:
        print(f"\nbest {where}: trial {best.trial}, metric {best.metric:.4f} at "
              f"{format_bytes(best.size_bytes)} ({result.base_size / best.size_bytes:.1f}x smaller)")  # fmt: skip
    else:
        print(f"\nno completed trial {where}")
    d = prepared.location
    storage = prepared.config.storage
    study = f"{d}/study.db" if storage is None else f"study '{prepared.study}' in {redact(storage)}"
    print(f"\nfiles: {d}/run.json, {study}, {d}/trials/, {d}/pareto.parquet")


def print_sensitivity(table: pd.DataFrame, *, base_metric: float) -> None:
    """One row per knob: the metric at each probed value (every other layer float)."""
    print(f"base metric {base_metric:.4f}; metric with only this knob changed:")
    rows = []
    for knob, group in table.groupby("knob", sort=False):
        cells = [f"{v:g}:{m:.3f}" if m == m else f"{v:g}:fail"
                 for v, m in zip(group["value"], group["metric"], strict=True)]  # fmt: skip
        worst = (group["metric"].min() - base_metric) if group["metric"].notna().any() else None
        rows.append([knob, f"{worst:+.4f}" if worst is not None else "-", "  ".join(cells)])
    _print_table(["knob", "worst drop", "value:metric"], rows)
