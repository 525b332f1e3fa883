"""Faults: digits-cnn searches with faults injected, beside clean runs of the same search.

Every scenario is the same `prunesearch run` (digits-cnn, --trials N, 2 workers, random
sampler, seed 0, no seeding) as a real command, timed from start to exit:

- clean: nothing injected (local Ray started by the command; a 100-step recovery
  fine-tune per candidate, so that an evaluation takes ~0.4 s);
- worker kills: SIGKILL to a worker process in the middle of an evaluation, K times;
- evaluator faults: a task whose metric raises, returns NaN or inf, runs out of GPU memory
  or hangs past `timeout` for about a third of the pruned models;
- every trial fails: a task whose metric fails on every candidate (the run stops early);
- driver kill + resume: SIGKILL to the driver when a third of the trials are recorded,
  then `--resume` to N trials;
- clean, 2-node cluster / node loss: a local two-node Ray cluster (ray.cluster_utils),
  the second node removed when a third of the trials are recorded.

Then it checks every study: lost (a trial finished in the Optuna study, or seen in
Parquet before the fault, that the final Parquet files lack), duplicated (a trial number
twice in Parquet, or a completed policy evaluated twice), torn files (Parquet parts that
do not read). Prints one table.

    python benchmarks/faults.py              # 60 trials per run, about 5 minutes here
    python benchmarks/faults.py --trials 60 --kills 6
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
TIMEOUT = 15  # seconds per evaluation in the evaluator-faults run (a clean one: ~0.4 s)
FINETUNE_STEPS = 100


# -- the faulty tasks (imported by the workers as benchmarks.faults:...) -----------------
def _signature(model: Any) -> tuple:
    return tuple(tuple(p.shape) for p in model.parameters())


def _faulty(every: bool):
    """digits-cnn, with a metric that fails on pruned models: on about a third of them
    (by their shapes, so a policy always gets the same fault), or on every one."""
    import torch

    from orchestrator.batches import accuracy
    from orchestrator.tasks.digits import digits_cnn

    task = digits_cnn()
    base = _signature(task.model())
    faults = {0: "raise", 1: "nan", 2: "inf", 3: "oom", 4: "hang"}  # of 15 buckets

    def metric(model, batches):
        shapes = _signature(model)
        if shapes == base:  # unpruned (the base model, the uniform baselines): scores
            return accuracy(model, batches)
        fault = "raise" if every else faults.get(zlib.crc32(repr(shapes).encode()) % 15)
        if fault == "raise":
            raise RuntimeError("injected: the metric failed")
        if fault == "nan":
            return float("nan")
        if fault == "inf":
            return float("inf")
        if fault == "oom":
            raise torch.cuda.OutOfMemoryError("injected: CUDA out of memory")
        if fault == "hang":
            time.sleep(3600)
        return accuracy(model, batches)

    from dataclasses import replace

    return replace(task, name="digits-cnn-faulty", metric=metric)


def make_faulty_task():
    return _faulty(every=False)


def make_failing_task():
    return _faulty(every=True)


# -- running and checking -----------------------------------------------------------------
def _env() -> dict[str, str]:
    path = str(ROOT) + (
        os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
    )
    return {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}


def _config(tmp: Path, name: str, trials: int, **extra: Any) -> Path:
    import yaml

    # multi-fidelity off everywhere (the faulty tasks' custom metric turns it off); a short
    # fine-tune makes an evaluation take ~0.4 s here, so faults land in the middle of one
    data = {"task": "digits-cnn", "trials": trials, "workers": {"count": 2}, "seeding": False,
            "sampler": "random", "seed": SEED, "fidelity": {"enabled": False},
            "recovery": {"finetune_steps": FINETUNE_STEPS}, **extra}  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _start(config: Path, out: Path, study: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(config),
                             "--out", str(out), "--study", study, "--quiet", *flags],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _rows(study_dir: Path) -> int:
    """Rows recorded so far, from the footers of the parts load_results would read (the
    recorder merges parts meanwhile: a plain listing could count some twice)."""
    import pyarrow.parquet as pq

    from orchestrator.compaction import open_view

    _, files = open_view(study_dir / "trials")
    try:
        return sum(pq.read_metadata(f).num_rows for f in files.values())
    finally:
        for f in files.values():
            f.close()


def _wait_rows(proc: subprocess.Popen, study_dir: Path, rows: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while _rows(study_dir) < rows:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended early: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"no {rows} rows in {timeout:.0f} s")
        time.sleep(0.2)


def _finish(proc: subprocess.Popen, expect: tuple[int, ...] = (0,)) -> str:
    out, err = proc.communicate(timeout=1800)
    if proc.returncode not in expect:
        raise SystemExit(f"run exited {proc.returncode}: {err[-3000:]}")
    return err


@dataclass
class Outcome:
    scenario: str
    faults: str  # what was injected
    requested: int
    finished: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    torn: int = 0
    seconds: float = 0.0  # the command(s), from start to exit
    loop: float = 0.0  # the search loop (run.json), Ray start and task loading aside
    note: str = ""


def _loop_seconds(study_dir: Path, killed_at: float | None) -> float:
    """The search loops' wall time from run.json: the driver's own figure for each run that
    ended, from its start to `killed_at` for the one that was killed."""
    from datetime import datetime

    from orchestrator.runrecord import read_record

    total = 0.0
    for run in read_record(study_dir).runs:
        if run.driver is not None:
            total += run.driver["loop_seconds"]
        elif killed_at is not None and run.started_at is not None:
            total += killed_at - datetime.fromisoformat(run.started_at).timestamp()
    return total


def check(study_dir: Path, outcome: Outcome, before: Any = None,
          killed_at: float | None = None) -> Outcome:  # fmt: skip
    """Fill in finished, FAIL, lost, duplicated, torn and the loop time from the study's
    files and its Optuna storage; `before`: Parquet rows read right after the fault."""
    import optuna
    import pandas as pd
    import pyarrow.parquet as pq

    parts = sorted((study_dir / "trials").glob("part-*.parquet"))
    readable = []
    for part in parts:
        try:
            readable.append(pq.read_table(part).to_pandas())
        except Exception:
            outcome.torn += 1
    rows = pd.concat(readable, ignore_index=True) if readable else pd.DataFrame(columns=["trial"])
    study = optuna.load_study(study_name=study_dir.name,
                              storage=f"sqlite:///{study_dir / 'study.db'}")  # fmt: skip
    finished = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    outcome.finished = len(finished)
    outcome.failed = int((rows["state"] == "FAIL").sum()) if len(rows) else 0
    outcome.loop = _loop_seconds(study_dir, killed_at)
    seen = set(rows["trial"])
    lost = finished - seen
    if before is not None:  # recorded before the fault, kept with the same state
        kept = rows.set_index("trial")["state"].to_dict()
        lost |= {t for t, s in zip(before["trial"], before["state"], strict=True)
                 if kept.get(t) != s}  # fmt: skip
    outcome.lost = len(lost)
    evaluated = (
        rows[(rows["state"] == "COMPLETE") & rows["cached_from"].isna()] if len(rows) else rows
    )
    outcome.duplicated = int(rows["trial"].duplicated().sum()
                             + (evaluated["policy_hash"].duplicated().sum() if len(rows) else 0))  # fmt: skip
    return outcome


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _reap(procs: list[Any], timeout: float = 10) -> None:
    """Processes a killed run left behind (its own children only) get SIGKILL."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


