"""Driver overhead: prunesearch vs Ray Tune + OptunaSearch on a trivial objective.

The evaluator builds no model: the metric is a cheap deterministic function of the
policy and the size comes from the cost model, so everything measured is the cost of
proposing, dispatching and recording trials. Both systems get the same 10 knobs of the
`digits-cnn` search space (the same Optuna distributions), the same Optuna sampler
(same factory, same seed), the same objective and two concurrent evaluations, in one
process one after the other. Prints one table and a PASS/FAIL line per target
(issue: >= 50x Ray Tune's throughput, <= 5 ms driver overhead per trial).

    python benchmarks/overhead.py                  # 200 prunesearch trials, 30 Ray Tune trials
    python benchmarks/overhead.py --sampler random,tpe --tune-trials 20

Ray Tune manages about 0.5 trials/s here, so it runs fewer trials (--tune-trials); its
throughput per trial does not depend on the count beyond the first few.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before Ray is imported: the old (quiet at verbose=0) Tune console output, no metrics agent.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")

import optuna  # noqa: E402

import orchestrator.store  # noqa: E402
from orchestrator.config import make_config  # noqa: E402
from orchestrator.cost import policy_cost  # noqa: E402
from orchestrator.policy import Policy  # noqa: E402
from orchestrator.prepare import build_space  # noqa: E402
from orchestrator.search import SAMPLERS, distribution, run_search  # noqa: E402
from orchestrator.timing import DriverStats, TimedSampler  # noqa: E402

TASK = "digits-cnn"  # 10 searchable knobs (5 bits, 5 keep)
WORKERS = 2
SEED = 0
OVERHEAD_TARGET_MS = 5.0
SPEEDUP_TARGET = 50.0


def trivial_metric(policy: dict[str, Any]) -> float:
    """A deterministic stand-in for accuracy, rising with bits and keep, in [0, 1]."""
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
    """`factory(device) -> evaluator`; defined in __main__, so Ray pickles it by value."""

    def __call__(self, device: Any) -> TrivialEvaluator:
        return TrivialEvaluator()


@dataclass
class Row:
    system: str
    sampler: str
    trials: int
    concurrency: int
    loop_seconds: float  # dispatch loop (prunesearch) / Tuner.fit (Ray Tune); no Ray start
    durable_seconds: float  # loop + draining the background recorder to SQLite/Parquet
    total_seconds: float  # the whole call: Ray start, workers, loop, recording, shutdown
    sampler_ms: float
    overhead_ms: float | None  # driver time excluding sampler and waiting on workers
    wall_ms_excl_sampler: float  # (loop - sampler time) / trials, comparable across systems

    @property
    def loop_rate(self) -> float:
        return self.trials / self.loop_seconds

    @property
    def durable_rate(self) -> float:
        return self.trials / self.durable_seconds

    @property
    def total_rate(self) -> float:
        return self.trials / self.total_seconds


# -- prunesearch ------------------------------------------------------------------------
_drain = {"seconds": 0.0}


def _time_recorder_close() -> None:
    """The driver's loop time stops before the Recorder thread has written every trial to
    SQLite and Parquet; time that drain too, so a backlog cannot hide behind the loop."""
    close = orchestrator.store.Recorder.close

    def timed_close(self: Any) -> None:
        start = time.perf_counter()
        try:
            close(self)
        finally:
            _drain["seconds"] += time.perf_counter() - start

    orchestrator.store.Recorder.close = timed_close  # type: ignore[method-assign]


def run_prunesearch(sampler: str, trials: int, out: Path) -> Row:
    config = make_config({"task": TASK, "trials": trials, "workers": {"count": WORKERS},
                          "sampler": sampler, "seed": SEED, "out": str(out),
                          "study": f"overhead-{sampler}", "baselines": False})  # fmt: skip
    _drain["seconds"] = 0.0
    start = time.perf_counter()
    result = run_search(config, evaluator_factory=TrivialFactory(), quiet=True)
    total = time.perf_counter() - start
    d = result.driver
    states = result.trials["state"].value_counts().to_dict()
    if result.error or d["trials"] != trials or states.get("COMPLETE", 0) != trials:
        raise SystemExit(f"prunesearch run incomplete: {states}, error={result.error}")
    return Row(system="prunesearch", sampler=sampler, trials=int(d["trials"]),
               concurrency=WORKERS, loop_seconds=d["loop_seconds"],
               durable_seconds=d["loop_seconds"] + _drain["seconds"], total_seconds=total,
               sampler_ms=d["sampler_ms_per_trial"], overhead_ms=d["overhead_ms_per_trial"],
               wall_ms_excl_sampler=1000 * (d["loop_seconds"] - d["sampler_seconds"]) / trials)  # fmt: skip


# -- Ray Tune + OptunaSearch ------------------------------------------------------------
def _tune_objective(config: dict[str, Any], space: Any = None) -> None:
    from ray import tune

    policy = Policy.from_values(space, config)
    tune.report({"size_bytes": policy_cost(space, policy).size_bytes,
                 "metric": trivial_metric(dict(policy))})  # fmt: skip


def run_ray_tune(sampler: str, trials: int, sampler_trials: int, out: Path) -> Row:
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    _, _, space = build_space(make_config({"task": TASK}))
    distributions = {k.name: distribution(k) for k in space.searchable}  # what prunesearch asks
    stats = DriverStats()
    inner = SAMPLERS[sampler](SEED, sampler_trials)  # same factory and arguments as prunesearch
    search = OptunaSearch(distributions, metric=["size_bytes", "metric"], mode=["min", "max"],
                          sampler=TimedSampler(inner, stats))  # fmt: skip
    start = time.perf_counter()
    ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=True, object_store_memory=200 * 2**20)  # fmt: skip
    try:
        tuner = tune.Tuner(
            tune.with_parameters(_tune_objective, space=space),
            tune_config=tune.TuneConfig(
                search_alg=search, num_samples=trials, max_concurrent_trials=WORKERS
            ),  # fmt: skip
            run_config=tune.RunConfig(
                name=f"overhead-{sampler}", storage_path=str(out), verbose=0
            ),  # fmt: skip
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
    return Row(system="Ray Tune + OptunaSearch", sampler=sampler, trials=trials,
               concurrency=WORKERS, loop_seconds=loop, durable_seconds=loop, total_seconds=total,
               sampler_ms=1000 * stats.sampler_seconds / trials, overhead_ms=None,
               wall_ms_excl_sampler=1000 * (loop - stats.sampler_seconds) / trials)  # fmt: skip


# -- report -----------------------------------------------------------------------------
HEADER = ["system", "sampler", "trials", "concurrency", "trials/s loop", "trials/s durable",
          "trials/s end-to-end", "overhead ms/trial", "wall-sampler ms/trial",
          "sampler ms/trial", "speed-up vs Tune"]  # fmt: skip


def table(rows: list[Row]) -> tuple[str, list[str]]:
    tune_rate = {r.sampler: r.loop_rate for r in rows if r.system != "prunesearch"}
    lines, verdicts = [], []
    for r in rows:
        speedup = r.loop_rate / tune_rate[r.sampler]
        lines.append([r.system, r.sampler, str(r.trials), str(r.concurrency),
                      f"{r.loop_rate:.2f}", f"{r.durable_rate:.2f}", f"{r.total_rate:.2f}",
                      "n/a" if r.overhead_ms is None else f"{r.overhead_ms:.2f}",
                      f"{r.wall_ms_excl_sampler:.1f}", f"{r.sampler_ms:.2f}",
                      f"{speedup:.1f}x"])  # fmt: skip
        if r.system == "prunesearch":
            ok = speedup >= SPEEDUP_TARGET
            verdicts.append(f"{'PASS' if ok else 'FAIL'}  [{r.sampler}] throughput {speedup:.1f}x "
                            f"Ray Tune's (target >= {SPEEDUP_TARGET:.0f}x)")  # fmt: skip
            ok = r.overhead_ms <= OVERHEAD_TARGET_MS
            verdicts.append(f"{'PASS' if ok else 'FAIL'}  [{r.sampler}] driver overhead "
                            f"{r.overhead_ms:.2f} ms/trial (target <= {OVERHEAD_TARGET_MS:.0f} ms)")  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(HEADER)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    out = [fmt.format(*HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out), verdicts


NOTES = """\
trials/s loop: trials / dispatch-loop wall (prunesearch) or Tuner.fit() wall (Ray Tune); Ray start excluded.
trials/s durable: loop plus the prunesearch Recorder draining its backlog to SQLite/Parquet after the loop.
trials/s end-to-end: the whole call (prunesearch: run_search incl. task prepare, Ray start, actors, shutdown;
  Ray Tune: ray.init + Tuner.fit + ray.shutdown).
