"""Driver scaling: 1 vs 2 workers on an eval-bound workload, and a simulated 32-worker cluster.

Every row is a real `run_search` (the driver, Ray actors, Optuna, the recorder process,
SQLite and Parquet) with an injected evaluator that builds no model, so only the cost of
an evaluation is simulated; the metric is a fixed function of the policy. Search spaces:
`digits-cnn` (9 knobs) and, where TPE asks cost the most, `digits-resnet` with
unstructured pruning (18 knobs).

- eval-bound, this machine: each evaluation does a fixed amount of CPU work (a torch
  matmul loop on one thread, --work-ms long on an idle core), with 1 and then 2 workers;
  speed-up = trials/s with 2 workers / trials/s with 1.
- simulated cluster: --workers lightweight actors (cpus_per_worker 1; the benchmark's
  local Ray gets that many logical CPUs) whose evaluation sleeps --eval-seconds: worker
  utilization per sampler.
- driver ceiling: the same actors with an evaluation that returns at once, so that the
  driver is the bottleneck: the trials/s it sustains per sampler.

    python benchmarks/scaling.py                    # 32 workers, 256 trials, 1 s: ~8 min
    python benchmarks/scaling.py --workers 16 --trials 128 --sampler random,tpe --skip wide

Targets (issue 6 item 6): utilization >= 95% with 32 workers and 1-second evaluations,
per sampler, while trials remain to be handed out (see NOTES for both figures); the
driver's ceiling must exceed what those workers consume (workers / eval-seconds trials/s).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import torch

from orchestrator.config import make_config
from orchestrator.prepare import build_space
from orchestrator.search import SAMPLERS, run_search

SPACES = {  # label -> config keys: the default space, and one where TPE asks cost more
    "9 knobs": {"task": "digits-cnn"},
    "18 knobs": {"task": "digits-resnet", "pruning": "unstructured"},
}
SEED = 0
UTILIZATION_TARGET = 0.95
MATMUL = 128  # side of the square matrices of the CPU-bound evaluation


def policy_metric(policy: dict[str, Any]) -> float:
    """A deterministic stand-in for accuracy in [0, 1], rising with bits and keep (as in
    benchmarks/overhead.py; repeated here so that Ray pickles it with this script)."""
    scores = [min(v, 8) / 8 if name.startswith("bits:") else float(v) for name, v in policy.items()]
    return sum(scores) / len(scores)


def matmul_loop(iterations: int) -> None:
    a = torch.ones(MATMUL, MATMUL) / MATMUL
    for _ in range(iterations):
        a = torch.mm(a, a)


class SimulatedEvaluator:
    """Sleeps `seconds` (a simulated evaluation) or runs `iterations` of CPU work, and
    appends each evaluation's start and end (wall clock) and CPU seconds to a file of
    its own."""

    def __init__(self, seconds: float, iterations: int, log: Path) -> None:
        self.seconds, self.iterations, self.log = seconds, iterations, log

    def evaluate(self, policy: dict[str, Any], **context: Any) -> dict[str, Any]:
        start, began, cpu = time.perf_counter(), time.time(), time.process_time()
        if self.iterations:
            matmul_loop(self.iterations)
        elif self.seconds:
            time.sleep(self.seconds)
        seconds = time.perf_counter() - start
        with self.log.open("a") as f:
            f.write(f"{began} {began + seconds} {time.process_time() - cpu}\n")
        return {"metric": policy_metric(policy), "fidelity": 1.0, "eval_seconds": seconds,
                "rebuild_seconds": 0.0}  # fmt: skip

    def base_metric(self) -> float:
        return 1.0


@dataclass(frozen=True)
class SimulatedFactory:
    """`factory(device) -> evaluator`; run as a script this module is __main__, and Ray
    pickles the class by value. Each worker logs its evaluations to `log_dir`/PID."""

    log_dir: str
    seconds: float = 0.0
    iterations: int = 0

    def __call__(self, device: Any) -> SimulatedEvaluator:
        log = Path(self.log_dir) / f"{os.getpid()}.txt"
        return SimulatedEvaluator(self.seconds, self.iterations, log)


def spans(log_dir: Path) -> list[tuple[float, float, float]]:
    """(start, end, CPU seconds) of every evaluation the workers logged, by start."""
    found = []
    for path in log_dir.glob("*.txt"):
        found += [tuple(map(float, line.split())) for line in path.read_text().splitlines()]
    return sorted(found)


def busy_until_last_start(evaluations: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(busy worker seconds, wall seconds) from the first evaluation's start to the last
    one's: after the last start no trial is left to hand out, and workers go idle one by
    one however fast the driver is."""
    first, last = evaluations[0][0], evaluations[-1][0]
    busy = sum(max(0.0, min(end, last) - start) for start, end, _ in evaluations)
    return busy, last - first


