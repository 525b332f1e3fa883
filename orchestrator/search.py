"""The driver: one Optuna study via ask/tell, dispatch to free workers, record every trial.

The driver never builds a model. Per candidate it asks the sampler, canonicalizes the
policy, prices it with the cost model, and then either records it at once (over budget:
INFEASIBLE; already evaluated: the earlier result) or sends it to a free worker. The
parts: orchestrator.proposer (what next), orchestrator.dispatcher (the workers),
orchestrator.ledger (tell and record); `Driver` here runs the loop over them.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from orchestrator.budget import Budget
from orchestrator.config import SearchConfig
from orchestrator.dispatcher import Dispatcher
from orchestrator.errors import RayLostError, ResultsError, WorkerStartError
from orchestrator.fidelity import FidelitySettings
from orchestrator.ledger import Ledger, loaded_rows
from orchestrator.prepare import Prepared, prepare
from orchestrator.progress import Progress
from orchestrator.proposals import LossModel, Mover, Pricing, budget_seeds
from orchestrator.proposer import Guidance, Proposer
from orchestrator.proposer import distribution as distribution  # benchmarks import it here
from orchestrator.recorder import Recorder
from orchestrator.results import compute_front, read_trials
from orchestrator.runrecord import FILE as RUN_FILE
from orchestrator.runrecord import BaseFigures, BudgetRecord, RunEntry, RunRecord, update_record
from orchestrator.storage import study_storage
from orchestrator.store import new_driver_id, open_study
from orchestrator.timing import DriverStats, TimedSampler
from search_spaces import SearchSpace
from search_spaces.kinds import reference_values
from search_spaces.policy import Policy

# sampler name (config.SAMPLERS, but `auto`) -> factory(seed, trials); what an ask costs
# each: auto_sampler and tpe_ask_seconds below (benchmarks/sampler.py)
SAMPLERS: dict[str, Callable[[int | None, int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed, trials: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "nsga2": lambda seed, trials: optuna.samplers.NSGAIISampler(
        seed=seed, population_size=max(10, min(50, trials // 10))
    ),
    "random": lambda seed, trials: optuna.samplers.RandomSampler(seed=seed),
}
TPE_MAX_KNOB_TRIALS_PER_WORKER = 8000  # knobs x trials x workers (benchmarks/sampler.py)
TPE_MAX_SHARE = 0.05  # of a worker's evaluation time that TPE's asks may cost (auto)


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

    budget: Budget = Budget()  # the study's: what "best" means (Budget.rank)

    def best_within_budget(self) -> pd.Series | None:
        """The best trial of the front (its trials are within the budget)."""
        row = self.budget.best(self.front.itertuples())
        return None if row is None else self.front.loc[row.Index]


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

    if prepared.config.front == "latency":  # a candidate's latency is known only once scored
        return None
    config = prepared.config.fidelity
    enabled = config.enabled
    if enabled == "auto":
        enabled = prepared.task.metric is accuracy and not custom_evaluator
    if not enabled:
        return None
    return FidelitySettings(steps=config.steps, error_rate=config.error_rate,
                            metric_range=config.metric_range)  # fmt: skip


class Driver:
    """The dispatch loop over the three parts (issue 13): the proposer says what to
    evaluate next, the dispatcher keeps every worker busy, the ledger tells and records.
    Built by `open_driver`."""

    def __init__(self, proposer: Proposer, dispatcher: Dispatcher, ledger: Ledger, *,
                 target: int, quiet: bool, stats: DriverStats, driver_id: str) -> None:  # fmt: skip
        self.proposer, self.dispatcher, self.ledger = proposer, dispatcher, ledger
        self.target, self.quiet, self.stats, self.driver_id = target, quiet, stats, driver_id
        self.interrupted = False
        self.lost: str | None = None  # what of Ray was lost, if it was (RayLostError)
        self.shown = ledger.finished  # the finished trials the progress bar counts

    @property
    def error(self) -> str | None:
        """Why the run stopped early, if it did."""
        return self.dispatcher.error

    def run(self) -> None:
        """Feed every free worker, then wait for the next result; while every worker is
        busy, ask candidates ahead just in time for the evaluations expected to finish
        (issue 6: a freed worker is fed at once, without waiting for a sampler ask)."""
        start = time.perf_counter()
        with Progress(total=self.target, initial=self.ledger.finished, quiet=self.quiet) as bar:
            try:
                while self._turn(bar):
                    pass
                bar.update_status(self.dispatcher.busy, self.dispatcher.size, self.ledger.best())
            except KeyboardInterrupt:
                self.interrupted = True
            except RayLostError as lost:  # as Ctrl-C: what finished is made durable below
                self.lost = str(lost)
            self._advance(bar)
        self.stats.loop_seconds = time.perf_counter() - start
        self.ledger.close()

    def _turn(self, bar: Progress) -> bool:
        """Adopt, feed, then wait for results or ask one ahead (held back by the recorder:
        wait for it too); False once nothing is left to wait for, or the run gave up."""
        if self.dispatcher.gave_up():
            return False
        self.ledger.adopt()
        self._feed()
        self._advance(bar)
        held = self.dispatcher.held() and self._left()
        if not self.dispatcher.busy and not held:
            return False
        bar.update_status(self.dispatcher.busy, self.dispatcher.size, self.ledger.best(),
                          behind=self.dispatcher.backlog.unrecorded if held else None)  # fmt: skip
        if held:  # nothing is sent until the recorder catches up: no asking ahead either
            ahead = math.inf
            done = self.dispatcher.collect(timeout=0)  # the pool's liveness checks too
        else:
            ahead = self.proposer.ahead_in(ready=len(self.dispatcher.ready),
                                           ends=self.dispatcher.expected_ends())  # fmt: skip
            done = self.dispatcher.collect(timeout=min(0.2, ahead))
        for job, result in done:
            candidate, state, result = self.dispatcher.finish(job, result)
            self.proposer.measured(candidate, result)
            self.ledger.record(candidate, state, result)
        if held and not done:
            self.dispatcher.wait_recorded()
        if not done and ahead <= 0:
            self._ask()
        self._advance(bar)
        return True

    def _left(self) -> bool:
        """Whether candidates remain to be sent: ready ones, or trials still to ask."""
        return bool(self.dispatcher.ready) or self.proposer.issued < self.target

    def _feed(self) -> None:
        """Every free worker gets a ready candidate, or one asked now."""
        while self.dispatcher.feed() and self.proposer.issued < self.target:
            self._ask()

    def _ask(self) -> None:
        """Ask one candidate: recorded at once if over budget or already evaluated, else
        ready for the next free worker (or riding along with its policy in flight)."""
        with self.proposer.timed():
            candidate = self.proposer.ask()
            self.ledger.created(candidate)
            if not candidate.feasible:
                self.ledger.tell(candidate, candidate.trial, "INFEASIBLE", {})
                self.proposer.repair(candidate)  # next: the nearest candidate within the budget
            elif not self.ledger.reuse(candidate):
                self.dispatcher.take(candidate)

    def _advance(self, bar: Progress) -> None:
        """The bar counts the trials told or adopted since it last moved."""
        for _ in range(self.ledger.finished - self.shown):
            bar.advance()
        self.shown = self.ledger.finished

    def summary(self) -> dict[str, Any]:
        """This run's figures for run.json: how much sampling and worker time went where."""
        return {"finished_at": _now(), "finished_trials": self.ledger.finished,
                "interrupted": self.interrupted, **self.proposer.figures(),
                **self.dispatcher.figures(), "driver": self.stats.as_dict(),
                **({"error": self.lost} if self.lost else {}),
                "driver_id": self.driver_id, "adopted_trials": self.ledger.adopted}  # fmt: skip


