"""`python benchmarks/quality.py --mode budget`: the budget search on real pretrained models
(issue 12). See quality.py's docstring; this module holds the budget mode's runs, table
and verdicts.

Per task and budget (the size of the literal uniform B-bit policy, every layer at B bits,
nothing pruned, as `prunesearch eval --policy uniform:B` prices it), per trial count and
seed, in one process with one Ray:

- prunesearch: the defaults with `objective: budget` (sensitivity table, cached per task
  and space, then uniform baselines within the budget, knapsack seeds at the budget's
  edge, sampler asks with loss-aware repair, local moves from the incumbent);
- random / plain TPE: Optuna's RandomSampler / TPESampler with the same budget and repair,
  no seeding, no baselines, no local moves, no multi-fidelity;
- uniform: the best uniform policy within the budget, over every bits value at the
  largest uniform keep that fits (the space's keep grid), scored once in this process.

Each search runs once per seed with the largest trial count; a smaller count N is read
off the same run as its first N trials (by trial number: the order they were asked), the
answer the search would have given had it stopped there. (prunesearch's `sampler: auto`
is chosen for the largest count: with MiniLM's 42 knobs, NSGA-II at 100 trials, where a
40-trial run would get TPE.)

Reported: the best metric of a COMPLETE trial within the budget, per seed and mean.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
PRUNESEARCH, RANDOM, PLAIN, UNIFORM = "prunesearch", "random", "plain TPE", "best uniform"
NO_SEEDING, NO_LOCAL = "prunesearch, seeding: false", "prunesearch, local_search: false"
FULL_SWEEP = "prunesearch, sensitivity.share: 1"  # the sensitivity phase unbounded (issue 14)
SEARCHES = (PRUNESEARCH, RANDOM, PLAIN)
ABLATIONS = {NO_SEEDING: {"seeding": False}, NO_LOCAL: {"local_search": False},
             FULL_SWEEP: {"sensitivity": {"share": 1.0}}}  # --ablate


@dataclass(frozen=True, kw_only=True)
class Budgeted:
    """One task at one budget: its size, and the best uniform policy within it."""

    task: str
    bits: int
    size: int  # bytes: the literal uniform `bits` policy's size
    uniform_metric: float  # the best uniform policy within `size`
    uniform_label: str
    uniform_bits_metric: float  # the literal uniform `bits` policy itself (keep 1.0)
    float_metric: float
    float_size: int


def short(task: str) -> str:
    return task.rsplit(":", 1)[-1].removesuffix("_task")


def uniform_policies(space: Any, size: int) -> list[tuple[str, Any]]:
    """Every bits value at the largest uniform keep (of the space's keep grid) that fits."""
    from search_spaces.cost import policy_cost
    from search_spaces.policy import Policy

    bits = sorted(
        {c for k in space.searchable if k.kind == "bits" for c in k.choices}, reverse=True
    )
    keeps = sorted({c for k in space.searchable if k.kind == "keep" for c in k.choices} | {1.0},
                   reverse=True)  # fmt: skip
    found = []
    for b in bits:
        for keep in keeps:
            policy = Policy.uniform(space, b, keep)
            if policy_cost(space, policy).size_bytes <= size:
                found.append((f"uniform:{b}:{keep:g}", policy))
                break
    return found


def budgets_for(task: str, bits_list: list[int]) -> list[Budgeted]:
    """The budgets of one task and the best uniform policy within each, scored here."""
    import torch

    from orchestrator.config import make_config
    from orchestrator.evaluate import Evaluator, RecoverySettings
    from orchestrator.prepare import build_space
    from search_spaces.cost import policy_cost
    from search_spaces.policy import Policy

    config = make_config({"task": task, "space": space_of(task)})
    resolved, _, space = build_space(config)
    torch.set_num_threads(WORKERS)
    evaluator = Evaluator(resolved, space, recovery=RecoverySettings(), device=torch.device("cpu"))
    scored: dict[str, float] = {}

    def score(label: str, policy: Any) -> float:
        if policy.hash not in scored:
            scored[policy.hash] = float(evaluator.evaluate(policy)["metric"])
            print(f"  {short(task)} {label}: {scored[policy.hash]:.4f} at "
                  f"{policy_cost(space, policy).size_bytes} B", file=sys.stderr, flush=True)  # fmt: skip
        return scored[policy.hash]

    float_policy = Policy.uniform(space, 32)
    out = []
    for bits in bits_list:
        size = policy_cost(space, Policy.uniform(space, bits)).size_bytes
        results = [(score(label, p), label) for label, p in uniform_policies(space, size)]
        metric, label = max(results)
        out.append(Budgeted(task=task, bits=bits, size=size, uniform_metric=metric,
                            uniform_label=label,
                            uniform_bits_metric=score(f"uniform:{bits}", Policy.uniform(space, bits)),
                            float_metric=score("float", float_policy),
                            float_size=policy_cost(space, float_policy).size_bytes))  # fmt: skip
    return out


def space_of(task: str) -> dict[str, Any]:
    """The `space:` section of the task's example config (examples/pretrained-*.yaml), if
    any: MiniLM's keeps BERT's attention unpruned (its heads are not cut whole)."""
    import yaml

    for path in (ROOT / "examples").glob("pretrained-*.yaml"):
        data = yaml.safe_load(path.read_text())
        if data.get("task") == task:
            return data.get("space") or {}
    return {}


def search_config(system: str, b: Budgeted, trials: int, seed: int, out: Path) -> Any:
    from orchestrator.config import make_config

    data: dict[str, Any] = {
        "task": b.task, "trials": trials, "seed": seed, "out": str(out),
        "study": f"{short(b.task)}-{b.bits}b-{trials}-s{seed}-{(*SEARCHES, *ABLATIONS).index(system)}",
        "workers": {"count": WORKERS}, "objective": "budget", "budget": f"size={b.size}B",
        "space": space_of(b.task),
    }  # fmt: skip
    if system in ABLATIONS:
        data |= ABLATIONS[system]
    elif system != PRUNESEARCH:
        data |= {"sampler": "random" if system == RANDOM else "tpe", "seeding": False,
                 "baselines": False, "local_search": False, "fidelity": {"enabled": False}}  # fmt: skip
    return make_config(data)


@dataclass(frozen=True, kw_only=True)
class Run:
    task: str
    bits: int
    trials: int
    system: str
    seed: int
    best: float
    seconds: float
    origin: str  # where the best trial came from
    probes: int = 0  # prunesearch: evaluations in its sensitivity table (before trial 0)


def search(system: str, b: Budgeted, trials: list[int], seed: int, out: Path) -> list[Run]:
    """One run of `max(trials)`, read off at every count of `trials` (its first N)."""
    import pandas as pd

    from orchestrator.search import run_search

    start = time.perf_counter()
    result = run_search(search_config(system, b, max(trials), seed, out), quiet=True,
                        sys_path=(str(ROOT),))  # fmt: skip
    seconds = time.perf_counter() - start
    if result.error:
        raise SystemExit(f"{system} on {b.task} stopped early: {result.error}")
    t = result.trials
    table = result.study_dir / "sensitivity.parquet"
    probes = len(pd.read_parquet(table)) if table.is_file() else 0
    done = t[(t["state"] == "COMPLETE") & t["feasible"].astype(bool) & (t["size_bytes"] <= b.size)]
    runs = []
    for n in trials:
        best = done[done["trial"] < n].sort_values(["metric", "size_bytes"],
                                                   ascending=[False, True]).head(1)  # fmt: skip
        runs.append(Run(task=b.task, bits=b.bits, trials=n, system=system, seed=seed,
                        best=float(best["metric"].iloc[0]) if len(best) else float("nan"),
                        seconds=seconds,
                        origin=str(best["origin"].iloc[0]) if len(best) else "-",
                        probes=probes))  # fmt: skip
    return runs


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def table(runs: list[Run], budgets: list[Budgeted], trials: list[int],
          systems: tuple[str, ...] = SEARCHES) -> list[str]:  # fmt: skip
    head = ["task", "budget", "trials", "system", "best within budget (mean)", "per seed",
            "vs best uniform (min)", "best from", "s/run"]  # fmt: skip
    rows = []
    for b in budgets:
        budget = f"uniform {b.bits}-bit, {b.size:,} B"
        for n in trials:
            for system in systems:
                rs = [r for r in runs if (r.task, r.bits, r.trials, r.system)
                      == (b.task, b.bits, n, system)]  # fmt: skip
                if not rs:
                    continue
                origins = "/".join(sorted({r.origin for r in rs}))
                seconds = f"{mean([r.seconds for r in rs]):.0f}" if n == max(trials) else "-"
                rows.append([short(b.task), budget, str(n), system,
                             f"{mean([r.best for r in rs]):.4f}",
                             " ".join(f"{r.best:.4f}" for r in rs),
                             f"{min(r.best for r in rs) - b.uniform_metric:+.4f}", origins,
                             seconds])  # fmt: skip
        rows.append([short(b.task), budget, "-", UNIFORM, f"{b.uniform_metric:.4f}",
                     b.uniform_label, "-", "-", "-"])  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def verdicts(runs: list[Run], budgets: list[Budgeted], trials: list[int]) -> list[str]:
    out = []
    for b in budgets:
        for n in trials:
            by = {s: [r for r in runs if (r.task, r.bits, r.trials, r.system)
                      == (b.task, b.bits, n, s)] for s in SEARCHES}  # fmt: skip
            ps = by[PRUNESEARCH]
            if not ps:
                continue
            tag = f"[{short(b.task)}, uniform {b.bits}-bit size, {n} trials]"
            margin = min(r.best for r in ps) - b.uniform_metric
            out.append(f"{'PASS' if margin >= 0 else 'FAIL'}  {tag} prunesearch >= best uniform "
                       f"within budget ({b.uniform_label}, {b.uniform_metric:.4f}) on every seed: "
                       f"min margin {margin:+.4f}")  # fmt: skip
            means = {s: mean([r.best for r in rs]) for s, rs in by.items() if rs}
            ok = all(means[PRUNESEARCH] > means[s] for s in (RANDOM, PLAIN) if s in means)
            out.append(f"{'PASS' if ok else 'FAIL'}  {tag} mean {means[PRUNESEARCH]:.4f} vs random "
                       f"{means.get(RANDOM, float('nan')):.4f} "
                       f"({means[PRUNESEARCH] - means.get(RANDOM, float('nan')):+.4f}), plain TPE "
                       f"{means.get(PLAIN, float('nan')):.4f} "
                       f"({means[PRUNESEARCH] - means.get(PLAIN, float('nan')):+.4f})")  # fmt: skip
    return out


def stretch(runs: list[Run], budgets: list[Budgeted], trials: list[int]) -> list[str]:
    """Issue 12's stretch target: at the uniform 3-bit size, the uniform 4-bit metric."""
    out = []
    for b3 in (b for b in budgets if b.bits == 3):
        b4 = next((b for b in budgets if b.task == b3.task and b.bits == 4), None)
        if b4 is None:
            continue
        for n in trials:
            ps = [r.best for r in runs if (r.task, r.bits, r.trials, r.system)
                  == (b3.task, 3, n, PRUNESEARCH)]  # fmt: skip
            if ps:
                met = mean(ps) >= b4.uniform_bits_metric
                out.append(f"{'met ' if met else 'not met'}  [{short(b3.task)}, {n} trials] at the "
                           f"uniform 3-bit size prunesearch's mean {mean(ps):.4f} vs the uniform "
                           f"4-bit policy's {b4.uniform_bits_metric:.4f} ({b4.size:,} B)")  # fmt: skip
    return out


def run_budget_mode(*, tasks: list[str], trials: list[int], seeds: list[int], bits: list[int],
                    ablate: bool = False, only: str | None = None) -> int:  # fmt: skip
    """`ablate`: also prunesearch without seeding (the quantization-noise prior, no seeds),
    without local moves and with the sensitivity phase unbounded, to see what each part
    buys. `only`: the systems whose name
    starts with it (e.g. "prunesearch")."""
    systems = SEARCHES + (tuple(ABLATIONS) if ablate else ())
    systems = tuple(s for s in systems if only is None or s.startswith(only))
    sys.path.insert(0, str(ROOT))  # task specs name `benchmarks.pretrained`
    os.chdir(ROOT)  # workers import task modules from the working directory
    warnings.filterwarnings("ignore")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    budgets = [b for task in tasks for b in budgets_for(task, bits)]
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")  # fmt: skip
    runs: list[Run] = []
    try:
        with tempfile.TemporaryDirectory(prefix="quality-budget-") as out:
            for b in budgets:
                for seed in seeds:
                    for system in systems:
                        runs += search(system, b, trials, seed, Path(out))
                        print(f"  done {short(b.task)} {b.bits}-bit seed {seed} {system}: "
                              + ", ".join(f"{r.trials} trials {r.best:.4f}"
                                          for r in runs[-len(trials):]),
                              file=sys.stderr, flush=True)  # fmt: skip
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    print(f"quality --mode budget: {', '.join(map(short, tasks))}; budgets uniform "
          f"{'/'.join(map(str, bits))}-bit sizes; trials {', '.join(map(str, trials))}; seeds "
          f"{', '.join(map(str, seeds))}; {WORKERS} workers; {wall:.0f} s in all")  # fmt: skip
    for task in tasks:
        b = next(x for x in budgets if x.task == task)
        print(f"  {short(task)}: float {b.float_size:,} B, metric {b.float_metric:.4f}; "
              + "; ".join(f"uniform {x.bits}-bit {x.size:,} B, metric {x.uniform_bits_metric:.4f}"
                          for x in budgets if x.task == task))  # fmt: skip
    for task in tasks:
        probes = max((r.probes for r in runs if r.task == task), default=0)
        print(f"  {short(task)}: prunesearch's sensitivity table, {probes} evaluations before "
              "its first trial (outside the trial count; cached per task and space, so "
              "measured once for all budgets and seeds)")  # fmt: skip
    print()
    print("\n".join(table(runs, budgets, trials, systems)))
    print()
    print("best within budget: max metric of COMPLETE trials no larger than the budget; best "
          "from: the origin of that trial (baseline, seed, local, repair, sampler).")  # fmt: skip
    lines = verdicts(runs, budgets, trials)
    print("\n".join(lines))
    print("\n".join(stretch(runs, budgets, trials)))
    return 0 if all(line.startswith("PASS") for line in lines) else 1
