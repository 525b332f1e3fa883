"""Soak: a long study with faults, to show nothing grows or slows with its length.

10,000 trials of digits-cnn's space with the trivial evaluator of benchmarks/overhead.py
(no model: only proposing, dispatching and recording are measured), 4 workers, random
sampler, the default SQLite storage. A worker is SIGKILLed every 1,000 evaluations (at
500, 1,500, ...: one in each thousand), the driver is SIGKILLed once at half of them and
the study `--resume`d to the end (with seed 1: see `drive`). Then one table: trials/s over time (first vs last
thousand), driver and recorder RSS at start and end, part files at the end,
lost/duplicated/torn (benchmarks/faults.py's check against the Optuna storage) and the
time pandas takes to read the study.

Throughput is the recorded rate (rows reaching the Parquet files, polled): the workers
evaluate trivial trials ten times faster than the recorder can write them to SQLite
(docs/benchmarks.md, "recorder"), so the driver runs ahead of it by the most it may
(orchestrator/dispatcher.py, UNRECORDED_MIN) and the recorder is what a long study could
slow down. The driver's own rate (the rows' finished_at) is shown beside it.
Evaluations are counted by the workers (a file each), since the Parquet files lag.

    python benchmarks/soak.py                  # 10,000 trials, several minutes here
    python benchmarks/soak.py --trials 3000    # a shorter one

Targets (issue 16): the last thousand's throughput no more than 20% below the first's, driver RSS
growth under 200 MB, at most 50 part files, nothing lost, duplicated or torn.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: `benchmarks` is then importable

from benchmarks.faults import Outcome, _descendants, _env, _reap, _rows, check  # noqa: E402
from benchmarks.overhead import TrivialEvaluator  # noqa: E402

WORKERS = 4
SEED = 0
POLL_SECONDS = 0.25
THROUGHPUT_TOLERANCE = 0.20
RSS_GROWTH_MB = 200
MAX_PARTS = 50
COUNT_EVERY = 20  # evaluations between writes of a worker's count


def drive(out: str, study: str, trials: int, resume: bool) -> int:
    """The driver process (`soak.py --drive ...`): run_search with the trivial evaluator."""
    from benchmarks.soak import CountingFactory  # by reference: the workers import it
    from orchestrator.config import make_config
    from orchestrator.search import run_search

    # resumed, another seed: with the first run's, the random sampler would replay its
    # policies, every one a cache hit (the driver no longer runs far ahead of its recorder,
    # so nearly all of them are in the study), and the second half would evaluate nothing
    seed = SEED + 1 if resume else SEED
    config = make_config({"task": "digits-cnn", "trials": trials, "workers": {"count": WORKERS},
                          "sampler": "random", "seed": seed, "seeding": False,
                          "baselines": False, "out": out, "study": study})  # fmt: skip
    factory = CountingFactory(directory=str(Path(out) / "evaluated"))
    result = run_search(config, resume=resume, evaluator_factory=factory, quiet=True)
    return 1 if result.error else 0


class CountingEvaluator(TrivialEvaluator):
    """The trivial evaluator, writing how many it evaluated to its own file now and then."""

    def __init__(self, path: Path) -> None:
        self.path, self.count = path, 0

    def evaluate(self, policy: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        if self.count % COUNT_EVERY == 0:
            self.path.write_text(str(self.count))
        return super().evaluate(policy)


@dataclass(frozen=True, kw_only=True)
class CountingFactory:
    directory: str

    def __call__(self, device: Any) -> CountingEvaluator:
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        return CountingEvaluator(Path(self.directory) / str(os.getpid()))


def evaluated(out: Path) -> int:
    return sum(int(p.read_text() or 0) for p in (out / "evaluated").glob("*"))


@dataclass
class Run:
    """What the watcher saw of one driver process."""

    rss: dict[str, list[float]] = field(default_factory=lambda: {"driver": [], "recorder": []})
    recorded: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, rows)
    active: int | None = None  # the first sample 100 evaluations into its loop


def _mb(proc) -> float | None:
    import psutil

    try:
        return proc.memory_info().rss / 2**20
    except psutil.Error:
        return None


def _start(out: Path, study: str, trials: int, *flags: str):
    import subprocess

    return subprocess.Popen([sys.executable, __file__, "--drive", str(out), study, str(trials),
                             *flags], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _cmd(proc) -> str:
    """A process's command line (its title for Ray's), or '' once it is gone."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _kill_a_worker(driver_pid: int) -> bool:
    import psutil

    for child in _descendants(driver_pid):
        if _cmd(child).startswith("ray::_Worker"):
            try:
                child.kill()
                return True
            except psutil.Error:
                continue
    return False