def open_driver(prepared: Prepared, pool: Any, *, sampler: str, quiet: bool,
                fidelity: FidelitySettings | None = None,
                guidance: Guidance | None = None,
                base_latency: float | None = None, latency_table: Any = None,
                latency_anchors: Sequence[tuple[dict, float]] = ()) -> Driver:  # fmt: skip
    """Open the study (new, resumed or joined) and build the driver's parts on it: the
    sampler's in-memory copy, and the durable study the recorder process writes."""
    p, stats, driver_id = prepared, DriverStats(), new_driver_id()
    p.study_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(p.study_dir, 0o700)  # the study is the user's alone
    url = study_storage(p.config.storage, p.study_dir)
    directions = p.config.directions
    opened = open_study(url, p.study, directions, resume=p.resume, join=p.join)
    timed = TimedSampler(SAMPLERS[sampler](p.config.seed, p.config.trials), stats)
    study = optuna.create_study(directions=directions, sampler=timed, study_name=p.study)
    study.add_trials(opened.finished)  # numbered 0, 1, ... here
    loaded = loaded_rows(p, opened)
    recorder = Recorder(url, p.study, p.study_dir, driver_id=driver_id, shared=p.join,
                        remote=p.mirror.uri if p.mirror else None,
                        axis=p.config.front_axis)  # fmt: skip
    ledger = Ledger(p, study, recorder, loaded, stats=stats)
    dispatcher = Dispatcher(pool, stats=stats, front=ledger.to_beat, fidelity=fidelity,
                            backlog=recorder)  # fmt: skip
    proposer = Proposer(p, study, record=ledger, flight=dispatcher,
                        guidance=guidance or Guidance(), requeue=opened.requeue,
                        first=opened.created, base_latency=base_latency,
                        latency_table=latency_table, latency_anchors=latency_anchors)  # fmt: skip
    for _, row in loaded:  # a resumed study's measured latencies teach the predictor too
        proposer.learn(row.get("policy"), row.get("latency_ms"))
    return Driver(proposer, dispatcher, ledger, target=p.config.trials, quiet=quiet,
                  stats=stats, driver_id=driver_id)  # fmt: skip