def calibrate(work_ms: float) -> int:
    """Matmul iterations that take `work_ms` on one thread of this machine (best of 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        matmul_loop(200)  # warm up
        best = min(_timed(matmul_loop, 1000) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    return max(1, round(work_ms / 1000 / (best / 1000)))


def _timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@dataclass(frozen=True, kw_only=True)
class Row:
    scenario: str
    space: str
    sampler: str
    workers: int
    trials: int
    evaluated: int  # trials a worker evaluated (not duplicates of earlier ones)
    eval_seconds: float  # mean per evaluated trial, as the evaluator measured it
    busy_seconds: float  # sum of eval_seconds over the evaluated trials (Parquet rows)
    loop_seconds: float  # the driver's dispatch loop, wall time
    window_busy: float  # worker seconds evaluating, first evaluation start to last start
    window_seconds: float  # wall seconds from the first evaluation's start to the last's
    core_share: float | None  # CPU-bound evaluations: CPU seconds / wall seconds inside them
    total_seconds: float  # the whole run_search call
    sampler_ms: float
    overhead_ms: float

    @property
    def rate(self) -> float:
        return self.trials / self.loop_seconds

    @property
    def utilization(self) -> float:
        return self.busy_seconds / (self.loop_seconds * self.workers)

    @property
    def utilization_running(self) -> float:
        return self.window_busy / (self.window_seconds * self.workers)


def median_rate(rows: list[Row]) -> Row:
    """The run of median trials/s (the lower middle one of an even count)."""
    return sorted(rows, key=lambda r: r.rate)[(len(rows) - 1) // 2]


def run_one(scenario: str, sampler: str, workers: int, trials: int, out: Path, *,
            space: str = "9 knobs", seconds: float = 0.0, iterations: int = 0) -> Row:  # fmt: skip
    name = f"{scenario.split()[0]}-{space.split()[0]}-{sampler}-{workers}"
    log_dir = out / f"{name}-evaluations"
    log_dir.mkdir(parents=True)
    config = make_config({**SPACES[space], "trials": trials, "sampler": sampler, "seed": SEED,
                          "workers": {"count": workers, "cpus_per_worker": 1},
                          "out": str(out), "study": name, "baselines": False,
                          "seeding": False})  # fmt: skip
    factory = SimulatedFactory(str(log_dir), seconds=seconds, iterations=iterations)
    start = time.perf_counter()
    result = run_search(config, evaluator_factory=factory, quiet=True)
    total = time.perf_counter() - start
    frame, d = result.trials, result.driver
    states = frame["state"].value_counts().to_dict()
    if result.error or len(frame) != trials or states.get("COMPLETE", 0) != trials:
        raise SystemExit(f"{name}: run incomplete: {states}, error={result.error}")
    evaluated = frame[frame["cached_from"].isna()]
    logged = spans(log_dir)
    window_busy, window = busy_until_last_start(logged)
    core_share = None
    if iterations:
        core_share = sum(cpu for *_, cpu in logged) / sum(end - begin for begin, end, _ in logged)
    print(f"  {name}: {total:.0f} s ({d['loop_seconds']:.1f} s loop)", file=sys.stderr,
          flush=True)  # fmt: skip
    return Row(scenario=scenario, space=space, sampler=sampler, workers=workers, trials=trials,
               evaluated=len(evaluated), eval_seconds=float(evaluated["eval_seconds"].mean()),
               busy_seconds=float(evaluated["eval_seconds"].sum()),
               loop_seconds=d["loop_seconds"], window_busy=window_busy, window_seconds=window,
               core_share=core_share, total_seconds=total, sampler_ms=d["sampler_ms_per_trial"],
               overhead_ms=d["overhead_ms_per_trial"])  # fmt: skip


# -- report -----------------------------------------------------------------------------
HEADER = ["scenario", "space", "sampler", "workers", "trials", "evaluated", "eval s (mean)",
          "core share", "loop wall s", "trials/s", "utilization", "utilization to last start", "speed-up",
          "sampler ms/trial", "overhead ms/trial", "end-to-end s"]  # fmt: skip

NOTES = """\
space: 9 knobs = digits-cnn (structured pruning, the default); 18 knobs = digits-resnet, pruning unstructured.
evaluated: trials a worker ran; the rest repeated an earlier policy and were answered from the cache.
eval s: per evaluated trial, as the evaluator measured it (Parquet column eval_seconds), mean.
core share: CPU-bound rows: the evaluator's CPU seconds / its wall seconds (1.0: a whole core to each worker).
loop wall s: the driver's dispatch loop, from before the first ask until the last trial is told (DriverStats).
trials/s: trials / loop wall.
utilization: sum of eval_seconds over the evaluated trials (Parquet rows) / (loop wall x workers). Only time inside
  the evaluator counts as busy: Ray dispatch and result transfer, the driver's ask/tell, the ramp-up and the last
  round (short by one worker per duplicate trial) all count as idle.