def watch(proc, out: Path, run: Run, *, kills: list[int], stop_at: int | None) -> None:
    """Poll until the driver exits (or, with `stop_at` evaluations, SIGKILL it there): rows
    recorded, RSS of the driver and its recorder, and a worker SIGKILLed as the evaluations
    pass each of `kills` (consumed)."""
    import psutil

    study_dir = out / "soak"
    driver = psutil.Process(proc.pid)
    recorder, started = None, evaluated(out)
    while proc.poll() is None:
        rows, done = _rows(study_dir), evaluated(out)
        run.recorded.append((time.monotonic(), rows))
        recorder = recorder or next((c for c in _descendants(proc.pid)
                                     if "orchestrator.recorder" in _cmd(c)), None)  # fmt: skip
        # RSS from 100 evaluations into this run's loop: the recorder has imported by then
        if done >= started + 100 and recorder is not None:
            run.active = len(run.recorded) - 1 if run.active is None else run.active
            for name, p in (("driver", driver), ("recorder", recorder)):
                if (mb := _mb(p)) is not None:
                    run.rss[name].append(mb)
        # one kill a poll, once this driver's workers evaluate (one killed while the pool
        # starts stops the run: pool.start takes it for a task that cannot load)
        if kills and done >= kills[0] and done > started and _kill_a_worker(proc.pid):
            kills.pop(0)
        if stop_at is not None and done >= stop_at:
            children = _descendants(proc.pid)
            proc.kill()  # SIGKILL: no cleanup in the driver
            proc.wait()
            # the recorder records what it was sent, then exits: its rate still counts
            deadline = time.monotonic() + 900
            while recorder is not None and time.monotonic() < deadline:
                if psutil.wait_procs([recorder], timeout=POLL_SECONDS)[0]:
                    break
                run.recorded.append((time.monotonic(), _rows(study_dir)))
            run.recorded.append((time.monotonic(), _rows(study_dir)))
            _reap([c for c in children if c is not recorder])
            return
        time.sleep(POLL_SECONDS)
    run.recorded.append((time.monotonic(), _rows(study_dir)))  # the recorder drained at exit
    if proc.returncode != 0:
        raise SystemExit(f"the driver exited {proc.returncode}: {proc.stderr.read()[-3000:]}")


def by_thousand(study_dir: Path) -> list[float]:
    """Trials/s in each thousand by the trials' own finished_at (the driver's clock)."""
    from orchestrator.results import read_trials

    done = read_trials(study_dir)["finished_at"].sort_values().reset_index(drop=True)
    rates = []
    for start in range(0, len(done) - 999, 1000):
        seconds = (done[start + 999] - done[start]).total_seconds()
        rates.append(999 / seconds if seconds > 0 else float("inf"))
    return rates


def recording(run: Run) -> list[tuple[float, int]]:
    """The run's samples from its recorder's first flush inside the loop on (a resumed
    driver writes its interrupted trials itself first, and Ray starts: not the rate)."""
    samples = run.recorded[run.active :] if run.active is not None else []
    for i in range(1, len(samples)):
        if samples[i][1] > samples[i - 1][1]:
            return samples[i - 1 :]
    return []


def thousands(samples: list[tuple[float, int]]) -> list[float]:
    """Rows/s recorded over each successive 1,000 rows of the samples."""
    rates = []
    if samples:
        t0, r0 = samples[0]
        for t, rows in samples:
            if rows >= r0 + 1000:
                rates.append((rows - r0) / (t - t0))
                t0, r0 = t, rows
    return rates


def last_thousand(samples: list[tuple[float, int]]) -> float | None:
    """Rows/s recorded over the last 1,000 rows of the samples."""
    if not samples:
        return None
    t1, r1 = samples[-1]
    before = [(t, rows) for t, rows in samples if rows <= r1 - 1000]
    return (r1 - before[-1][1]) / (t1 - before[-1][0]) if before else None