# -- scenarios ------------------------------------------------------------------------------
def clean(tmp: Path, trials: int, name: str) -> Outcome:
    start = time.perf_counter()
    _finish(_start(_config(tmp, name, trials), tmp / "out", name))
    outcome = Outcome("clean", "none", trials, seconds=time.perf_counter() - start)
    return check(tmp / "out" / name, outcome)


def _failures(study_dir: Path) -> str:
    """The FAIL rows' errors, counted by their first words."""
    import pandas as pd

    errors = pd.read_parquet(study_dir / "trials")["error"].dropna()
    kinds = errors.map(lambda e: e.split(";")[0].split(":")[0] if "died" not in e
                       else e.split(";")[0]).value_counts()  # fmt: skip
    return ", ".join(f"{n} FAIL: {kind}" for kind, n in kinds.items())


def worker_kills(tmp: Path, trials: int, kills: int) -> Outcome:
    """SIGKILL a worker process while it runs an evaluation (its process title is
    ray::_Worker.evaluate then); only processes of this run's own local Ray."""
    import psutil

    study_dir = tmp / "out" / "kills"
    start = time.perf_counter()
    proc = _start(_config(tmp, "kills", trials), tmp / "out", "kills")
    _wait_rows(proc, study_dir, 2)  # the workers are up and evaluating
    killed: list[int] = []
    while len(killed) < kills and proc.poll() is None:
        busy = []
        for child in _descendants(proc.pid):
            try:
                if " ".join(child.cmdline()).startswith("ray::_Worker.evaluate"):
                    busy.append(child)
            except psutil.Error:
                continue
        if busy:
            try:
                busy[0].kill()
                killed.append(busy[0].pid)
            except psutil.NoSuchProcess:
                pass
            time.sleep(max(0.5, 10.0 / kills))  # spread over the run
        else:
            time.sleep(0.02)
    _finish(proc)
    outcome = Outcome("worker kills", f"{len(killed)} SIGKILL of a busy worker", trials,
                      seconds=time.perf_counter() - start)  # fmt: skip
    outcome = check(study_dir, outcome)
    import pandas as pd

    rows = pd.read_parquet(study_dir / "trials")
    retried = rows[rows["attempt"] > 1]
    outcome.note = (f"retried on a new worker: {len(retried)}, of which completed: "
                    f"{(retried['state'] == 'COMPLETE').sum()}")  # fmt: skip
    if outcome.failed:  # a candidate whose workers were killed `retries + 1` times
        outcome.note += f"; {_failures(study_dir)}"
    return outcome