def latency_probe_request(space: Any) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """What the per-layer table probes for `space`: each layer's activation bits (float,
    and 8 where it has such a knob) and its least weight shape (the space's smallest
    policy's), as a worker's `latency_probes` takes them."""
    from search_spaces.config import FLOAT_BITS
    from search_spaces.cost import sliced_weight_shapes
    from search_spaces.kinds import layer_act_bits

    smallest = Policy.from_values(space, space.extreme_values("min"))
    lowest = layer_act_bits(space, smallest)
    acts = {x.name: sorted({FLOAT_BITS, lowest.get(x.name, FLOAT_BITS)})
            for x in space.profile.layers}  # fmt: skip
    least = {layer.name: list(shapes[0]) for layer, shapes in sliced_weight_shapes(space, smallest)}
    return acts, least


def _latency_table(prepared: Prepared, pool: Any, *, quiet: bool) -> Any:
    """The per-layer latency table of the space's layers, at float and (where a layer has
    an activation knob) 8-bit activations, from a worker: timed there, or read from its
    machine's cache (orchestrator/latency_table.py). None: the evaluator times none."""
    from orchestrator.latency_table import LayerTable

    acts, least = latency_probe_request(prepared.space)
    start = time.monotonic()
    found = pool.latency_probes(acts, least)
    if found is None:
        return None
    table = LayerTable.of(found)
    if not quiet:
        print(f"latency: {len(table.base)} of {len(acts)} layers in the per-layer table "
              f"({table.probes} probes, {table.timed} timed now, the rest from this machine's "
              f"cache) in {time.monotonic() - start:.1f} s", file=sys.stderr)  # fmt: skip
    return table


