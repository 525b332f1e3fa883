"""Driver overhead: prunesearch vs Ray Tune + OptunaSearch on a trivial objective.

The evaluator builds no model: the metric is a cheap deterministic function of the
policy and the size comes from the cost model, so everything measured is the cost of
proposing, dispatching and recording trials. Both systems get the same knobs of the
`digits-cnn` search space (the same Optuna distributions), the same Optuna sampler
(same factory, arguments and seed), the same objective and two concurrent evaluations,
in one process one after the other. Prints one table and a PASS/FAIL line per target
(issue: >= 50x Ray Tune's throughput, <= 5 ms driver overhead per trial).

    python benchmarks/overhead.py                    # random sampler
    python benchmarks/overhead.py --sampler random,tpe

Ray Tune manages about 0.5 trials/s here (a new actor per trial), so it runs fewer trials
(--tune-trials); its time per trial does not depend on the count beyond the first few.
A second Ray Tune row with `reuse_actors=True` shows Tune at its fastest.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Before Ray is imported: the old Tune console output, which verbose=0 silences.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import optuna  # noqa: E402

from orchestrator.config import make_config  # noqa: E402
from orchestrator.prepare import build_space  # noqa: E402
from orchestrator.search import SAMPLERS, distribution, run_search  # noqa: E402
from orchestrator.timing import DriverStats, TimedSampler  # noqa: E402
from search_spaces import SearchSpace  # noqa: E402
from search_spaces.cost import policy_cost  # noqa: E402
from search_spaces.policy import Policy  # noqa: E402

TASK = "digits-cnn"  # 9 searchable knobs (5 bits, 4 keep groups: structured by default)
WORKERS = 2
SEED = 0
OVERHEAD_TARGET_MS = 5.0
SPEEDUP_TARGET = 50.0
PRUNESEARCH = "prunesearch"
TUNE = "Ray Tune + OptunaSearch"


def trivial_metric(policy: dict[str, Any]) -> float:
    """A deterministic stand-in for accuracy in [0, 1], rising with bits and keep."""
    scores = [min(v, 8) / 8 if name.startswith("bits:") else float(v) for name, v in policy.items()]
    return sum(scores) / len(scores)


class TrivialEvaluator:
    def evaluate(self, policy: dict[str, Any]) -> dict[str, Any]:
        return {"metric": trivial_metric(policy), "fidelity": 1.0, "eval_seconds": 0.0,
                "rebuild_seconds": 0.0}  # fmt: skip

    def base_metric(self) -> float:
        return 1.0


@dataclass(frozen=True)
class TrivialFactory:
    """`factory(device) -> evaluator`. Run as a script, this module is __main__ and Ray
    pickles the class by value; imported, workers find it as `benchmarks.overhead`
    (the pool puts the driver's working directory on their sys.path)."""

    def __call__(self, device: Any) -> TrivialEvaluator:
        return TrivialEvaluator()


@dataclass(frozen=True, kw_only=True)
class Row:
    system: str
    sampler: str
    trials: int
    loop_seconds: float  # dispatch loop (prunesearch) / Tuner.fit (Ray Tune); no Ray start
    durable_seconds: float  # loop + the recorder's drain to SQLite/Parquet after it
    total_seconds: float  # the whole call: prepare, Ray start, workers, loop, shutdown
    sampler_ms: float  # per trial, inside the Optuna sampler (TimedSampler, both systems)
    overhead_ms: float | None  # per trial, driver time neither sampling nor waiting
    overhead_range: tuple[float, float] | None = None  # min, max over repeats
    runs: int = 1

    @property
    def loop_rate(self) -> float:
        return self.trials / self.loop_seconds

    @property
    def durable_rate(self) -> float:
        return self.trials / self.durable_seconds

    @property
    def total_rate(self) -> float:
        return self.trials / self.total_seconds

    @property
    def wall_ms_excl_sampler(self) -> float:
        """(loop wall - sampler time) per trial: one measure that applies to both systems."""
        return 1000 * self.loop_seconds / self.trials - self.sampler_ms


# -- prunesearch ------------------------------------------------------------------------
def run_prunesearch(sampler: str, trials: int, out: Path, *, name: str) -> Row:
    config = make_config({"task": TASK, "trials": trials, "workers": {"count": WORKERS},
                          "sampler": sampler, "seed": SEED, "out": str(out), "study": name,
                          "baselines": False})  # fmt: skip
    start = time.perf_counter()
    result = run_search(config, evaluator_factory=TrivialFactory(), quiet=True)
    total = time.perf_counter() - start
    d = result.driver
    states = result.trials["state"].value_counts().to_dict()
    if result.error or d["trials"] != trials or states.get("COMPLETE", 0) != trials:
        raise SystemExit(f"prunesearch run incomplete: {states}, error={result.error}")
    return Row(system=PRUNESEARCH, sampler=sampler, trials=trials,
               loop_seconds=d["loop_seconds"], durable_seconds=d["loop_seconds"] + d["drain_seconds"],
               total_seconds=total, sampler_ms=d["sampler_ms_per_trial"],
               overhead_ms=d["overhead_ms_per_trial"])  # fmt: skip


def median_row(rows: list[Row]) -> Row:
    """Each figure the median over the repeats; the overhead also keeps its range."""

    def med(name: str) -> float:
        return statistics.median(getattr(r, name) for r in rows)

    overheads = [r.overhead_ms for r in rows]
    return replace(rows[0], loop_seconds=med("loop_seconds"), durable_seconds=med("durable_seconds"),
                   total_seconds=med("total_seconds"), sampler_ms=med("sampler_ms"),
                   overhead_ms=med("overhead_ms"), overhead_range=(min(overheads), max(overheads)),
                   runs=len(rows))  # fmt: skip


# -- Ray Tune + OptunaSearch ------------------------------------------------------------
def _tune_objective(config: dict[str, Any], space: Any = None) -> None:
    from ray import tune

    policy = Policy.from_values(space, config)
    tune.report({"size_bytes": policy_cost(space, policy).size_bytes,
                 "metric": trivial_metric(dict(policy))})  # fmt: skip


def run_ray_tune(sampler: str, trials: int, out: Path, *, space: SearchSpace,
                 sampler_trials: int, reuse_actors: bool) -> Row:  # fmt: skip
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    distributions = {k.name: distribution(k) for k in space.searchable}  # what prunesearch asks
    stats = DriverStats()
    inner = SAMPLERS[sampler](SEED, sampler_trials)  # the factory and arguments prunesearch uses
    search = OptunaSearch(distributions, metric=["size_bytes", "metric"], mode=["min", "max"],
                          sampler=TimedSampler(inner, stats))  # fmt: skip
    start = time.perf_counter()
    ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=True, object_store_memory=200 * 2**20)  # fmt: skip
    try:
        tuner = tune.Tuner(
            tune.with_parameters(_tune_objective, space=space),
            tune_config=tune.TuneConfig(
                search_alg=search,
                num_samples=trials,
                max_concurrent_trials=WORKERS,
                reuse_actors=reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=f"overhead-{sampler}-{int(reuse_actors)}", storage_path=str(out), verbose=0
            ),
        )
        fit_start = time.perf_counter()
        results = tuner.fit()
        loop = time.perf_counter() - fit_start
    finally:
        ray.shutdown()
    total = time.perf_counter() - start
    frame = results.get_dataframe()
    if results.errors or len(frame) != trials or frame["metric"].isna().any():
        raise SystemExit(f"Ray Tune run incomplete: {len(frame)} rows, errors={results.errors}")
    return Row(system=TUNE + (", reuse_actors" if reuse_actors else ""), sampler=sampler,
               trials=trials, loop_seconds=loop, durable_seconds=loop, total_seconds=total,
               sampler_ms=1000 * stats.sampler_seconds / trials, overhead_ms=None)  # fmt: skip


