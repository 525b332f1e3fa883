"""The proposer: what the driver evaluates next, and when to ask it (issue 13).

In order of precedence: a resumed study's interrupted trials, then (a new study) the
uniform baselines and the sensitivity phase's seeds, the repair of each over-budget ask
right after it, in budget mode local moves from the incumbent, else the Optuna sampler.
The pure parts (pricing, repair, moves, baselines, seeds) are in orchestrator.proposals;
this holds the queue, the counts and the ask-ahead timing.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import Trial

from orchestrator.latency import LatencyModel
from orchestrator.prepare import Prepared
from orchestrator.proposals import LocalShare, LossModel, Mover, Pricing, baselines
from search_spaces import Knob
from search_spaces.cost import Cost, policy_cost
from search_spaces.kinds import kind_of, reference_values
from search_spaces.policy import Policy


@dataclass
class Candidate:
    trial: Trial
    policy: Policy
    cost: Cost
    feasible: bool
    origin: str  # sampler | baseline (uniform) | seed (knapsack) | repair | local | requeued
    # asks of the same policy while this one is in flight (each keeps its own origin)
    duplicates: list[Candidate] = field(default_factory=list)
    latency_predicted: float | None = None  # ms, with a latency limit (orchestrator/latency.py)


@dataclass(frozen=True, kw_only=True)
class Guidance:
    """What the sensitivity phase tells the driver: seeds to evaluate after the baselines,
    and the estimated metric loss of every knob value (repairs and local moves)."""

    seeds: tuple[dict[str, Any], ...] = ()
    loss: LossModel | None = None  # None: the quantization-noise prior


class Record(Protocol):
    """What the proposer reads of the ledger (orchestrator.ledger.Ledger)."""

    loaded: int  # trials the study held when it was opened
    adopted: int  # trials other drivers of a shared study finished since
    improvements: int  # how often the incumbent got better

    def incumbent(self) -> dict[str, Any] | None: ...  # params of the best within budget

    def evaluated(self, policy_hash: str) -> bool: ...


class Flight(Protocol):
    """What the proposer reads of the dispatcher (orchestrator.dispatcher.Dispatcher)."""

    def holds(self, policy_hash: str) -> bool: ...  # ready or at a worker


def distribution(knob: Knob) -> BaseDistribution:
    choices = knob.choices
    steps = {round(b - a, 9) for a, b in zip(choices, choices[1:], strict=False)}
    if kind_of(knob).ordered_grid and len(steps) == 1:  # an even grid: the sampler sees the order
        return FloatDistribution(choices[0], choices[-1], step=steps.pop())
    return CategoricalDistribution(choices)


class Proposer:
    def __init__(self, prepared: Prepared, study: optuna.Study, *, record: Record,
                 flight: Flight, guidance: Guidance = Guidance(),
                 requeue: Sequence[Mapping[str, Any]] = (), first: bool = True,
                 base_latency: float | None = None, latency_table: Any = None,
                 latency_anchors: Sequence[tuple[Mapping[str, Any], float]] = ()) -> None:  # fmt: skip
        """`requeue`: params of a resumed study's interrupted trials; `first`: this driver
        created the study, so it queues the baselines and seeds (a joining one does not);
        `base_latency`: the unchanged model's, measured by a worker (a latency limit);
        `latency_table`: the per-layer table the predictor prices layers with;
        `latency_anchors`: (policy values, ms) measured beside the base (W8A8)."""
        config, space = prepared.config, prepared.space
        self.study, self.record, self.flight = study, record, flight
        self.target = config.trials
        self.distributions = {k.name: distribution(k) for k in space.searchable}
        self.latency = (LatencyModel(space, latency_table)
                        if prepared.budget.latency_ms is not None else None)  # fmt: skip
        if self.latency is not None and base_latency is not None:  # the unchanged model's
            self.latency.observe(Policy.from_values(space, reference_values(space.knobs)),
                                 base_latency)  # fmt: skip
            for values, measured in latency_anchors:
                self.latency.observe(Policy.from_values(space, values), measured)
        self.pricing = Pricing(space, prepared.budget, self.latency)
        self.mover = Mover(self.pricing, guidance.loss or LossModel.prior(space))
        self.repairs = config.repair
        # objective budget: every other ask once the first candidates are done is a local
        # move from the incumbent, fewer once they stop paying (issue 12); seeded, so a
        # run repeats with its seed
        self.local_search = (config.local_search and config.objective == "budget"
                             and prepared.budget.priced)  # fmt: skip
        self.local_share = LocalShare()
        self.improvements = 0  # the record's, when local_share last heard of them
        self.rng = random.Random(config.seed)
        self.asks = self.infeasible = 0
        self.ask_estimate = 0.0  # seconds per ask (moving average)
        self.queue = [(dict(params), "requeued") for params in requeue]
        if first:
            self.queue += self._first(config.baselines, config.objective, guidance.seeds)

    def _first(self, uniform: bool, objective: str,
               seeds: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:  # fmt: skip
        """The baselines, then the seeds that are not baselines, as many as trials remain."""
        first = baselines(self.pricing, within_budget=objective == "budget") if uniform else []
        queued = [(params, "baseline") for params in first]
        queued += [(params, "seed") for params in seeds if params not in first]
        return queued[: max(0, self.target - self.record.loaded)]

    @property
    def issued(self) -> int:
        """Trials of the study asked or finished: the loaded, the adopted, this run's asks."""
        return self.record.loaded + self.record.adopted + self.asks

    def ask(self) -> Candidate:
        """The next candidate, asked from the study (queued params enqueued first), priced
        and constrained by the budget."""
        origin = "sampler"
        if not self.queue:
            self._local_move()
        if self.queue:
            params, origin = self.queue.pop(0)
            self.study.enqueue_trial(params, skip_if_exists=False)
        trial = self.study.ask(self.distributions)
        policy = self.pricing.policy(trial.params)
        cost = policy_cost(self.pricing.space, policy)
        violations = self.pricing.budget.violations(cost)
        predicted = self.pricing.predicted_latency(policy)
        # over the limit beyond the predictor's typical error (else a worker measures it)
        over = self.pricing.budget.latency_violation(
            None if predicted is None else predicted / (1 + self.latency.margin))
        for key, excess in violations.items():
            trial.set_constraint(key, excess)
        feasible = all(v <= 0 for v in violations.values()) and over <= 0
        if self.pricing.budget.latency_ms is not None and not feasible:
            trial.set_constraint("latency", over)  # never measured; else set when told
        self.asks += 1
        self.infeasible += not feasible
        return Candidate(trial, policy, cost, feasible, origin, latency_predicted=predicted)

    def measured(self, candidate: Candidate, result: Mapping[str, Any]) -> None:
        """A worker's result: its measured latency teaches the predictor."""
        if self.latency is not None:
            self.latency.observe(candidate.policy, result.get("latency_ms"),
                                 candidate.latency_predicted)  # fmt: skip

    def learn(self, policy_json: str | None, latency_ms: float | None) -> None:
        """A recorded trial's latency (a resumed study's)."""
        if self.latency is not None and policy_json and latency_ms is not None:
            self.latency.observe(Policy.from_json(self.pricing.space, policy_json), latency_ms)

    def repair(self, candidate: Candidate) -> None:
        """Queue the nearest candidate within the budget next (an over-budget ask's)."""
        repaired = self.mover.repair(candidate.trial.params) if self.repairs else None
        if repaired is not None:
            self.queue.insert(0, (repaired, "repair"))

    def _local_move(self) -> None:
        """In budget mode, once there is an incumbent, every other ask (fewer once they stop
        paying: LocalShare) is a local move from it, queued with origin `local`."""
        incumbent = self.record.incumbent() if self.local_search else None
        if incumbent is None:
            return
        if self.record.improvements != self.improvements:  # local moves pay again
            self.improvements = self.record.improvements
            self.local_share.improved()
        if not self.local_share.turn():
            return
        moved = self.mover.local_move(incumbent, self.rng, self._seen)
        if moved is not None:
            self.queue.append((moved, "local"))

    def _seen(self, policy_hash: str) -> bool:
        return self.record.evaluated(policy_hash) or self.flight.holds(policy_hash)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Time one ask, recording it included, for asking ahead in time."""
        asked = time.perf_counter()
        yield
        self.ask_estimate += 0.3 * (time.perf_counter() - asked - self.ask_estimate)

    def ahead_in(self, *, ready: int, ends: Sequence[float]) -> float:
        """Seconds until the next candidate should be asked ahead (0: now), given `ready`
        candidates waiting and the expected ends of the running evaluations (monotonic
        time, sorted). One is always ready, so a freed worker never waits for the sampler
        (and the ask time is known before it matters). Beyond that, just in time: the j-th
        evaluation to end needs the j-th ready candidate, so asking starts as long before
        it as the missing candidates take, plus one, at twice the average ask (asks vary
        with load and grow with the history). Evaluations of equal length end in bursts
        (a large cluster started at once): the burst's candidates are asked before it,
        while the driver is idle, not one after another as workers free up. Before the
        first result every evaluation may end now; the sampler knows nothing yet either,
        so asking early costs nothing (issue 6)."""
        if self.issued >= self.target or not ends:
            return math.inf
        if not ready:
            return 0.0
        now = time.monotonic()
        return max(0.0, min((end - now - 2 * (j - ready + 1) * self.ask_estimate
                             for j, end in enumerate(ends, 1) if j > ready), default=math.inf))  # fmt: skip

    def figures(self) -> dict[str, Any]:
        """For run.json: how many asks fell outside the budget."""
        return {"asks": self.asks, "infeasible_asks": self.infeasible,
                "infeasible_share": self.infeasible / self.asks if self.asks else 0.0}  # fmt: skip
