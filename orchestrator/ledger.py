"""The ledger: every finished candidate told to the Optuna study and recorded as one row
of the trial schema (orchestrator.results), through the recorder process (orchestrator.
store); and what the search has learned: the evaluation cache by policy hash, the best
trial within the budget (`Budget.rank`) and the front's points (issue 13).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from orchestrator.prepare import Prepared
from orchestrator.proposer import Candidate
from orchestrator.results import RESULT_COLUMNS, ResultSink, make_row
from orchestrator.store import INTERRUPTED, OWNER_ATTR, ROW_ATTR, OpenedStudy
from orchestrator.timing import DriverStats
from search_spaces.cost import Cost, policy_cost
from search_spaces.policy import Policy

UNMEASURED_MS = 1e9  # a latency front's value for a trial whose latency nobody knows
INFEASIBLE_METRIC = 0.0  # told for over-budget trials; constraints rank them, not this value
NO_WORK = {"eval_seconds": 0.0, "rebuild_seconds": 0.0, "recovery_seconds": 0.0,
           "artifact_seconds": 0.0}  # cached
Row = dict[str, Any]


class Recorder(Protocol):
    """What the ledger uses of the recorder (orchestrator.recorder.Recorder)."""

    drain_seconds: float

    def created(self, trial: FrozenTrial) -> None: ...
    def finished(self, trial: FrozenTrial, row: Row) -> None: ...
    def foreign(self, local: int, number: int) -> None: ...
    def adopted(self) -> list[FrozenTrial]: ...
    def close(self) -> None: ...


def objective_values(dirs: list[str], size: int, metric: float) -> list[float]:
    if len(dirs) == 2:
        return [size, metric]
    return [size] if dirs == ["minimize"] else [metric]


def trial_row(study: str, number: int, state: str, policy: Policy, cost: Cost, *,
              feasible: bool, result: Mapping[str, Any], origin: str | None = None,
              latency_predicted: float | None = None) -> Row:  # fmt: skip
    # a PRUNED row keeps the metric of the prefix it was stopped on (see `fidelity`)
    metric = result.get("metric") if state in ("COMPLETE", "PRUNED") else None
    return make_row({
        **{column: result.get(column) for column in RESULT_COLUMNS},
        "attempt": result.get("attempt", 0), "study": study, "trial": number, "state": state,
        "metric": metric, **cost.as_dict(), "feasible": feasible, "policy": policy.to_json(),
        # the target's file as written, where the worker wrote one (the cost model's to the
        # byte: tests/test_targets.py)
        **({"size_bytes": result["artifact_bytes"]} if "artifact_bytes" in result else {}),
        "policy_hash": policy.hash, "origin": origin, "latency_predicted_ms": latency_predicted,
        "finished_at": datetime.now(timezone.utc).isoformat(),
    })  # fmt: skip


def loaded_rows(prepared: Prepared, opened: OpenedStudy) -> list[tuple[FrozenTrial, Row]]:
    """Every finished trial of the opened study with its row (an interrupted one's made
    now), after writing the rows the Parquet files lack (a crash between the two writes;
    a live driver's recorder writes its own)."""
    sink = ResultSink(prepared.study_dir, axis=prepared.config.front_axis)
    loaded = []
    for trial in opened.finished:
        row = trial.user_attrs.get(ROW_ATTR) or _interrupted_row(prepared, trial)
        if trial.system_attrs.get(OWNER_ATTR) not in opened.live:
            sink.add(row)
        loaded.append((trial, row))
    sink.flush()
    return loaded


def _interrupted_row(prepared: Prepared, trial: FrozenTrial) -> Row:
    space = prepared.space
    policy = Policy.from_values(space, {**space.fixed_values, **trial.params})
    return trial_row(prepared.study, trial.number, "FAIL", policy, policy_cost(space, policy),
                     feasible=True, result={"error": trial.user_attrs.get("error", INTERRUPTED)})  # fmt: skip


class Ledger:
    def __init__(self, prepared: Prepared, study: optuna.Study, recorder: Recorder,
                 loaded: Sequence[tuple[FrozenTrial, Row]], *, stats: DriverStats) -> None:  # fmt: skip
        """`loaded`: the trials `study` was opened with (its numbers 0, 1, ...), with rows."""
        self.study, self.recorder, self.stats = study, recorder, stats
        self.name, self.budget = prepared.study, prepared.budget
        self.directions, self.objective = prepared.config.directions, prepared.config.objective
        self.axis = prepared.config.front_axis
        self.cache: dict[str, tuple[int, Row]] = {}  # policy hash -> (trial, row)
        self.params_of: dict[str, dict[str, Any]] = {}  # policy hash -> params as asked
        self.best_row: Row | None = None  # the best feasible complete trial
        self.improvements = 0  # how often best_row changed
        self.front_points: list[tuple[int, float]] = []  # feasible complete (size, metric)
        self.known = {trial.number for trial, _ in loaded}  # the study's numbers in `study`
        self.loaded = self.finished = len(loaded)
        self.adopted = 0  # trials other drivers of a shared study finished during this run
        for local, (trial, row) in enumerate(loaded):
            self._take(local, trial, row)

    def _take(self, local: int, trial: FrozenTrial, row: Row | None) -> None:
        """A trial of the study, numbered `local` here: mapped to its storage number, and
        its evaluation cached (its row has the storage's number)."""
        self.recorder.foreign(local, trial.number)
        if row and row["state"] == "COMPLETE" and row["cached_from"] is None:
            self.params_of[row["policy_hash"]] = dict(trial.params)
            self._remember(row, local=local)

    def adopt(self) -> None:
        """Trials other drivers of a shared study finished: the sampler learns from them,
        the cache answers their policies, and they count toward the study's trials."""
        for trial in self.recorder.adopted():
            if trial.number in self.known:
                continue
            self.known.add(trial.number)
            local = self.study._storage.get_n_trials(self.study._study_id)
            self.study.add_trial(trial)
            self._take(local, trial, trial.user_attrs.get(ROW_ATTR))
            self.finished += 1
            self.adopted += 1

    def created(self, candidate: Candidate) -> None:
        """An asked candidate, pickled at once by the recorder: a snapshot as asked."""
        trial = candidate.trial
        self.params_of.setdefault(candidate.policy.hash, dict(trial.params))
        self.recorder.created(self.study._storage.get_trial(trial._trial_id))

    def reuse(self, candidate: Candidate) -> bool:
        """Tell an already evaluated policy its earlier result; False if there is none."""
        hit = self.cache.get(candidate.policy.hash)
        if hit is not None:
            number, row = hit
            self.tell(candidate, candidate.trial, "COMPLETE",
                      {**row, "cached_from": number, **NO_WORK})  # fmt: skip
        return hit is not None

    def record(self, candidate: Candidate, state: str, result: Mapping[str, Any]) -> None:
        """A worker's result: told for the candidate and each ask of it made meanwhile."""
        row = self.tell(candidate, candidate.trial, state, result)
        if state == "COMPLETE":
            self._remember(row)
        for duplicate in candidate.duplicates:
            self.tell(duplicate, duplicate.trial, state,
                      {**result, "cached_from": row["trial"], **NO_WORK})  # fmt: skip

    def tell(self, candidate: Candidate, trial: Trial, state: str, result: Mapping) -> Row:
        budget = self.budget
        metric = result.get("metric") if state in ("COMPLETE", "PRUNED") else None
        latency = result.get("latency_ms")
        feasible = candidate.feasible and (state != "COMPLETE" or (
            budget.keeps(metric) and budget.keeps_latency(latency)))  # fmt: skip
        row = trial_row(self.name, trial.number, state, candidate.policy, candidate.cost,
                        feasible=feasible, result=result, origin=candidate.origin,
                        latency_predicted=candidate.latency_predicted)  # fmt: skip
        if state in ("FAIL", "PRUNED"):
            if state == "PRUNED" and len(self.directions) == 1:
                # the prefix it was stopped on, as an intermediate report (Optuna's pruning
                # record; multi-objective studies have none)
                trial.report(metric, step=round(100 * row["fidelity"]))
            frozen = self.study.tell(trial, state=TrialState[state])
        else:
            if budget.metric_floor is not None:  # known only now: set before tell
                trial.set_constraint("metric", budget.metric_violation(metric))
            if budget.latency_ms is not None and candidate.feasible:  # measured: known now
                trial.set_constraint("latency", budget.latency_violation(latency)
                                     if latency is not None else 1.0)  # fmt: skip
            values = objective_values(self.directions, self._axis_value(candidate, latency),
                                      INFEASIBLE_METRIC if metric is None else metric)  # fmt: skip
            frozen = self.study.tell(trial, values)
        self.recorder.finished(frozen, row)
        self.finished += 1
        self.stats.trials += 1
        return row

    def _remember(self, row: Row, *, local: int | None = None) -> None:
        """Cache a completed evaluation under its trial number here (`local`: a trial
        loaded or adopted from the storage, whose row has the storage's number)."""
        self.cache[row["policy_hash"]] = (row["trial"] if local is None else local, row)
        if not row["feasible"]:
            return
        point = (row["size_bytes"], row["metric"])
        if not any(s <= point[0] and m >= point[1] for s, m in self.front_points):
            self.front_points = [(s, m) for s, m in self.front_points
                                 if not (point[0] <= s and point[1] >= m)] + [point]  # fmt: skip
        best = self.best_row
        if best is None or (self.budget.rank(row["size_bytes"], row["metric"])
                            < self.budget.rank(best["size_bytes"], best["metric"])):  # fmt: skip
            self.best_row = row
            self.improvements += 1

    def evaluated(self, policy_hash: str) -> bool:
        return policy_hash in self.cache

    def incumbent(self) -> dict[str, Any] | None:
        """The params of the best trial within the budget, if known."""
        return None if self.best_row is None else self.params_of.get(self.best_row["policy_hash"])

    def best(self) -> tuple[float, int] | None:
        """(metric, size) of the best trial within the budget, for the progress bar."""
        row = self.best_row
        return None if row is None else (row["metric"], row["size_bytes"])

    def _axis_value(self, candidate: Candidate, latency: float | None) -> float:
        """The front objective's first value: the cost model's size, or the measured
        latency (predicted for a candidate never measured; unknown: UNMEASURED_MS)."""
        if self.axis == "size_bytes":
            return candidate.cost.size_bytes
        value = latency if latency is not None else candidate.latency_predicted
        return UNMEASURED_MS if value is None else float(value)

    def to_beat(self) -> list[tuple[int, float]]:
        """What a candidate must be able to reach to matter, as (size, metric) points for
        the early-stopping test: the front (objective front); the metric floor, or the best
        metric within the budget so far (objective budget; any size)."""
        if self.objective == "front":
            return list(self.front_points)
        floor = self.budget.metric_floor
        if floor is not None:
            return [(0, floor)]
        return [(0, self.best_row["metric"])] if self.best_row is not None else []

    def close(self) -> None:
        """Wait until every trial is durable (the recorder drains)."""
        self.recorder.close()
        self.stats.drain_seconds = self.recorder.drain_seconds