def _latency_anchors(prepared: Prepared, pool: Any) -> list[tuple[dict, float]]:
    """Uniform W8A8 at full width (where the space has 8-bit activations), timed on a
    worker before the search: the predictor knows from the start what a model of integer
    layers costs. Its layers' probes alone do not tell (each pays a quantize, a dequantize
    and two transposes that a run of them pays once): mobilenet_v2's W8A8 ran 0.18 ms
    where its probes said 0.25, so under a 0.26 ms limit the budget's W8A8 baseline was
    taken at a smaller keep (metric 0.05-0.09 where full width scores 0.20)."""
    from orchestrator.proposals import INT8, integer_values, uniform_values

    w8a8 = integer_values(prepared.space, uniform_values(prepared.space, INT8))
    if w8a8 is None:
        return []
    measured = pool.policy_latency(w8a8)
    return [] if measured is None else [(w8a8, measured)]


def _say_reach(prepared: Prepared, base_latency: float, table: Any = None,
               anchors: Sequence[tuple[dict, float]] = ()) -> None:  # fmt: skip
    """The base model's latency beside the limit, and a warning when even the space's
    smallest policy is predicted over it (e.g. nothing it can cut changes latency)."""
    from orchestrator.latency import LatencyModel

    space, limit = prepared.space, prepared.budget.latency_ms
    model = LatencyModel(space, table)
    model.observe(Policy.from_values(space, reference_values(space.knobs)), base_latency)
    for values, measured in anchors:
        model.observe(Policy.from_values(space, values), measured)
    least = model.predict(Policy.from_values(space, space.extreme_values("min")))
    w8a8 = "".join(f", at W8A8 in {measured:.3f} ms" for _, measured in anchors)
    print(f"latency: the base model runs in {base_latency:.3f} ms{w8a8}; limit {limit:g} ms",
          file=sys.stderr)  # fmt: skip
    if least is not None and least > limit:
        print(f"latency: even the smallest policy of this space is predicted at {least:.3f} "
              f"ms (by the work it keeps): the limit may be out of reach; "
              "candidates predicted over it are recorded INFEASIBLE", file=sys.stderr)  # fmt: skip


def _refresh(prepared: Prepared) -> Callable[[], None] | None:
    """In a bucket, other machines' drivers of a joined study may have changed run.json:
    fetched again (under the lock) before this driver changes it."""
    mirror = prepared.mirror
    if mirror is None or not prepared.join:
        return None
    return lambda: mirror.refresh(RUN_FILE)


def write_run_json(prepared: Prepared, *, sampler: str, base_metric: float | None,
                   workers: list[dict[str, Any]], driver_id: str = "") -> None:  # fmt: skip
    """Record the study (config, versions, space, budget, base model) and start this
    run's entry; a resumed or joined study keeps its creation time and earlier runs."""
    entry = RunEntry(started_at=_now(), trials=prepared.config.trials, sampler=sampler,
                     resume=prepared.resume, join=prepared.join, driver_id=driver_id,
                     workers=workers)  # fmt: skip

    def start(previous: RunRecord | None) -> RunRecord:
        return RunRecord(
            study=prepared.study,
            created_at=(previous and previous.created_at) or _now(),
            config={**prepared.config.to_dict(), "study": prepared.study},
            versions=versions(),
            sampler=sampler,
            objective=prepared.config.objective,
            directions=prepared.config.directions,
            budget=BudgetRecord.of(prepared.budget),
            space=prepared.space.to_dict(),
            base=BaseFigures(**prepared.base_cost.as_dict(), metric=base_metric),
            runs=[*(previous.runs if previous else []), entry],
        )  # fmt: skip

    update_record(prepared.study_dir, start, refresh=_refresh(prepared))
    publish(prepared)


def finish_run_json(prepared: Prepared, summary: dict[str, Any]) -> None:
    """Add this run's figures (feasibility shares, driver timings) to its run.json entry."""

    def finish(record: RunRecord | None) -> RunRecord:
        if record is None:  # write_run_json made it; only a deleted study lacks it
            raise ResultsError(f"'{prepared.study_dir / RUN_FILE}' disappeared during the run")
        return record.finished(summary)

    update_record(prepared.study_dir, finish, refresh=_refresh(prepared))
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


