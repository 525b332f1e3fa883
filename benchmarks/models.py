"""Real architectures end to end: what prunesearch makes of each torchvision classifier.

    python benchmarks/models.py                       # the zoo of issue 14
    python benchmarks/models.py --arch resnet18,swin_t --policies 8

Per architecture, in a subprocess of its own (a time limit, and its peak memory read
back): build the task (orchestrator.tasks.vision: seeded random init, BatchNorm settled,
64x64), profile, plan structured pruning (`pruning: auto`), derive the space; then
rebuild and score the float policy (one evaluation's time), the smallest policy (every
knob at its minimum) and random policies, checking for each that the rebuild runs and
that the cost model's params and MACs equal the rebuilt model's (structured mode).

Prints one markdown table (docs/models.md): parameters, knobs (bits / keep), groups
structured and left out (the commonest reason), layers skipped, planning time and peak
memory, one evaluation, failures and cost mismatches.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ZOO = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "densenet121", "shufflenet_v2_x1_0", "squeezenet1_0", "mnasnet0_5", "googlenet", "inception_v3", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t"]  # fmt: skip


def _rebuilt_costs(model, example) -> tuple[int, int]:
    from search_spaces import profile_model

    profile = profile_model(model, example)
    macs = sum(layer.numel * layer.uses for layer in profile.layers)
    return sum(p.numel() for p in model.parameters()), macs


def probe(arch: str, policies: int, seed: int) -> dict:
    import torch

    from orchestrator.compress.plan import plan_groups
    from orchestrator.config import make_config
    from orchestrator.evaluate import Evaluator, RecoverySettings
    from orchestrator.prepare import build_space
    from search_spaces.cost import policy_cost
    from search_spaces.policy import Policy

    torch.set_num_threads(1)
    row: dict = {"arch": arch}
    config = make_config({"task": f"orchestrator.tasks.vision:{arch}"})
    t0 = time.perf_counter()
    task = __import__("orchestrator.task", fromlist=["resolve_task"]).resolve_task(config.task)
    model, example = task.model(), task.example_inputs()
    row["load_s"] = time.perf_counter() - t0
    row["params"] = sum(p.numel() for p in model.parameters())
    timed = {}
    original = plan_groups

    def timed_plan(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            timed["plan_s"] = time.perf_counter() - start

    import orchestrator.prepare as prepare_module

    prepare_module.plan_groups = timed_plan
    t0 = time.perf_counter()
    _, _, space = build_space(config)
    row["space_s"] = time.perf_counter() - t0
    row["plan_s"] = timed.get("plan_s", 0.0)
    kinds = collections.Counter(k.kind for k in space.searchable)
    row.update(knobs=len(space.searchable), bits=kinds["bits"], keep=kinds["keep"],
               pruning=space.pruning, skipped=dict(space.skipped),
               groups=len(space.plan.groups) if space.plan else 0,
               unpruned=dict(space.unpruned))  # fmt: skip
    recovery = RecoverySettings(**config.recovery.model_dump())
    t0 = time.perf_counter()
    evaluator = Evaluator(task, space, recovery=recovery)
    row["worker_s"] = time.perf_counter() - t0
    rng = random.Random(seed)
    tests = [("float", Policy.uniform(space, 32, 1.0)),
             ("min", Policy.from_values(space, space.extreme_values("min")))]  # fmt: skip
    for i in range(policies):
        values = {k.name: rng.choice(k.choices) for k in space.searchable}
        tests.append((f"random{i}", Policy.from_values(space, values)))
    failures, mismatches, evals = [], [], []
    for label, policy in tests:
        try:
            result = evaluator.evaluate(policy)
            evals.append(result["eval_seconds"])
            row[f"metric_{label}"] = result["metric"]
            if space.pruning == "structured":
                cost = policy_cost(space, policy)
                model = evaluator.compressed_model(policy)
                params, macs = _rebuilt_costs(model, example)
                if (params, macs) != (cost.params, cost.macs):
                    mismatches.append(f"{label}: params {params} vs {cost.params}, "
                                      f"macs {macs} vs {cost.macs}")  # fmt: skip
        except Exception as exc:
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:160]}")
    row.update(eval_s=evals[0] if evals else None, failures=failures, mismatches=mismatches,
               rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    return row


def _commonest(reasons: dict) -> str:
    if not reasons:
        return ""
    text, n = collections.Counter(
        r.split(" (")[0].split(":")[0] if "member" not in r else r.split(" (")[1].split(")")[0]
        for r in reasons.values()
    ).most_common(1)[0]
    return f"{text} ({n})"


def _fmt(row: dict) -> str:
    if "error" in row:
        return f"| {row['arch']} | | | | | | {row['error']} |"
    left = len(row["unpruned"])
    return (
        f"| {row['arch']} | {row['params'] / 1e6:.1f}M | {row['knobs']} ({row['bits']} / "
        f"{row['keep']}) | {row['groups']} / {left} {_commonest(row['unpruned'])} | "
        f"{len(row['skipped'])} | {row['plan_s']:.1f} s, {row['rss_mb']:.0f} MB | "
        f"{row['eval_s'] or 0:.2f} s | {len(row['failures'])} / {len(row['mismatches'])} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default=",".join(ZOO))
    parser.add_argument("--policies", type=int, default=6, help="random policies per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=8,
        help="address-space limit of each architecture's process",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write every row here (JSON lines)")
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(probe(args.one, args.policies, args.seed)))
        return
    print("| architecture | params | knobs (bits / keep) | groups structured / left out "
          "(commonest reason) | layers skipped | planning, peak RSS | one evaluation | "
          "failed / cost mismatches |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for arch in args.arch.split(","):
        cmd = [sys.executable, __file__, "--one", arch, "--policies", str(args.policies),
               "--seed", str(args.seed)]  # fmt: skip
        try:
            limit = int(args.memory_gb * 2**30)
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.timeout,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
                preexec_fn=lambda limit=limit: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
            )  # fmt: skip
            line = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
            row = (
                json.loads(line[0][4:])
                if line
                else {"arch": arch, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
            )
        except subprocess.TimeoutExpired:
            row = {"arch": arch, "error": f"no result within {args.timeout:.0f} s"}
        rows.append(row)
        print(_fmt(row), flush=True)
    for row in rows:
        for what in ("failures", "mismatches"):
            for text in row.get(what, []):
                print(f"  {row['arch']} {what[:-1]}: {text}")
        for group, reason in list(row.get("unpruned", {}).items())[:3]:
            print(f"  {row['arch']} left out {group}: {reason[:160]}")
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