def pandas_seconds(study_dir: Path) -> float:
    import pandas as pd

    times = []
    for _ in range(3):
        start = time.perf_counter()
        pd.read_parquet(study_dir / "trials")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def soak(
    tmp: Path, trials: int, *, samples: Path | None = None
) -> tuple[list[list[str]], list[str]]:
    import json

    import pandas as pd

    out, study = tmp / "out", "soak"
    study_dir = out / study
    every = max(1, trials // 10)
    kills = list(range(every // 2, trials, every))
    requested_kills = len(kills)
    first, second = Run(), Run()
    start = time.perf_counter()
    proc = _start(out, study, trials)
    watch(proc, out, first, kills=kills, stop_at=trials // 2)
    killed_at, killed_evaluations = time.time(), evaluated(out)
    before = pd.read_parquet(study_dir / "trials")
    watch(_start(out, study, trials, "--resume"), out, second, kills=kills, stop_at=None)
    wall = time.perf_counter() - start
    if samples is not None:
        samples.write_text(
            json.dumps([{"recorded": r.recorded, "rss": r.rss} for r in (first, second)])
        )
    outcome = check(study_dir, Outcome("soak", "", trials), before=before, killed_at=killed_at)
    rates = by_thousand(study_dir)
    recorded = [thousands(recording(run)) for run in (first, second)]
    first_rate = (recorded[0] or recorded[1] or [None])[0]
    last_rate = last_thousand(recording(second))
    parts = len(list((study_dir / "trials").glob("part-*.parquet")))
    if first_rate is None or last_rate is None:
        raise SystemExit(f"no rate for the first or last thousand: {recorded}")
    change = last_rate / first_rate - 1
    growth = max(r.rss["driver"][-1] - r.rss["driver"][0] for r in (first, second))
    rows = [
        ["trials finished / requested", f"{outcome.finished} / {trials}", "all"],
        ["trials/s recorded, first thousand", f"{first_rate:.1f}", ""],
        ["trials/s recorded, last thousand", f"{last_rate:.1f} ({change:+.0%})",
         f"within {THROUGHPUT_TOLERANCE:.0%} of the first"],
        ["trials/s evaluated by the driver, first / last thousand (finished_at)",
         f"{rates[0]:.0f} / {rates[-1]:.0f}", ""],
        *[[f"{name} RSS MB, {label}: start -> end",
           f"{r.rss[name][0]:.0f} -> {r.rss[name][-1]:.0f} ({r.rss[name][-1] - r.rss[name][0]:+.0f})",
           f"growth < {RSS_GROWTH_MB} MB" if name == "driver" else ""]
          for name in ("driver", "recorder")
          for label, r in (("first run", first), ("resumed run", second))],
        ["part files at the end", str(parts), f"<= {MAX_PARTS}"],
        ["lost / duplicated / torn", f"{outcome.lost} / {outcome.duplicated} / {outcome.torn}",
         "0 / 0 / 0"],
        ["FAIL rows (interrupted by the driver kill)", str(outcome.failed), ""],
        ["pd.read_parquet(trials) s (median of 3)", f"{pandas_seconds(study_dir):.3f}", ""],
        ["faults", f"{requested_kills - len(kills)} worker SIGKILLs, 1 driver SIGKILL + resume",
         f"{requested_kills} + 1"],
        ["evaluations at the driver kill (rows once its recorder drained)",
         f"{killed_evaluations} ({len(before)})", ""],
        ["wall s (both commands, the wait between)", f"{wall:.0f}", ""],
    ]  # fmt: skip
    verdicts = [
        # the target guards against slowing down as the study grows: faster is no failure
        _verdict(change >= -THROUGHPUT_TOLERANCE,
                 f"last thousand {change:+.0%} vs the first (target: at most 20% slower)"),
        _verdict(growth < RSS_GROWTH_MB, f"driver RSS growth {growth:+.0f} MB (target < 200)"),
        _verdict(parts <= MAX_PARTS, f"{parts} part files (target <= {MAX_PARTS})"),
        _verdict(not (outcome.lost or outcome.duplicated or outcome.torn)
                 and outcome.finished == trials, "nothing lost, duplicated or torn"),
        "trials/s recorded by thousand, first run | resumed run: "
        + " | ".join(", ".join(f"{r:.0f}" for r in rs) for rs in recorded),
        f"trials/s evaluated by thousand (finished_at): {', '.join(f'{r:.0f}' for r in rates)}",
    ]  # fmt: skip
    return rows, verdicts


def _verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text}"


def table(rows: list[list[str]]) -> str:
    header = ["measure", "value", "target"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, rows)])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--drive"]:
        return drive(argv[1], argv[2], int(argv[3]), resume="--resume" in argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000, help="trials (10,000)")
    parser.add_argument("--samples", type=Path, help="write the watcher's samples here (JSON)")
    args = parser.parse_args(argv)
    if args.trials < 3000:
        parser.error(
            "--trials must be at least 3000 (a first and a last thousand, each "
            "away from the driver kill at half of them)"
        )
    with tempfile.TemporaryDirectory(prefix="prunesearch-soak-") as tmp:
        rows, verdicts = soak(Path(tmp), args.trials, samples=args.samples)
    print(f"soak: digits-cnn space, trivial evaluator, {args.trials} trials, {WORKERS} workers, "
          f"random sampler, seed {SEED}, {os.cpu_count()} CPUs")  # fmt: skip
    print(table(rows))
    print("\n".join(verdicts))
    return 0 if all(not v.startswith("FAIL") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