overhead ms/trial: driver time that is neither sampler nor waiting on workers (DriverStats); n/a for Tune.
wall-sampler ms/trial: (loop wall - sampler time) / trials, the same measure for both systems.
speed-up: trials/s loop over Ray Tune's with the same sampler. Ray Tune runs fewer trials (--tune-trials)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="prunesearch trials (200)")
    parser.add_argument("--tune-trials", type=int, default=30, help="Ray Tune trials (30)")
    parser.add_argument("--sampler", default="random",
                        help="comma-separated: random, tpe, nsga2 (random)")  # fmt: skip
    args = parser.parse_args(argv)
    samplers = [s.strip() for s in args.sampler.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown or not samplers:
        parser.error(f"--sampler: unknown {unknown}; choose from {sorted(SAMPLERS)}")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    _time_recorder_close()
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunesearch-overhead-") as tmp:
        for sampler in samplers:
            rows.append(run_prunesearch(sampler, args.trials, Path(tmp) / "prunesearch"))
            rows.append(run_ray_tune(sampler, args.tune_trials, args.trials, Path(tmp) / "tune"))
    text, verdicts = table(rows)
    print(f"overhead: task {TASK} (10 knobs), trivial evaluator (no model), {WORKERS} workers, "
          f"seed {SEED}, {os.cpu_count()} CPUs")  # fmt: skip
    print(text)
    print(NOTES)
    print("\n".join(verdicts))
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