def evaluator_faults(tmp: Path, trials: int) -> Outcome:
    study_dir = tmp / "out" / "eval"
    config = _config(tmp, "eval", trials, task="benchmarks.faults:make_faulty_task",
                     timeout=TIMEOUT)  # fmt: skip
    start = time.perf_counter()
    _finish(_start(config, tmp / "out", "eval"))
    outcome = Outcome("evaluator faults", "", trials, seconds=time.perf_counter() - start)
    outcome = check(study_dir, outcome)
    import pandas as pd

    errors = pd.read_parquet(study_dir / "trials")["error"].dropna()
    kinds = {"raise": "RuntimeError", "NaN": "returned nan", "inf": "returned inf",
             "OOM": "OutOfMemoryError", "hang": "TimeoutError"}  # fmt: skip
    counts = {k: int(errors.str.contains(v).sum()) for k, v in kinds.items()}
    outcome.faults = f"{sum(counts.values())} failing metrics"
    outcome.note = ", ".join(f"{v} {k}" for k, v in counts.items())
    return outcome


def every_trial_fails(tmp: Path, trials: int) -> Outcome:
    config = _config(tmp, "fail", trials, task="benchmarks.faults:make_failing_task",
                     baselines=False)  # fmt: skip
    start = time.perf_counter()
    err = _finish(_start(config, tmp / "out", "fail"), expect=(1,))
    outcome = Outcome("every trial fails", "a metric failing always", trials,
                      seconds=time.perf_counter() - start)  # fmt: skip
    outcome = check(tmp / "out" / "fail", outcome)
    line = err.strip().splitlines()[-1]
    outcome.note = "exit 1: " + line.split(";")[0].removeprefix("prunesearch: ")
    return outcome