utilization to last start: the same over the window from the first evaluation's start to the last one's (each
  evaluation's wall-clock start and end, logged by the evaluator), i.e. while trials remained to be handed out.
speed-up: trials/s over that of 1 worker, same workload.
sampler / overhead ms/trial: driver time inside the Optuna sampler / neither sampling nor waiting (DriverStats).
end-to-end s: the whole run_search() call, including starting the workers and draining the recorder."""


def _cells(r: Row, base_rate: float | None) -> list[str]:
    speedup = f"{r.rate / base_rate:.2f}x" if base_rate else "-"
    timed = r.eval_seconds >= 0.01  # a no-op evaluation: utilization means nothing
    return [r.scenario, r.space, r.sampler, str(r.workers), str(r.trials), str(r.evaluated),
            f"{r.eval_seconds:.3f}", "-" if r.core_share is None else f"{r.core_share:.2f}",
            f"{r.loop_seconds:.2f}", f"{r.rate:.1f}",
            f"{100 * r.utilization:.1f}%" if timed else "-",
            f"{100 * r.utilization_running:.1f}%" if timed else "-", speedup,
            f"{r.sampler_ms:.2f}", f"{r.overhead_ms:.2f}", f"{r.total_seconds:.0f}"]  # fmt: skip


def table(rows: list[Row]) -> str:
    one = {r.scenario: r.rate for r in rows if r.workers == 1}
    lines = [_cells(r, one.get(r.scenario) if r.workers == 2 else None) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(HEADER)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    out = [fmt.format(*HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [fmt.format(*line) for line in lines])


def verdicts(bound: list[Row], cluster: list[Row], ceiling: list[Row],
             eval_seconds: float) -> list[str]:  # fmt: skip
    def line(ok: bool, text: str) -> str:
        return f"{'PASS' if ok else 'FAIL'}  {text}"

    out = []
    if len(bound) == 2:  # no target: this machine's cores are shared with everything else
        one, two = bound
        out.append(f"INFO  [eval-bound] 2 workers: {two.rate / one.rate:.2f}x the trials/s of 1; "
                   f"utilization {100 * one.utilization:.1f}% -> {100 * two.utilization:.1f}%; "
                   f"each evaluation got {one.core_share:.2f} -> {two.core_share:.2f} of a core "
                   f"({os.cpu_count()} cores shared with the driver, the recorder, Ray and "
                   f"whatever else runs here)")  # fmt: skip
    for r in cluster:
        out.append(line(r.utilization_running >= UTILIZATION_TARGET,
                        f"[{r.sampler}, {r.space}] utilization {100 * r.utilization_running:.1f}% "
                        f"to the last start with {r.workers} workers and {eval_seconds:g} s "
                        f"evaluations ({100 * r.utilization:.1f}% over the whole loop; target "
                        f">= {100 * UTILIZATION_TARGET:.0f}%)"))  # fmt: skip
    for r in ceiling:
        need = r.workers / eval_seconds
        out.append(line(r.rate >= need,
                        f"[{r.sampler}, {r.space}] driver ceiling {r.rate:.1f} trials/s with "
                        f"{r.workers} workers (target >= {need:.0f}/s, what {r.workers} workers "
                        f"with {eval_seconds:g} s evaluations consume)"))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=32, help="simulated workers (32)")
    parser.add_argument("--trials", type=int, default=256,
                        help="trials per simulated-cluster run (256: 8 rounds of 32)")  # fmt: skip
    parser.add_argument("--eval-seconds", type=float, default=1.0,
                        help="simulated evaluation time (1.0)")  # fmt: skip
    parser.add_argument("--sampler", default="random,tpe,nsga2",
                        help="comma-separated, from: random, tpe, nsga2 (all three)")  # fmt: skip
    parser.add_argument("--bound-trials", type=int, default=40,
                        help="trials per eval-bound run (40)")  # fmt: skip
    parser.add_argument("--work-ms", type=float, default=250,
                        help="CPU work per eval-bound evaluation, ms on one idle core (250)")  # fmt: skip
    parser.add_argument("--bound-sampler", default="tpe", help="eval-bound runs' sampler (tpe)")
    parser.add_argument("--bound-repeats", type=int, default=3,
                        help="eval-bound runs per worker count, alternating 1 and 2 workers; "
                        "the table shows each count's median-speed run (3)")  # fmt: skip
    parser.add_argument("--wide-sampler", default="tpe",
                        help="sampler(s) also run on the 18-knob space (tpe)")  # fmt: skip
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: bound, "
                        "cluster, ceiling, wide (the 18-knob rows)")  # fmt: skip
    args = parser.parse_args(argv)
    samplers = [s.strip() for s in args.sampler.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    wide = [] if "wide" in skip else [s.strip() for s in args.wide_sampler.split(",") if s.strip()]
    unknown = [s for s in [*samplers, *wide, args.bound_sampler] if s not in SAMPLERS]
    if unknown or not samplers:
        parser.error(f"--sampler: unknown {unknown}; choose from {sorted(SAMPLERS)}")
    counts = (args.workers, args.trials, args.bound_trials, args.bound_repeats)
    if min(counts) < 1 or args.eval_seconds <= 0 or args.work_ms <= 0:
        parser.error("--workers, --trials, --bound-*, --eval-seconds, --work-ms: must be > 0")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    knobs = {label: len(build_space(make_config(keys))[2].searchable)
             for label, keys in SPACES.items()}  # fmt: skip
    iterations = calibrate(args.work_ms)
    # one local Ray for every run (run_search leaves a running Ray alone): logical CPUs
    # for the simulated workers, whatever this machine has
    ray.init(address="local", num_cpus=max(args.workers, 2), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR", _node_ip_address="127.0.0.1",
             object_store_memory=200 * 2**20)  # fmt: skip
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    bound, cluster, ceiling = [], [], []
    try:
        with tempfile.TemporaryDirectory(prefix="prunesearch-scaling-") as tmp:
            out = Path(tmp)
            if "bound" not in skip:  # alternating, so that a burst of load elsewhere on
                # this machine hits both counts alike
                runs = [run_one(f"eval-bound ({args.work_ms:g} ms CPU)", args.bound_sampler, w,
                                args.bound_trials, out / f"bound-{i}", iterations=iterations)
                        for i in range(args.bound_repeats) for w in (1, 2)]  # fmt: skip
                bound = [median_rate([r for r in runs if r.workers == w]) for w in (1, 2)]
            runs = [("9 knobs", s) for s in samplers] + [("18 knobs", s) for s in wide]
            for space, sampler in runs:
                if "cluster" not in skip:
                    cluster.append(run_one(f"cluster ({args.eval_seconds:g} s sleep)", sampler,
                                           args.workers, args.trials, out, space=space,
                                           seconds=args.eval_seconds))  # fmt: skip
                if "ceiling" not in skip:
                    ceiling.append(run_one("ceiling (no-op eval)", sampler, args.workers,
                                           args.trials, out, space=space))  # fmt: skip
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    spaces = ", ".join(f"{SPACES[label]['task']} {knobs[label]} knobs" for label in SPACES)
    print(f"scaling: {spaces}; injected evaluator (no model), seed {SEED}; {os.cpu_count()} "
          f"CPUs, load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
          f"end; Python {platform.python_version()}, Ray {ray.__version__}, Optuna "
          f"{optuna.__version__}; {wall:.0f} s in all")  # fmt: skip
    print(table(bound + cluster + ceiling))
    print(NOTES)
    checks = verdicts(bound, cluster, ceiling, args.eval_seconds)
    print("\n".join(checks))
    return 0 if not any(c.startswith("FAIL") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