# -- report -----------------------------------------------------------------------------
HEADER = ["system", "sampler", "trials", "concurrency", "trials/s loop", "trials/s durable",
          "trials/s end-to-end", "overhead ms/trial (min-max)", "wall-sampler ms/trial",
          "sampler ms/trial", "speed-up vs Tune"]  # fmt: skip

NOTES = """\
trials/s loop: trials / dispatch-loop wall (prunesearch, DriverStats) or Tuner.fit() wall (Ray Tune); no Ray start.
trials/s durable: prunesearch loop plus the recorder process draining its backlog to SQLite/Parquet afterwards.
trials/s end-to-end: the whole call: run_search() (task prepare, Ray start, actors, loop, drain, shutdown)
  or ray.init() + Tuner.fit() + ray.shutdown().
overhead ms/trial: driver time that is neither sampler nor ray.wait, per trial (DriverStats; n/a for Tune);
  prunesearch rows: median of {runs} runs, (min-max) over them; every other prunesearch figure is a median too.
wall-sampler ms/trial: loop wall per trial minus sampler time per trial, the same measure for both systems.
sampler ms/trial: time inside the Optuna sampler, the same TimedSampler wrapper on both sides.
speed-up: trials/s loop over that of Ray Tune (default reuse_actors=False) with the same sampler."""