def driver_kill(tmp: Path, trials: int) -> Outcome:
    import pandas as pd
    import psutil

    study_dir = tmp / "out" / "driver"
    config = _config(tmp, "driver", trials)
    start = time.perf_counter()
    proc = _start(config, tmp / "out", "driver")
    _wait_rows(proc, study_dir, max(1, trials // 3))
    children = _descendants(proc.pid)
    recorder = [c for c in children if "orchestrator.recorder" in " ".join(c.cmdline())]
    killed_at = time.time()
    proc.kill()  # SIGKILL: no cleanup in the driver
    proc.communicate()
    psutil.wait_procs(recorder, timeout=120)  # it writes what it was sent, then exits
    _reap([c for c in children if c not in recorder])
    before = pd.read_parquet(study_dir / "trials")
    _finish(_start(config, tmp / "out", "driver", "--resume"))
    outcome = Outcome("driver kill + resume", "1 SIGKILL of the driver", trials,
                      seconds=time.perf_counter() - start)  # fmt: skip
    outcome = check(study_dir, outcome, before=before, killed_at=killed_at)
    outcome.note = (f"{len(before)} trials recorded at the kill; {outcome.failed} running then "
                    "(FAIL 'interrupted', evaluated again on --resume)")  # fmt: skip
    return outcome


def cluster_runs(tmp: Path, trials: int) -> list[Outcome]:
    """A clean run and a node-loss run, each on a fresh local two-node cluster."""
    from ray.cluster_utils import Cluster

    outcomes = []
    for name in ("cluster", "node"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            second = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            config = _config(tmp, name, trials, workers={"count": "auto"})
            study_dir = tmp / "out" / name
            start = time.perf_counter()
            proc = _start(config, tmp / "out", name, "--address", cluster.address)
            if name == "node":
                _wait_rows(proc, study_dir, max(1, trials // 3))
                cluster.remove_node(second)
            _finish(proc)
            seconds = time.perf_counter() - start
        finally:
            cluster.shutdown()
        if name == "cluster":
            outcomes.append(check(study_dir, Outcome("clean, 2-node cluster", "none", trials,
                                                     seconds=seconds)))  # fmt: skip
        else:
            outcome = check(study_dir, Outcome("node loss", "1 of 2 nodes removed", trials,
                                               seconds=seconds))  # fmt: skip
            import pandas as pd

            rows = pd.read_parquet(study_dir / "trials")
            outcome.note = (f"nodes that ran trials: {rows['node'].nunique()}; retried on the "
                            f"remaining node: {(rows['attempt'] > 1).sum()}")  # fmt: skip
            outcomes.append(outcome)
    return outcomes


# -- report -------------------------------------------------------------------------------
HEADER = ["scenario", "faults injected", "trials requested", "finished", "FAIL", "lost",
          "duplicated", "torn files", "wall s", "loop s", "cost vs clean (loop)", "notes"]  # fmt: skip


def report(outcomes: list[Outcome]) -> str:
    """Costs against the mean of the clean local runs (node loss: the clean cluster run)."""
    local = [o.loop for o in outcomes if o.scenario == "clean"]
    base = {"local": sum(local) / len(local)}
    lines = []
    for o in outcomes:
        if o.scenario == "clean, 2-node cluster":
            base["cluster"] = o.loop
        ref = base["cluster"] if o.scenario == "node loss" else base["local"]
        clean_row = o.scenario.startswith("clean")
        cost = "-" if clean_row else f"{o.loop - ref:+.1f} s ({(o.loop - ref) / ref:+.0%})"
        lines.append([o.scenario, o.faults, str(o.requested), str(o.finished), str(o.failed),
                      str(o.lost), str(o.duplicated), str(o.torn), f"{o.seconds:.1f}",
                      f"{o.loop:.1f}", cost, o.note])  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(HEADER)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    out = [fmt.format(*HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [fmt.format(*line) for line in lines])


NOTES = """\
finished: trials finished in the study (Optuna storage); FAIL: of those, failed (with the error recorded).
lost: finished in the study, or recorded in Parquet before the fault, but missing from the final Parquet files.
duplicated: a trial number twice in Parquet, or a completed policy evaluated twice (a retry of a
  killed evaluation is not a duplicate: it had no result).
torn files: Parquet parts that do not read.
wall s: each command from start to exit, Ray start and task loading included (driver kill + resume: both
  commands and the wait between them). loop s: the search loop alone (run.json's driver figures; the killed
  run up to the kill), so Ray start-up noise on a shared machine stays out of the cost.
cost vs clean (loop): loop time over the mean of the two clean local runs (first and last), the node-loss
  row over the clean 2-node cluster run."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60, help="trials per run (60)")
    parser.add_argument("--kills", type=int, default=4, help="workers killed (4)")
    parser.add_argument("--skip-cluster", action="store_true", help="no two-node cluster runs")
    args = parser.parse_args(argv)
    if args.trials < 6 or args.kills < 1:
        parser.error("--trials must be at least 6 and --kills at least 1")
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="prunesearch-faults-") as tmp:
        tmp = Path(tmp)
        outcomes.append(clean(tmp, args.trials, "clean"))
        outcomes.append(worker_kills(tmp, args.trials, args.kills))
        outcomes.append(evaluator_faults(tmp, args.trials))
        outcomes.append(every_trial_fails(tmp, args.trials))
        outcomes.append(driver_kill(tmp, args.trials))
        outcomes.append(clean(tmp, args.trials, "clean-again"))  # the machine's drift, shown
        if not args.skip_cluster:
            outcomes.extend(cluster_runs(tmp, args.trials))
    print(f"faults: task digits-cnn, {args.trials} trials per run, 2 workers, random sampler, "
          f"seed {SEED}, {os.cpu_count()} CPUs")  # fmt: skip
    print(report(outcomes))
    print(NOTES)
    bad = [o.scenario for o in outcomes if o.lost or o.duplicated or o.torn]
    short = [o.scenario for o in outcomes
             if o.scenario != "every trial fails" and o.finished != o.requested]  # fmt: skip
    print(f"{'PASS' if not bad else 'FAIL'}  nothing lost, duplicated or torn"
          + (f" (failed: {', '.join(bad)})" if bad else ""))  # fmt: skip
    print(f"{'PASS' if not short else 'FAIL'}  every run finished the trials it was asked for"
          + (f" (short: {', '.join(short)})" if short else ""))  # fmt: skip
    return 0 if not bad and not short else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
