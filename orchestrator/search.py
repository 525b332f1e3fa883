"""The driver: one Optuna study via ask/tell, dispatch to free workers, record every trial.

The driver never builds a model. Per candidate it asks the sampler, canonicalizes the
policy, prices it with the cost model, and then either records it at once (over budget:
INFEASIBLE; already evaluated: the earlier result) or sends it to a free worker.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

from orchestrator.budget import Budget
from orchestrator.config import SearchConfig
from orchestrator.cost import Cost, policy_cost
from orchestrator.errors import ResultsError, WorkerStartError
from orchestrator.fidelity import FidelitySettings
from orchestrator.policy import Policy
from orchestrator.prepare import Prepared, prepare
from orchestrator.progress import Progress
from orchestrator.proposals import LocalShare, LossModel, Mover, Pricing, baselines, budget_seeds
from orchestrator.results import ResultSink, atomic_write_json, compute_front, read_trials
from orchestrator.storage import study_storage
from orchestrator.store import (
    INTERRUPTED,
    OWNER_ATTR,
    ROW_ATTR,
    Recorder,
    new_driver_id,
    open_study,
)
from orchestrator.timing import DriverStats, TimedSampler
from search_spaces import Knob, SearchSpace

INFEASIBLE_METRIC = 0.0  # told for over-budget trials; constraints rank them, not this value

# sampler name -> factory(seed, trials). Costs per ask measured here (DESIGN §5):
# multi-objective TPE ~160 ms at 40 knobs x 300 trials, NSGA-II ~5 ms.
SAMPLERS: dict[str, Callable[[int | None, int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed, trials: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "nsga2": lambda seed, trials: optuna.samplers.NSGAIISampler(
        seed=seed, population_size=max(10, min(50, trials // 10))
    ),
    "random": lambda seed, trials: optuna.samplers.RandomSampler(seed=seed),
}
TPE_MAX_KNOB_TRIALS_PER_WORKER = 8000  # knobs x trials x workers (benchmarks/sampler.py)
TPE_MAX_SHARE = 0.05  # of a worker's evaluation time that TPE's asks may cost (auto)


def objective_values(dirs: list[str], size: int, metric: float) -> list[float]:
    if len(dirs) == 2:
        return [size, metric]
    return [size] if dirs == ["minimize"] else [metric]


def best_key(budget: Budget) -> Callable[[dict], tuple]:
    """Best within budget: the smallest model keeping the floor, else the best metric."""
    if budget.metric_floor is not None:
        return lambda row: (-row["size_bytes"], row["metric"])
    return lambda row: (row["metric"], -row["size_bytes"])


def auto_sampler(knobs: int, trials: int, workers: int = 2,
                 eval_seconds: float | None = None) -> str:  # fmt: skip
    """TPE learns the most per trial, but its ask cost grows with knobs and history
    (7-30 ms here up to 40 knobs x 300 trials: benchmarks/sampler.py), and the driver
    must ask once per finished evaluation of every worker. So TPE while knobs x trials x
    workers <= 8,000 (with 2 workers: knobs x trials <= 4,000), or while its last asks
    would cost at most 5% of the time a worker takes per evaluation (`eval_seconds`, the
    base model's, when known: a 1.7-s MiniLM evaluation affords TPE at 42 knobs x 100
    trials, a 5-ms digits one does not); NSGA-II (under 5 ms) beyond, so that sampling
    never leaves workers idle."""
    workers = max(1, workers)
    if knobs * trials * workers <= TPE_MAX_KNOB_TRIALS_PER_WORKER:
        return "tpe"
    affordable = eval_seconds is not None and tpe_ask_seconds(knobs, trials) * workers <= (
        TPE_MAX_SHARE * eval_seconds
    )
    return "tpe" if affordable else "nsga2"


def tpe_ask_seconds(knobs: int, trials: int) -> float:
    """A multivariate TPE ask at `trials` of history, from benchmarks/sampler.py (7 ms at
    10 x 60, 30 ms at 40 x 300) and a 42 x 100 / 42 x 300 / 100 x 300 check (13 / 20-38
    / 40 ms; single- and multi-objective alike): linear in knobs x trials, on the high side."""
    return 0.0025 + 2.5e-6 * knobs * trials


def distribution(knob: Knob) -> BaseDistribution:
    choices = knob.choices
    steps = {round(b - a, 9) for a, b in zip(choices, choices[1:], strict=False)}
    if knob.kind == "keep" and len(steps) == 1:  # an even grid: let the sampler see the order
        return FloatDistribution(choices[0], choices[-1], step=steps.pop())
    return CategoricalDistribution(choices)


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    study: str
    study_dir: Path
    trials: pd.DataFrame
    front: pd.DataFrame
    base_metric: float
    base_size: int
    sampler: str
    interrupted: bool
    seconds: float
    error: str | None = None  # why the run stopped early, if it did
    driver: dict[str, float] = field(default_factory=dict)  # DriverStats.as_dict()

    smallest_first: bool = False  # a metric floor: best is the smallest model keeping it

    def best_within_budget(self) -> pd.Series | None:
        if self.front.empty:
            return None
        if self.smallest_first:
            return self.front.sort_values(["size_bytes", "metric"], ascending=[True, False]).iloc[0]
        return self.front.sort_values(["metric", "size_bytes"], ascending=[False, True]).iloc[0]


@dataclass
class _Candidate:
    trial: Trial
    policy: Policy
    cost: Cost
    feasible: bool
    origin: str  # sampler | baseline (uniform) | seed (knapsack) | repair | local | requeued
    duplicates: list[Trial] = field(default_factory=list)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("prunesearch", "torch", "ray", "optuna", "pandas", "pyarrow", "scikit-learn"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def fidelity_settings(prepared: Prepared, *, custom_evaluator: bool) -> FidelitySettings | None:
    """Multi-fidelity evaluation, if on: `auto` means on with the task's default accuracy
    metric (whose range [0, 1] the bound needs)."""
    from orchestrator.batches import accuracy

    config = prepared.config.fidelity
    enabled = config.enabled
    if enabled == "auto":
        enabled = prepared.task.metric is accuracy and not custom_evaluator
    if not enabled:
        return None
    return FidelitySettings(steps=config.steps, error_rate=config.error_rate,
                            metric_range=config.metric_range)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Guidance:
    """What the sensitivity phase tells the driver: seeds to evaluate after the baselines,
    and the estimated metric loss of every knob value (repairs and local moves)."""

    seeds: tuple[dict[str, Any], ...] = ()
    loss: LossModel | None = None  # None: the quantization-noise prior


class Driver:
    def __init__(self, prepared: Prepared, pool: Any, *, sampler: str, quiet: bool,
                 fidelity: FidelitySettings | None = None,
                 guidance: Guidance = Guidance()) -> None:  # fmt: skip
        self.p, self.pool = prepared, pool
        self.space: SearchSpace = prepared.space
        self.target = prepared.config.trials
        self.sampler_name = sampler
        self.quiet = quiet
        self.distributions = {k.name: distribution(k) for k in self.space.searchable}
        self.fixed = self.space.fixed_values
        self.cache: dict[str, tuple[int, dict[str, Any]]] = {}  # policy hash -> (trial, result)
        self.inflight: dict[str, _Candidate] = {}  # policy hash -> candidate at a worker
        self.by_trial: dict[int, _Candidate] = {}
        self.failures_in_a_row = 0
        self.evaluated_ok = 0
        self.interrupted = False
        self.error: str | None = None
        self.last_error: str | None = None
        self.best_row: dict[str, Any] | None = None  # the best feasible complete trial
        self.stats = DriverStats()
        self.seeds = list(guidance.seeds)
        self.pricing = Pricing(self.space, prepared.budget)
        self.mover = Mover(self.pricing, guidance.loss or LossModel.prior(self.space))
        # objective budget: every other ask once the first candidates are done is a local
        # move from the incumbent, fewer once they stop paying (issue 12); seeded, so a
        # run repeats with its seed
        self.local_search = (prepared.config.local_search and prepared.config.objective == "budget"
                             and bool(prepared.budget.limits))  # fmt: skip
        self.local_share = LocalShare()
        self.rng = random.Random(prepared.config.seed)
        self.params_of: dict[str, dict[str, Any]] = {}  # policy hash -> params as asked
        self.asks = self.infeasible = 0
        self.fidelity = fidelity
        self.front_points: list[tuple[int, float]] = []  # feasible complete (size, metric)
        self.fidelity_seen: list[float] = []  # fidelity of every evaluation by a worker
        self.directions = prepared.config.directions
        self.best_key = best_key(prepared.budget)
        self.worker_seconds = {True: 0.0, False: 0.0}  # by feasibility of the candidate
        self.driver_id = new_driver_id()
        self.known: set[int] = set()  # storage numbers of the study's trials in self.study
        self.adopted = 0  # trials other drivers of a shared study finished during this run

    # -- set-up -----------------------------------------------------------------------
    def open(self) -> None:
        p = self.p
        p.study_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(p.study_dir, 0o700)  # the study is the user's alone
        url = study_storage(p.config.storage, p.study_dir)
        opened = open_study(url, p.study, self.directions, resume=p.resume, join=p.join)
        sampler = TimedSampler(SAMPLERS[self.sampler_name](p.config.seed, self.target), self.stats)
        self.study = optuna.create_study(directions=self.directions, sampler=sampler,
                                         study_name=p.study)  # fmt: skip
        self.study.add_trials(opened.finished)  # numbered 0, 1, ... here
        self.known = {trial.number for trial in opened.finished}
        self._reconcile(opened)
        self.recorder = Recorder(url, p.study, p.study_dir, driver_id=self.driver_id,
                                 shared=p.join, remote=p.mirror.uri if p.mirror else None)  # fmt: skip
        for local, trial in enumerate(opened.finished):
            self.recorder.foreign(local, trial.number)
        self.finished = len(opened.finished)
        self.issued = self.finished
        self.requeue = [(params, "requeued") for params in opened.requeue]
        if opened.created:  # a joining driver finds them queued by the study's first one
            first = (baselines(self.pricing, within_budget=p.config.objective == "budget")
                     if p.config.baselines else [])  # fmt: skip
            first = [(params, "baseline") for params in first]
            first += [
                (params, "seed") for params in self.seeds if params not in [f for f, _ in first]
            ]
            self.requeue += first[: max(0, self.target - self.finished)]

    def _reconcile(self, opened: Any) -> None:
        """Rows for finished trials the Parquet files lack (a crash between the two writes;
        a live driver's recorder writes its own), and the evaluation cache from every
        completed trial."""
        sink = ResultSink(self.p.study_dir)
        for local, trial in enumerate(opened.finished):
            row = trial.user_attrs.get(ROW_ATTR) or self._row_of_interrupted(trial)
            if trial.system_attrs.get(OWNER_ATTR) not in opened.live:
                sink.add(row)
            if row["state"] == "COMPLETE" and row["cached_from"] is None:
                self.params_of[row["policy_hash"]] = dict(trial.params)
                self._remember(row, local=local)
        sink.flush()

    def _row_of_interrupted(self, trial: FrozenTrial) -> dict[str, Any]:
        policy = Policy.from_values(self.space, {**self.fixed, **trial.params})
        return self._row(trial.number, "FAIL", policy, policy_cost(self.space, policy),
                         feasible=True, result={"error": trial.user_attrs.get("error", INTERRUPTED)})  # fmt: skip

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        """Feed every free worker, then wait for the next result; while every worker is
        busy, ask candidates ahead just in time for the evaluations expected to finish
        (issue 6: a freed worker is fed at once, without waiting for a sampler ask)."""
        start = time.perf_counter()
        self.ready: list[_Candidate] = []  # asked, priced, new: waiting for a worker
        self.sent: dict[int, float] = {}  # trial -> when its evaluation was sent
        self.eval_estimate: float | None = None  # seconds per evaluation (moving average)
        self.ask_estimate = 0.0  # seconds per ask (moving average)
        with Progress(total=self.target, initial=self.finished, quiet=self.quiet) as bar:
            self.bar = bar
            try:
                while not self._give_up():
                    self._adopt()
                    self._feed()
                    if not self.pool.busy:
                        break
                    bar.update_status(self.pool.busy, self.pool.size, self._best())
                    ahead = self._ask_ahead_in()
                    done = self._collect(timeout=min(0.2, ahead))
                    for job, result in done:
                        self._complete(self.by_trial.pop(job.trial), job, result)
                    if not done and ahead <= 0:
                        self._ask()
                bar.update_status(self.pool.busy, self.pool.size, self._best())
            except KeyboardInterrupt:
                self.interrupted = True
        self.stats.loop_seconds = time.perf_counter() - start
        self.recorder.close()
        self.stats.drain_seconds = self.recorder.drain_seconds

    def _adopt(self) -> None:
        """Trials other drivers of a shared study finished: the sampler learns from them,
        the cache answers their policies, and they count toward the study's trials."""
        for trial in self.recorder.adopted():
            if trial.number in self.known:
                continue
            self.known.add(trial.number)
            local = self.study._storage.get_n_trials(self.study._study_id)
            self.study.add_trial(trial)
            self.recorder.foreign(local, trial.number)
            row = trial.user_attrs.get(ROW_ATTR)
            if row and row["state"] == "COMPLETE" and row["cached_from"] is None:
                self.params_of[row["policy_hash"]] = dict(trial.params)
                self._remember(row, local=local)
            self.finished += 1
            self.issued += 1
            self.adopted += 1
            self.bar.advance()

    def _give_up(self) -> bool:
        """A task that fails every evaluation stops the run instead of burning the budget."""
        if self.evaluated_ok or self.failures_in_a_row < max(5, 2 * self.pool.size):
            return False
        self.error = (f"stopped early: the first {self.failures_in_a_row} evaluations all failed; "
                      f"last error: {self.last_error}")  # fmt: skip
        return True

    def _collect(self, *, timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        """Finished evaluations, waiting up to `timeout` for the first. Each freed worker
        takes a ready candidate at once, and results that arrive meanwhile are collected
        (their workers fed too) before any is told: a burst of results is dispatched
        first, told after."""
        waited = time.perf_counter()
        done = self.pool.wait(timeout=timeout)
        self.stats.wait_seconds += time.perf_counter() - waited
        more = done
        while more:
            self._feed(ask=False)
            more = self.pool.wait(timeout=0)
            done += more
        return done

    def _feed(self, *, ask: bool = True) -> None:
        """Every free worker gets a ready candidate, or (ask) one asked now."""
        while self.pool.free:
            if self.ready:
                self._submit(self.ready.pop(0))
            elif ask and self.issued < self.target:
                self._ask()
            else:
                return

    def _ask_ahead_in(self) -> float:
        """Seconds until the next candidate should be asked ahead (0: now). One is always
        ready, so a freed worker never waits for the sampler (and the ask time is known
        before it matters). Beyond that, just in time: each running evaluation is expected
        to end one average evaluation after it was sent; the j-th to end needs the j-th
        ready candidate, so asking starts as long before it as the missing candidates
        take, plus one, at twice the average ask (asks vary with load and grow with the
        history). Evaluations of equal length end in bursts (a large cluster started at
        once): the burst's candidates are asked before it, while the driver is idle, not
        one after another as workers free up. Before the first result every evaluation
        may end now; the sampler knows nothing yet either, so asking early costs nothing."""
        if self.issued >= self.target or not self.sent:
            return math.inf
        if not self.ready:
            return 0.0
        now, have = time.monotonic(), len(self.ready)
        ends = sorted(sent + (self.eval_estimate or 0.0) for sent in self.sent.values())
        return max(0.0, min((end - now - 2 * (j - have + 1) * self.ask_estimate
                             for j, end in enumerate(ends, 1) if j > have), default=math.inf))  # fmt: skip

    def _ask(self) -> None:
        """Ask one candidate: recorded at once if over budget or already evaluated, else
        ready for the next free worker."""
        asked = time.perf_counter()
        origin = "sampler"
        if not self.requeue:
            self._local_move()
        if self.requeue:
            params, origin = self.requeue.pop(0)
            self.study.enqueue_trial(params, skip_if_exists=False)
        trial = self.study.ask(self.distributions)
        policy = Policy.from_values(self.space, {**self.fixed, **trial.params})
        self.params_of.setdefault(policy.hash, dict(trial.params))
        cost = policy_cost(self.space, policy)
        violations = self.p.budget.violations(cost)
        for key, excess in violations.items():
            trial.set_constraint(key, excess)
        feasible = all(v <= 0 for v in violations.values())
        candidate = _Candidate(trial, policy, cost, feasible, origin)
        self.asks += 1
        self.infeasible += not feasible
        self.issued += 1
        # pickled at once by the recorder: a snapshot of the trial as asked
        self.recorder.created(self.study._storage.get_trial(trial._trial_id))
        if not candidate.feasible:
            self._tell(candidate, trial, "INFEASIBLE", {})
            repaired = self.mover.repair(trial.params) if self.p.config.repair else None
            if repaired is not None:  # next: the nearest candidate within the budget
                self.requeue.insert(0, (repaired, "repair"))
        elif policy.hash in self.cache:
            number, row = self.cache[policy.hash]
            self._tell(candidate, trial, "COMPLETE", {**row, "cached_from": number,
                                                      "eval_seconds": 0.0, "rebuild_seconds": 0.0,
                                                      "recovery_seconds": 0.0})  # fmt: skip
        elif policy.hash in self.inflight:  # running or ready: its result serves both
            self.inflight[policy.hash].duplicates.append(trial)
        else:
            self.inflight[policy.hash] = candidate
            self.ready.append(candidate)
        self.ask_estimate += 0.3 * (time.perf_counter() - asked - self.ask_estimate)

    def _submit(self, candidate: _Candidate) -> None:
        from orchestrator.workers import Job

        number = candidate.trial.number
        self.by_trial[number] = candidate
        context = None
        # a baseline is scored in full: the answer must never be worse than it (issue 12)
        if self.fidelity is not None and candidate.origin != "baseline":
            # the front as it stands now, not when it was asked
            context = {"size": candidate.cost.size_bytes, "front": self._to_beat(),
                       "fidelity": self.fidelity}  # fmt: skip
        self.sent[number] = time.monotonic()
        self.pool.submit(Job(trial=number, policy=dict(candidate.policy), context=context))

    def _complete(self, candidate: _Candidate, job: Any, result: dict[str, Any]) -> None:
        del self.inflight[candidate.policy.hash]
        self.sent.pop(job.trial, None)
        if "error" not in result and "seconds" in result:  # for asking ahead in time
            seconds, old = result["seconds"], self.eval_estimate
            self.eval_estimate = seconds if old is None else old + 0.2 * (seconds - old)
        self.worker_seconds[candidate.feasible] += result.get("seconds", 0.0)
        result = {**result, "attempt": job.attempt}
        state = "FAIL" if "error" in result else "PRUNED" if result.get("pruned") else "COMPLETE"
        if state != "FAIL":
            self.fidelity_seen.append(result.get("fidelity") or 1.0)
        self.failures_in_a_row = self.failures_in_a_row + 1 if state == "FAIL" else 0
        self.evaluated_ok += state == "COMPLETE"
        self.last_error = result.get("error")
        row = self._tell(candidate, candidate.trial, state, result)
        if state == "COMPLETE":
            self._remember(row)
        for trial in candidate.duplicates:
            cached = {**result, "cached_from": row["trial"], "eval_seconds": 0.0,
                      "rebuild_seconds": 0.0, "recovery_seconds": 0.0}  # fmt: skip
            self._tell(candidate, trial, state, cached)

    def _tell(self, candidate: _Candidate, trial: Trial, state: str, result: dict) -> dict:
        budget = self.p.budget
        metric = result.get("metric") if state in ("COMPLETE", "PRUNED") else None
        feasible = candidate.feasible and (state != "COMPLETE" or budget.keeps(metric))
        row = self._row(trial.number, state, candidate.policy, candidate.cost,
                        feasible=feasible, result=result, origin=candidate.origin)  # fmt: skip
        if state in ("FAIL", "PRUNED"):
            if state == "PRUNED" and len(self.directions) == 1:
                # the prefix it was stopped on, as an intermediate report (Optuna's pruning
                # record; multi-objective studies have none)
                trial.report(metric, step=round(100 * row["fidelity"]))
            frozen = self.study.tell(trial, state=TrialState[state])
        else:
            if budget.metric_floor is not None:  # known only now: set before tell
                trial.set_constraint("metric", budget.metric_violation(metric))
            values = objective_values(self.directions, candidate.cost.size_bytes,
                                      INFEASIBLE_METRIC if metric is None else metric)  # fmt: skip
            frozen = self.study.tell(trial, values)
        self.recorder.finished(frozen, row)
        self.finished += 1
        self.stats.trials += 1
        self.bar.advance()
        return row

    def _row(self, number: int, state: str, policy: Policy, cost: Cost, *, feasible: bool,
             result: dict[str, Any], origin: str | None = None) -> dict[str, Any]:  # fmt: skip
        # a PRUNED row keeps the metric of the prefix it was stopped on (see `fidelity`)
        metric = result.get("metric") if state in ("COMPLETE", "PRUNED") else None
        return {
            "study": self.p.study, "trial": number, "state": state, "metric": metric,
            **cost.as_dict(), "feasible": feasible, "policy": policy.to_json(),
            "policy_hash": policy.hash, "fidelity": result.get("fidelity"),
            "eval_seconds": result.get("eval_seconds"),
            "rebuild_seconds": result.get("rebuild_seconds"),
            "recovery_seconds": result.get("recovery_seconds"),
            "worker": result.get("worker"), "node": result.get("node"),
            "attempt": result.get("attempt", 0), "error": result.get("error"),
            "cached_from": result.get("cached_from"), "origin": origin, "finished_at": _now(),
        }  # fmt: skip

    def _best(self) -> tuple[float, int] | None:
        row = self.best_row
        return None if row is None else (row["metric"], row["size_bytes"])

    def _to_beat(self) -> list[tuple[int, float]]:
        """What a candidate must be able to reach to matter, as (size, metric) points for
        the early-stopping test: the front (objective front); the metric floor, or the best
        metric within the budget so far (objective budget; any size)."""
        if self.p.config.objective == "front":
            return list(self.front_points)
        floor = self.p.budget.metric_floor
        if floor is not None:
            return [(0, floor)]
        return [(0, self.best_row["metric"])] if self.best_row is not None else []

    def _local_move(self) -> None:
        """In budget mode, once there is an incumbent, every other ask (fewer once they stop
        paying: LocalShare) is a local move from it, queued with origin `local`."""
        if not self.local_search or self.best_row is None:
            return
        incumbent = self.params_of.get(self.best_row["policy_hash"])
        if incumbent is None or not self.local_share.turn():
            return
        moved = self.mover.local_move(incumbent, self.rng, self._seen)
        if moved is not None:
            self.requeue.append((moved, "local"))

    def _seen(self, policy_hash: str) -> bool:
        return policy_hash in self.cache or policy_hash in self.inflight

    def summary(self) -> dict[str, Any]:
        """This run's figures for run.json: how much sampling and worker time went where."""
        spent = sum(self.worker_seconds.values())
        return {
            "finished_at": _now(), "finished_trials": self.finished,
            "interrupted": self.interrupted, "error": self.error,
            "asks": self.asks, "infeasible_asks": self.infeasible,
            "infeasible_share": self.infeasible / self.asks if self.asks else 0.0,
            "worker_seconds": spent,
            "worker_seconds_feasible_share": self.worker_seconds[True] / spent if spent else 1.0,
            "multi_fidelity": self.fidelity is not None,
            "validation_share_saved": (1 - sum(self.fidelity_seen) / len(self.fidelity_seen)
                                       if self.fidelity_seen else 0.0),  # fmt: skip
            "driver": self.stats.as_dict(), "driver_id": self.driver_id,
            "adopted_trials": self.adopted,
        }  # fmt: skip

    def _remember(self, row: dict[str, Any], *, local: int | None = None) -> None:
        """Cache a completed evaluation under its trial number here (`local`: a trial
        loaded or adopted from the storage, whose row has the storage's number)."""
        self.cache[row["policy_hash"]] = (row["trial"] if local is None else local, row)
        if row["feasible"]:
            point = (row["size_bytes"], row["metric"])
            if not any(s <= point[0] and m >= point[1] for s, m in self.front_points):
                self.front_points = [(s, m) for s, m in self.front_points
                                     if not (point[0] <= s and point[1] >= m)] + [point]  # fmt: skip
        if row["feasible"] and (self.best_row is None
                                or self.best_key(row) > self.best_key(self.best_row)):  # fmt: skip
            self.best_row = row
            self.local_share.improved()


@contextlib.contextmanager
def _run_json_locked(prepared: Prepared) -> Iterator[Path]:
    """run.json, locked: the drivers of a shared study each add and update their entry
    (an exclusive flock on a lock file beside it; the write itself stays atomic). In a
    bucket, other machines' drivers may have changed it: fetched again first."""
    import fcntl

    with open(prepared.study_dir / ".run.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if prepared.mirror is not None and prepared.join:
            prepared.mirror.refresh("run.json")
        yield prepared.study_dir / "run.json"


def write_run_json(prepared: Prepared, *, sampler: str, base_metric: float | None,
                   workers: list[dict[str, Any]], driver_id: str = "") -> None:  # fmt: skip
    run = {"started_at": _now(), "trials": prepared.config.trials, "sampler": sampler,
           "resume": prepared.resume, "join": prepared.join, "driver_id": driver_id,
           "workers": workers}  # fmt: skip
    config = {**prepared.config.to_dict(), "study": prepared.study}
    with _run_json_locked(prepared) as path:
        previous = json.loads(path.read_text()) if path.is_file() else {}
        atomic_write_json(path, {
            "format": "prunesearch-study/1",
            "study": prepared.study,
            "created_at": previous.get("created_at", _now()),
            "config": config,
            "versions": versions(),
            "sampler": sampler,
            "objective": prepared.config.objective,
            "directions": prepared.config.directions,
            "budget": {**prepared.budget.limits, "metric_floor": prepared.budget.metric_floor},
            "space": prepared.space.to_dict(),
            "base": {**prepared.base_cost.as_dict(), "metric": base_metric},
            "runs": [*previous.get("runs", []), run],
        })  # fmt: skip
    publish(prepared)


def finish_run_json(prepared: Prepared, summary: dict[str, Any]) -> None:
    """Add this run's figures (feasibility shares, driver timings) to its run.json entry."""
    with _run_json_locked(prepared) as path:
        data = json.loads(path.read_text())
        mine = [run for run in data["runs"] if run.get("driver_id") == summary["driver_id"]]
        (mine or data["runs"])[-1].update(summary)
        atomic_write_json(path, data)
    publish(prepared)


def publish(prepared: Prepared) -> None:
    """Upload what changed in the staging directory of a study whose `out` is a URI (the
    recorder uploads the Parquet files as it flushes them)."""
    if prepared.mirror is None:
        return
    try:
        prepared.mirror.push()
    except OSError as exc:
        text = " ".join(str(exc).split())[:300]
        raise ResultsError(f"uploading the study to {prepared.mirror.uri} failed ({text}); its "
                           f"files are in {prepared.study_dir}") from None  # fmt: skip


def _guidance(prepared: Prepared, pool: Any, base_metric: float, *, quiet: bool) -> Guidance:
    """Sensitivity table (cached), the loss model it gives, and the seeds: under a budget
    the knapsack's policies at the budget's edge (orchestrator.proposals), else the
    knapsack's sweep of size budgets, those within the budget."""
    from orchestrator.sensitivity import seed_policies, table_for, write_table

    if not quiet:
        print("sensitivity analysis (cached per task and space) ...", file=sys.stderr)
    config, space = prepared.config, prepared.space
    table = table_for(config.task, space, config.recovery.model_dump(), pool, base_metric)
    prepared.study_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(prepared.study_dir, 0o700)  # the study is the user's alone (as Driver.open)
    write_table(table, prepared.study_dir / "sensitivity.parquet")
    loss = LossModel.from_table(space, table, base_metric)
    pricing = Pricing(space, prepared.budget)
    if prepared.budget.limits:
        return Guidance(seeds=tuple(budget_seeds(Mover(pricing, loss))), loss=loss)
    seeds = [params for params in seed_policies(space, table, base_metric)
             if pricing.excess(params) <= 0]  # fmt: skip
    return Guidance(seeds=tuple(seeds), loss=loss)


def _resumed_guidance(prepared: Prepared, base_metric: float) -> Guidance:
    """The loss model of the sensitivity table a resumed study recorded (its seeds were
    evaluated before); none (the prior) if it has no readable table."""
    from orchestrator.sensitivity import cached_table

    table = cached_table(prepared.study_dir / "sensitivity.parquet")
    if table is None:
        return Guidance()
    return Guidance(loss=LossModel.from_table(prepared.space, table, base_metric))


def _ray_init(config: SearchConfig) -> bool:
    """Connect to Ray: the cluster at `address`, or a new local one (bound to 127.0.0.1, no
    dashboard), unless this process is connected already. Returns whether to disconnect."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": "ERROR", "configure_logging": True}
    if config.address is not None:
        try:
            ray.init(address=config.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkerStartError(f"cannot connect to Ray at '{config.address}': {first}; start "
                                   "it with `ray start --head` or check --address") from None  # fmt: skip
        return True
    w = config.workers
    cpus = os.cpu_count() or 1
    if w.count != "auto":
        cpus = max(cpus, math.ceil(w.count * w.cpus_per_worker))
    # Ray on Linux swaps 127.0.0.1 for the machine's outward address and then listens on
    # every interface; with its single-machine mode (its default on macOS and Windows)
    # every port binds the loopback, so nothing on the network can send it work. Only
    # for this call: the flag also picks the driver's address when joining a cluster.
    import ray._private.ray_constants as ray_constants

    previous, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", object_store_memory=200 * 2**20, **quiet)  # fmt: skip
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
    return True


def worker_count(config: SearchConfig) -> int:
    """`workers.count`, or for auto what the cluster holds now (pool.target for later)."""
    import ray

    w = config.workers
    if w.count != "auto":
        return w.count
    return target_workers(w, ray.cluster_resources())


def target_workers(w: Any, resources: dict[str, float]) -> int:
    """auto: one worker per `gpus_per_worker` GPUs where the cluster has GPUs, else one per
    `cpus_per_worker` CPUs."""
    gpus = w.gpus(resources.get("GPU", 0))
    if gpus > 0:
        return max(1, int(resources.get("GPU", 0) / gpus + 1e-9))
    return max(1, int(resources.get("CPU", 1) / w.cpus_per_worker + 1e-9))


def run_search(config: SearchConfig, *, resume: bool = False, join: bool = False,
               quiet: bool = True, evaluator_factory: Any = None,
               sys_path: tuple[str, ...] = ()) -> SearchResult:  # fmt: skip
    """Run (or resume, or join) a search. Validates everything before Ray starts
    (ConfigError)."""
    prepared = prepare(config, resume=resume, join=join)
    return run_prepared(prepared, quiet=quiet, evaluator_factory=evaluator_factory,
                        sys_path=sys_path)  # fmt: skip


@contextlib.contextmanager
def worker_pool(config: SearchConfig, space: SearchSpace, *, evaluator_factory: Any = None,
                sys_path: tuple[str, ...] = ()) -> Iterator[tuple[Any, list[dict[str, Any]]]]:  # fmt: skip
    """Started workers (and a local Ray if none is running), shut down on exit."""
    import ray

    from orchestrator.evaluate import RecoverySettings
    from orchestrator.workers import PoolSettings, TaskEvaluatorFactory, WorkerPool

    started_ray = _ray_init(config)
    pool = None
    try:
        factory = evaluator_factory or TaskEvaluatorFactory(
            config.task, space, RecoverySettings(**config.recovery.model_dump())
        )
        w = config.workers
        elastic = w.count == "auto"
        settings = PoolSettings(
            count=worker_count(config), cpus_per_worker=w.cpus_per_worker,
            gpus_per_worker=w.gpus(ray.cluster_resources().get("GPU", 0)), device=w.device,
            retries=config.retries, sys_path=tuple(sys_path) or (os.getcwd(),),
            timeout=config.timeout,
            target=(lambda: target_workers(w, ray.cluster_resources())) if elastic else None,
        )  # fmt: skip
        pool = WorkerPool(factory, settings)
        infos = pool.start()
        yield pool, infos
    finally:
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()


def run_prepared(prepared: Prepared, *, quiet: bool = True, evaluator_factory: Any = None,
                 sys_path: tuple[str, ...] = ()) -> SearchResult:  # fmt: skip
    config = prepared.config
    started = time.monotonic()
    with worker_pool(config, prepared.space, evaluator_factory=evaluator_factory,
                     sys_path=sys_path) as (pool, infos):  # fmt: skip
        timed = time.perf_counter()
        base_metric = pool.base_metric()
        eval_seconds = time.perf_counter() - timed  # one evaluation, and a Ray round trip
        sampler = config.sampler
        if sampler == "auto":  # by knobs, trial budget, workers started and evaluation time
            sampler = auto_sampler(len(prepared.space.searchable), config.trials, pool.size,
                                   eval_seconds)  # fmt: skip
        fidelity = fidelity_settings(prepared, custom_evaluator=evaluator_factory is not None)
        guidance = Guidance()
        if config.seeding and not prepared.resume:
            guidance = _guidance(prepared, pool, base_metric, quiet=quiet)
        elif config.seeding:  # resumed: the study's own table still steers repairs and moves
            guidance = _resumed_guidance(prepared, base_metric)
        driver = Driver(prepared, pool, sampler=sampler, quiet=quiet, fidelity=fidelity,
                        guidance=guidance)  # fmt: skip
        driver.open()
        write_run_json(prepared, sampler=sampler, base_metric=base_metric, workers=infos,
                       driver_id=driver.driver_id)  # fmt: skip
        try:
            driver.run()
        finally:
            finish_run_json(prepared, driver.summary())
    trials = read_trials(prepared.study_dir)
    return SearchResult(study=prepared.study, study_dir=prepared.study_dir, trials=trials,
                        front=compute_front(trials), base_metric=base_metric,
                        base_size=prepared.base_cost.size_bytes, sampler=sampler,
                        interrupted=driver.interrupted, seconds=time.monotonic() - started,
                        error=driver.error, driver=driver.stats.as_dict(),
                        smallest_first=prepared.budget.metric_floor is not None)  # fmt: skip


__all__ = ["SearchResult", "auto_sampler", "prepare", "run_prepared", "run_search"]