def _guidance(prepared: Prepared, pool: Any, base_metric: float, *, quiet: bool,
              batches: int | None = None, eval_seconds: float | None = None) -> Guidance:  # fmt: skip
    """Sensitivity table (cached; its probes within `sensitivity.share` of the trials), the
    loss model it gives, and the seeds: under a budget the knapsack's policies at the
    budget's edge (orchestrator.proposals), else the knapsack's sweep of size budgets,
    those within the budget. Ctrl-C keeps the probes done (sensitivity.Interrupted)."""
    from orchestrator.sensitivity import describe, schedule, seed_policies, table_for, write_table

    config, space = prepared.config, prepared.space
    budget = config.sensitivity.share * config.trials
    plan = schedule(space, budget=budget, batches=batches)
    # the budget in time: that many evaluations shared by the workers (a probe's rebuild
    # costs it time however little data it scores)
    seconds = None if eval_seconds is None else budget * eval_seconds / max(1, pool.size)
    if not quiet:
        print(describe(plan, config.trials, seconds) + " (cached per task and space)",
              file=sys.stderr)  # fmt: skip
    table = table_for(config.task, space, config.recovery.model_dump(), pool, base_metric,
                      plan=plan, seconds=seconds, quiet=quiet)  # fmt: skip
    prepared.study_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(prepared.study_dir, 0o700)  # the study is the user's alone (as Driver.open)
    write_table(table, prepared.study_dir / "sensitivity.parquet")
    loss = LossModel.from_table(space, table, base_metric, noise=prepared.noise)
    pricing = Pricing(space, prepared.budget)
    if prepared.budget.limits:
        return Guidance(seeds=tuple(budget_seeds(Mover(pricing, loss))), loss=loss)
    seeds = [params for params in seed_policies(space, table, base_metric)
             if pricing.excess(params) <= 0]  # fmt: skip
    return Guidance(seeds=tuple(seeds), loss=loss)


class _Deferred:
    hit = False


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[_Deferred]:
    """Ctrl-C inside is remembered, not raised, so what it wraps completes (main thread
    only: elsewhere signals are not this thread's to handle)."""
    state = _Deferred()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def remember(signum, frame):
        state.hit = True

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def _started(prepared: Prepared) -> bool:
    """Whether the study has trials (its seeds were evaluated): a new study has none."""
    return prepared.resume and any((prepared.study_dir / "trials").glob("part-*.parquet"))


def _resumed_guidance(prepared: Prepared, base_metric: float) -> Guidance:
    """The loss model of the sensitivity table a resumed study recorded (its seeds were
    evaluated before); none (the prior) if it has no readable table."""
    from orchestrator.sensitivity import cached_table

    table = cached_table(prepared.study_dir / "sensitivity.parquet")
    if table is None:
        return Guidance()
    return Guidance(loss=LossModel.from_table(prepared.space, table, base_metric,
                                              noise=prepared.noise))  # fmt: skip


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
        with _without_monitors():
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     _node_ip_address="127.0.0.1", object_store_memory=200 * 2**20, **quiet)  # fmt: skip
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
    return True


