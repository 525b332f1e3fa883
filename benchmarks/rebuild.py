"""Rebuild cost: per-candidate rebuild time beside the scoring pass, per built-in task.

For each built-in task (default pruning: structured where the model allows) an Evaluator
is made as a worker makes it, and random canonical policies (fixed seed, after a few
warm-up candidates) are timed step by step, as `Evaluator.evaluate` runs them:

  rebuild   `ev.rebuilder(policy)`: slicing (structured) or masking, plus fake-quant,
            twice over the same policies: cold (the worker's tensor cache off, so every
            sliced and quantized tensor is computed, as for a worker's first candidates)
            and cached (as a worker runs: each tensor variant computed once, then reused;
            the mean includes every miss);
  BN        BatchNorm re-estimation on the calibration batches (models with BatchNorm);
  scoring   `task.metric(model, validation)` under torch.no_grad: one pass over all
            validation batches.

It also times one forward pass over the validation batches of the base model beside the
model pruned to keep 0.5 in every group (float weights), and counts both models' params.
Prints one table and a PASS/FAIL line per target (targets: rebuild <= 10% of the
scoring pass; the pruned model's forward faster than the base model's).

    python benchmarks/rebuild.py
    python benchmarks/rebuild.py --policies 100 --repeats 50

torch runs on one thread (torch.set_num_threads(1)) so the numbers are stable and
comparable across machines with different core counts.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orchestrator.batches import Batch, call_model
from orchestrator.config import make_config
from orchestrator.evaluate import Evaluator, RecoverySettings, recalibrate_batchnorm
from orchestrator.prepare import build_space
from orchestrator.task import BUILTIN_TASKS
from search_spaces import SearchSpace
from search_spaces.policy import Policy

SEED = 0
WARMUP = 5
REBUILD_TARGET = 0.10  # rebuild at most this fraction of the scoring pass
PRUNED_KEEP = 0.5
_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True, kw_only=True)
class Row:
    task: str
    pruning: str
    knobs: int
    policies: int
    rebuild_ms: float  # mean, tensor cache on (a worker's steady state, misses included)
    cold_rebuild_ms: float  # mean, tensor cache off
    hit_rate: float
    bn_ms: float | None  # None: the model has no BatchNorm
    score_ms: float
    base_forward_ms: float
    pruned_forward_ms: float
    base_params: int
    pruned_params: int

    @property
    def rebuild_share(self) -> float:
        return self.rebuild_ms / self.score_ms

    @property
    def speedup(self) -> float:
        return self.base_forward_ms / self.pruned_forward_ms


def _ms(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return 1000 * (time.perf_counter() - start), out


def random_policies(space: SearchSpace, count: int, seed: int) -> list[Policy]:
    rng = random.Random(seed)
    return [
        Policy.from_values(space, {k.name: rng.choice(k.choices) for k in space.knobs})
        for _ in range(count)
    ]


def time_candidates(
    ev: Evaluator, policies: list[Policy], *, warmup: int
) -> dict[str, list[float]]:
    """Per policy: rebuild, BN re-estimation and scoring times (ms); warm-ups not kept."""
    has_bn = any(isinstance(m, _BN) for m in ev.rebuilder.model.modules())
    times: dict[str, list[float]] = {"rebuild": [], "bn": [], "score": []}
    for i, policy in enumerate(policies):
        rebuild, model = _ms(lambda p=policy: ev.rebuilder(p))
        bn = None
        if has_bn:
            bn, changed = _ms(lambda m=model: recalibrate_batchnorm(m, ev.calibration))
            if model is ev.rebuilder.model:  # unstructured: the working copy, restore later
                ev.rebuilder.mark_dirty(set(changed))
        with torch.no_grad():
            score, _ = _ms(lambda m=model: ev.task.metric(m, ev.validation))
        if i >= warmup:
            times["rebuild"].append(rebuild)
            times["score"].append(score)
            if bn is not None:
                times["bn"].append(bn)
    return times


@torch.no_grad()
def forward_ms(model: nn.Module, batches: list[Batch], *, repeats: int, warmup: int = 3) -> float:
    """Median wall of one forward pass over all `batches`."""
    model.eval()
    runs = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        for inputs, _ in batches:
            call_model(model, inputs)
        if i >= warmup:
            runs.append(1000 * (time.perf_counter() - start))
    return statistics.median(runs)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_task(name: str, *, policies: int, repeats: int) -> Row:
    task, base, space = build_space(make_config({"task": name}))
    ev = Evaluator(task, space, recovery=RecoverySettings(), device="cpu")
    candidates = random_policies(space, WARMUP + policies, SEED)
    cache = ev.rebuilder.cache
    cache.max_bytes, limit = 0, cache.max_bytes  # cold: nothing is ever kept
    cold = time_candidates(ev, candidates, warmup=WARMUP)
    cache.max_bytes = limit
    cache.clear()
    times = time_candidates(ev, candidates, warmup=WARMUP)
    base.eval()
    base_fwd = forward_ms(base, ev.validation, repeats=repeats)
    pruned = ev.rebuilder(Policy.uniform(space, 32, PRUNED_KEEP))
    pruned_fwd = forward_ms(pruned, ev.validation, repeats=repeats)
    med, mean = statistics.median, statistics.fmean
    return Row(task=name, pruning=space.pruning, knobs=len(space.searchable), policies=policies,
               rebuild_ms=mean(times["rebuild"]), cold_rebuild_ms=mean(cold["rebuild"]),
               hit_rate=cache.hit_rate, bn_ms=med(times["bn"]) if times["bn"] else None,
               score_ms=med(times["score"]), base_forward_ms=base_fwd,
               pruned_forward_ms=pruned_fwd, base_params=params(base),
               pruned_params=params(pruned))  # fmt: skip


# -- report -----------------------------------------------------------------------------
HEADER = ["task", "pruning", "knobs", "policies", "rebuild ms cold", "rebuild ms",
          "cache hits", "BN re-est ms", "scoring ms",
          "rebuild % scoring", "fwd base ms", f"fwd keep {PRUNED_KEEP} ms", "speed-up",
          "params base", f"params keep {PRUNED_KEEP}"]  # fmt: skip

NOTES = """\
rebuild / BN re-est / scoring: over {policies} random canonical policies per task (seed {seed},
  after {warmup} warm-up candidates); rebuild = ev.rebuilder(policy) (slicing or masking + fake-quant),
  mean, with the worker's tensor cache off (cold) and on (as a worker runs; misses included;
  cache hits = share of tensor lookups served from the cache); BN re-est and scoring: medians;
  BN re-est = recalibrate_batchnorm on the calibration batches, scoring = task.metric over all validation batches.