def _cells(r: Row, tune_rate: float) -> list[str]:
    if r.overhead_ms is None:
        overhead = "n/a"
    else:
        low, high = r.overhead_range or (r.overhead_ms, r.overhead_ms)
        overhead = f"{r.overhead_ms:.2f} ({low:.2f}-{high:.2f})"
    return [r.system, r.sampler, str(r.trials), str(WORKERS), f"{r.loop_rate:.2f}",
            f"{r.durable_rate:.2f}", f"{r.total_rate:.2f}", overhead,
            f"{r.wall_ms_excl_sampler:.1f}", f"{r.sampler_ms:.2f}",
            f"{r.loop_rate / tune_rate:.1f}x"]  # fmt: skip


def verdicts(r: Row, tune_rate: float, reuse_rate: float | None) -> list[str]:
    speedup = r.loop_rate / tune_rate
    extra = f"; {r.loop_rate / reuse_rate:.1f}x Tune with reuse_actors" if reuse_rate else ""
    return [
        f"{'PASS' if speedup >= SPEEDUP_TARGET else 'FAIL'}  [{r.sampler}] throughput "
        f"{speedup:.1f}x Ray Tune's (target >= {SPEEDUP_TARGET:.0f}x){extra}",
        f"{'PASS' if r.overhead_ms <= OVERHEAD_TARGET_MS else 'FAIL'}  [{r.sampler}] driver "
        f"overhead {r.overhead_ms:.2f} ms/trial, median of {r.runs} "
        f"(target <= {OVERHEAD_TARGET_MS:.0f} ms)",
    ]


def report(rows: list[Row]) -> tuple[str, list[str]]:
    tune_rate = {r.sampler: r.loop_rate for r in rows if r.system == TUNE}
    reuse_rate = {r.sampler: r.loop_rate for r in rows if r.system.startswith(TUNE + ",")}
    lines = [_cells(r, tune_rate[r.sampler]) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(HEADER)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    out = [fmt.format(*HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*line) for line in lines]
    checks = [v for r in rows if r.system == PRUNESEARCH
              for v in verdicts(r, tune_rate[r.sampler], reuse_rate.get(r.sampler))]  # fmt: skip
    return "\n".join(out), checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="prunesearch trials (200)")
    parser.add_argument("--tune-trials", type=int, default=30, help="Ray Tune trials (30)")
    parser.add_argument("--sampler", default="random",
                        help="comma-separated, from: random, tpe, nsga2 (default random)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3,
                        help="prunesearch runs per sampler; the table shows medians (3)")  # fmt: skip
    parser.add_argument("--no-tune-reuse", action="store_true",
                        help="skip the Ray Tune reuse_actors=True row")  # fmt: skip
    args = parser.parse_args(argv)
    samplers = [s.strip() for s in args.sampler.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown or not samplers:
        parser.error(f"--sampler: unknown {unknown}; choose from {sorted(SAMPLERS)}")
    if min(args.trials, args.tune_trials, args.repeats) < 1:
        parser.error("--trials, --tune-trials and --repeats must be at least 1")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    _, _, space = build_space(make_config({"task": TASK}))
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunesearch-overhead-") as tmp:
        for sampler in samplers:
            runs = [run_prunesearch(sampler, args.trials, Path(tmp) / "prunesearch",
                                    name=f"overhead-{sampler}-{i}")
                    for i in range(args.repeats)]  # fmt: skip
            rows.append(median_row(runs))
            for reuse in (False,) if args.no_tune_reuse else (False, True):
                rows.append(run_ray_tune(sampler, args.tune_trials, Path(tmp) / "tune",
                                         space=space, sampler_trials=args.trials,
                                         reuse_actors=reuse))  # fmt: skip
    text, checks = report(rows)
    print(f"overhead: task {TASK} ({len(space.searchable)} knobs), trivial evaluator (no model), "
          f"{WORKERS} workers / concurrent trials, seed {SEED}, {os.cpu_count()} CPUs")  # fmt: skip
    print(text)
    print(NOTES.format(runs=args.repeats))
    print("\n".join(checks))
    return 0 if all(c.startswith("PASS") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