@contextlib.contextmanager
def _without_monitors() -> Iterator[None]:
    """A local Ray starts only what a run uses (issue 16): its GCS, raylet (whose job and
    runtime-env agents Ray always starts, and whose death takes the raylet down), the
    workers, and Ray's minimal API server (ray.init always starts it; without the
    dashboard it serves no page and no Jobs API). Ray's autoscaler monitor and log monitor
    are left out: a fixed local node has nothing to autoscale, and with log_to_driver off
    nobody reads what the log monitor tails. ray.init has no switch for either, so for
    this call Ray's own parameters say so (as ray.cluster_utils does for its nodes):
    two Python processes and ~160 MB fewer, 1.5-2 s less to start on this 2-CPU machine
    (benchmarks/ray_start.py)."""
    try:
        from ray._private.parameter import RayParams
    except ImportError:  # a Ray whose private layout moved: its defaults, monitors included
        yield
        return
    original = RayParams.__init__

    def lean(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.no_monitor, self.include_log_monitor = True, False

    RayParams.__init__ = lean  # type: ignore[method-assign]
    try:
        yield
    finally:
        RayParams.__init__ = original  # type: ignore[method-assign]


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
    from orchestrator.liveness import watch_current_ray
    from orchestrator.workers import PoolSettings, TaskEvaluatorFactory, WorkerPool

    started_ray = _ray_init(config)
    pool = None
    try:
        factory = evaluator_factory or TaskEvaluatorFactory(
            config.task, space, RecoverySettings(**config.recovery.model_dump()),
            config.target_settings()
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
        pool = WorkerPool(factory, settings, watch=watch_current_ray())
        infos = pool.start()
        yield pool, infos
    finally:
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
        if pool is not None and pool.watch.lost:
            pool.watch.reap()


def run_prepared(prepared: Prepared, *, quiet: bool = True, evaluator_factory: Any = None,
                 sys_path: tuple[str, ...] = ()) -> SearchResult:  # fmt: skip
    config = prepared.config
    started = time.monotonic()
    with worker_pool(config, prepared.space, evaluator_factory=evaluator_factory,
                     sys_path=sys_path) as (pool, infos):  # fmt: skip
        timed = time.perf_counter()
        base_metric = pool.base_metric()
        eval_seconds = time.perf_counter() - timed  # one evaluation, and a Ray round trip
        base_latency = pool.base_latency() if prepared.budget.latency_ms is not None else None
        table = _latency_table(prepared, pool, quiet=quiet) if base_latency is not None else None
        anchors = _latency_anchors(prepared, pool) if base_latency is not None else []
        if base_latency is not None and not quiet:
            _say_reach(prepared, base_latency, table, anchors)
        sampler = config.sampler
        if sampler == "auto":  # by knobs, trial budget, workers started and evaluation time
            sampler = auto_sampler(len(prepared.space.searchable), config.trials, pool.size,
                                   eval_seconds)  # fmt: skip
        fidelity = fidelity_settings(prepared, custom_evaluator=evaluator_factory is not None)
        guidance, interrupted, lost = Guidance(), False, None
        if config.seeding and not _started(prepared):
            try:  # a study resumed before any trial (stopped in this phase) measures the rest
                guidance = _guidance(prepared, pool, base_metric, quiet=quiet,
                                     batches=infos[0].get("validation_batches"),
                                     eval_seconds=eval_seconds)  # fmt: skip
            except KeyboardInterrupt:  # the probes done are cached: the study is made resumable
                interrupted = True
            except RayLostError as exc:  # the same, then the error
                lost = str(exc)
        elif config.seeding:  # resumed: the study's own table still steers repairs and moves
            guidance = _resumed_guidance(prepared, base_metric)
        with _deferred_interrupt() as deferred:  # a study half opened is no study to resume
            driver = open_driver(prepared, pool, sampler=sampler, quiet=quiet,
                                 fidelity=fidelity, guidance=guidance,
                                 base_latency=base_latency, latency_table=table,
                                 latency_anchors=anchors)  # fmt: skip
            write_run_json(prepared, sampler=sampler, base_metric=base_metric, workers=infos,
                           driver_id=driver.driver_id)  # fmt: skip
        interrupted = interrupted or deferred.hit
        try:
            if interrupted or lost:
                driver.interrupted, driver.lost = interrupted, lost
                driver.ledger.close()
            else:
                driver.run()
        finally:
            finish_run_json(prepared, driver.summary())
        if driver.lost:  # every finished trial is durable (the ledger closed): say so, exit 1
            raise RayLostError(driver.lost)
    trials = read_trials(prepared.study_dir)
    return SearchResult(study=prepared.study, study_dir=prepared.study_dir, trials=trials,
                        front=compute_front(trials, config.front_axis), base_metric=base_metric,
                        base_size=prepared.base_cost.size_bytes, sampler=sampler,
                        interrupted=driver.interrupted, seconds=time.monotonic() - started,
                        error=driver.error, driver=driver.stats.as_dict(),
                        budget=prepared.budget)  # fmt: skip


__all__ = ["SearchResult", "auto_sampler", "prepare", "run_prepared", "run_search"]