fwd: median of {repeats} forward passes over all validation batches (3 warm-up), base model vs the model
  rebuilt with keep {keep} in every group and float weights; speed-up = fwd base / fwd keep {keep}."""


def table(rows: list[Row]) -> str:
    lines = [[r.task, r.pruning, str(r.knobs), str(r.policies), f"{r.cold_rebuild_ms:.2f}",
              f"{r.rebuild_ms:.2f}", f"{100 * r.hit_rate:.0f}%",
              "n/a" if r.bn_ms is None else f"{r.bn_ms:.2f}", f"{r.score_ms:.2f}",
              f"{100 * r.rebuild_share:.1f}%", f"{r.base_forward_ms:.2f}",
              f"{r.pruned_forward_ms:.2f}", f"{r.speedup:.2f}x", str(r.base_params),
              str(r.pruned_params)] for r in rows]  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(HEADER)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    out = [fmt.format(*HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [fmt.format(*line) for line in lines])


def verdicts(r: Row) -> list[str]:
    share_ok = r.rebuild_share <= REBUILD_TARGET
    fast_ok = r.pruned_forward_ms < r.base_forward_ms
    return [
        f"{'PASS' if share_ok else 'FAIL'}  [{r.task}] rebuild {r.rebuild_ms:.2f} ms = "
        f"{100 * r.rebuild_share:.1f}% of scoring {r.score_ms:.2f} ms "
        f"(target <= {100 * REBUILD_TARGET:.0f}%; cold {r.cold_rebuild_ms:.2f} ms = "
        f"{100 * r.cold_rebuild_ms / r.score_ms:.1f}%)",
        f"{'PASS' if fast_ok else 'FAIL'}  [{r.task}] keep-{PRUNED_KEEP} forward "
        f"{r.pruned_forward_ms:.2f} ms vs base {r.base_forward_ms:.2f} ms, {r.speedup:.2f}x "
        "(target: faster)",
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} on "
            f"{torch.get_num_threads()} thread (torch.set_num_threads(1)), Python "
            f"{platform.python_version()}, device cpu")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=200,
                        help="random policies timed per task, after warm-up (200: a worker's share "
                             "of a 400-trial search on 2 workers)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=30,
                        help="forward passes timed per model; the median is shown (30)")  # fmt: skip
    parser.add_argument("--tasks", default=",".join(BUILTIN_TASKS),
                        help=f"comma-separated built-in tasks ({','.join(BUILTIN_TASKS)})")  # fmt: skip
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in BUILTIN_TASKS]
    if unknown or not tasks:
        parser.error(f"--tasks: unknown {unknown}; choose from {list(BUILTIN_TASKS)}")
    if min(args.policies, args.repeats) < 1:
        parser.error("--policies and --repeats must be at least 1")

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    rows = [bench_task(t, policies=args.policies, repeats=args.repeats) for t in tasks]
    print(f"rebuild: built-in tasks, default pruning (structured where the model allows), "
          f"{args.policies} random policies per task, seed {SEED}")  # fmt: skip
    print(machine())
    print(table(rows))
    print(NOTES.format(policies=args.policies, seed=SEED, warmup=WARMUP, repeats=args.repeats,
                       keep=PRUNED_KEEP))  # fmt: skip
    checks = [v for r in rows for v in verdicts(r)]
    print("\n".join(checks))
    return 0 if all(c.startswith("PASS") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
