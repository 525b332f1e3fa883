"""Search what you deploy (issue 15): float ONNX vs uniform int8 weights (W8A32) vs uniform
int8 weights and activations (W8A8) vs the best searched policy under a latency budget of 60% of the float model's, all measured in ONNX
Runtime on this machine, side by side in one run.

    python benchmarks/latency.py                        # four models, 32 trials each
    python benchmarks/latency.py --tasks digits-resnet --trials 16
    python benchmarks/latency.py --keep /tmp/studies   # keep each search's study to read

Per model (`target: onnxruntime`, `latency: {batch: 1, threads: 1, warmup: 10, repeats:
50}`, `--workers` workers (default 1: on a 2-core machine a second worker scoring beside
the one timing a candidate moves its latency by 30-70%), `objective: budget`):
- float / W8A32 / W8A8: the uniform policies, each evaluated once by the same Evaluator a
  worker runs (its ONNX file built, scored and timed in ONNX Runtime). W8A32 keeps
  activations float (weights dequantized to float kernels); W8A8 puts Q/DQ pairs on every
  Conv/Gemm's input and output, which ONNX Runtime fuses into QLinearConv/QGemm;
- searched: `prunesearch run` with `budget: latency<=0.6 x float` over weight bits, keep
  ratios and activation bits (`space.act_bits: [8, 32]`); the best trial within it;
- layer table: the per-layer latency table's probes (orchestrator/latency_table.py) and
  the seconds a worker took to time them, with an empty cache (the benchmark uses a
  temporary cache directory; a user's second study on the same machine reads them back);
- prediction error: |predicted / measured - 1| of the driver's latency prediction over
  every candidate measured in the search (median, p90; target median <= 10%);
- timing noise: the float model's file timed again NOISE_ROUNDS times as a worker times a
  candidate (each a median of `repeats` runs): the median and largest |time / median - 1|.
  A prediction cannot be judged closer than the timings it is judged against;
- size vs predicted: every evaluated candidate's ONNX file against the cost model's
  size_bytes (target: equal to the byte);
- artifact share: writing the ONNX file and making its session, over the whole
  evaluation (median over the search's candidates; target <= 20%).
The vision models are torchvision's resnet18 and mobilenet_v2 at 64x64 (random init,
BatchNorm statistics settled; metric: top-1 agreement with the float model), so their
metric falls fast with any compression; the figures that matter here are latency, size
and the predictions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["digits-resnet", "digits-lstm", "orchestrator.tasks.vision:resnet18",
         "orchestrator.tasks.vision:mobilenet_v2"]  # fmt: skip
LATENCY = {"batch": 1, "threads": 1, "warmup": 10, "repeats": 50}
SHARE = 0.6  # the latency budget, of the float model's latency
SPACE = {"act_bits": [8, 32]}  # the search may put any Conv/Gemm in 8-bit integers


def _setup(config) -> tuple:
    """The space and one Evaluator as a worker holds them, for every measurement of a
    model outside its search."""
    from orchestrator.evaluate import Evaluator, RecoverySettings
    from orchestrator.prepare import build_space

    task, _, space = build_space(config)
    return space, Evaluator(task, space, recovery=RecoverySettings(),
                            target=config.target_settings())  # fmt: skip


def _table(space, evaluator) -> str:
    """The layer table's probes and the seconds to time them (cold cache)."""
    from orchestrator.search import latency_probe_request

    acts, least = latency_probe_request(space)  # as the search asks
    start = time.perf_counter()
    found = evaluator.latency_probes(acts, least)
    seconds = time.perf_counter() - start
    probes = sum(len(v) for v in found["layers"].values())
    return f"{len(found['layers'])} layers, {probes} probes, {seconds:.1f} s"


def _uniform(space, evaluator, bits: int, act_bits: int = 32) -> dict:
    from search_spaces.cost import policy_cost
    from search_spaces.policy import Policy

    uniform = Policy.uniform(space, bits)
    acts = {k.name for k in space.knobs if k.kind == "act_bits"}
    policy = Policy.from_values(space, {k: act_bits if k in acts else v
                                        for k, v in uniform.items()})  # fmt: skip
    result = evaluator.evaluate(policy)
    return {"metric": result["metric"], "latency_ms": result["latency_ms"],
            "size_bytes": result["artifact_bytes"],
            "predicted_bytes": policy_cost(space, policy).size_bytes}  # fmt: skip


NOISE_ROUNDS = 10


def _noise(space, evaluator) -> str:
    """The float model's file timed NOISE_ROUNDS times: how far one timing strays."""
    import statistics

    from search_spaces.policy import Policy

    policy = Policy.uniform(space, 32)
    artifact = evaluator.artifact_of(evaluator.compressed_model(policy), policy)
    times = [evaluator.runner.latency(artifact, evaluator.latency_inputs)[0]
             for _ in range(NOISE_ROUNDS)]  # fmt: skip
    middle = statistics.median(times)
    strays = [abs(t / middle - 1) for t in times]
    return f"{statistics.median(strays):.1%} / {max(strays):.0%}"


def _search(config_data: dict, limit_ms: float, trials: int, out: Path, workers: int) -> dict:
    import numpy as np

    from orchestrator.config import make_config
    from orchestrator.prepare import build_space
    from orchestrator.search import run_search
    from search_spaces.cost import policy_cost
    from search_spaces.policy import Policy

    config = make_config({**config_data, "objective": "budget", "trials": trials,
                          "budget": f"latency<={limit_ms:.4f}ms", "out": str(out),
                          "study": "s", "workers": {"count": workers}})  # fmt: skip
    start = time.monotonic()
    result = run_search(config)
    seconds = time.monotonic() - start
    trials_df = result.trials
    scored = trials_df[trials_df["latency_ms"].notna() & trials_df["cached_from"].isna()]
    error = (scored["latency_predicted_ms"] / scored["latency_ms"] - 1).abs().dropna()
    _, _, space = build_space(config)
    mismatched = sum(int(r.size_bytes) != policy_cost(space, Policy.from_json(space, r.policy)).size_bytes
                     for r in scored.itertuples())  # fmt: skip
    best = result.best_within_budget()
    return {
        "best": None if best is None else {"metric": best["metric"], "latency_ms": best["latency_ms"],
                                           "size_bytes": best["size_bytes"]},
        "error_median": float(np.median(error)) if len(error) else None,
        "error_p90": float(np.quantile(error, 0.9)) if len(error) else None,
        "measured": len(scored), "mismatched": mismatched,
        "artifact_share": float((scored["artifact_seconds"] / scored["eval_seconds"]).median()),
        "infeasible": int((trials_df["state"] == "INFEASIBLE").sum()),
        "within": int(((trials_df["state"] == "COMPLETE") & trials_df["feasible"]).sum()),
        "seconds": seconds,
    }  # fmt: skip


def _row(name: str, row: dict | None) -> str:
    if row is None:
        return f"{name} none within the budget"
    return (f"{name} {row['latency_ms']:.3f} ms, {row['size_bytes'] / 1e3:,.1f} KB, "
            f"metric {row['metric']:.4f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="write each search's study under this "
                        "directory (default: a temporary one, removed)")  # fmt: skip
    args = parser.parse_args()
    from orchestrator.config import make_config

    os.environ["PRUNESEARCH_CACHE"] = tempfile.mkdtemp(prefix="latency-bench-")  # cold tables
    header = ["model", "float", "int8 W8A32", "int8 W8A8", "layer table", "budget", "searched (best within budget)",
              "prediction error median / p90 (measured)", "timing noise median / max",
              "size = predicted",
              "artifact share of eval", "trials: within / infeasible by prediction", "search s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in args.tasks.split(","):
        data = {"task": task, "target": "onnxruntime", "latency": LATENCY, "space": SPACE}
        config = make_config(data)
        model = _setup(config)
        table = _table(*model)
        base, int8, w8a8 = _uniform(*model, 32), _uniform(*model, 8), _uniform(*model, 8, 8)
        noise = _noise(*model)
        limit = SHARE * base["latency_ms"]
        with tempfile.TemporaryDirectory() as tmp:
            out = args.keep / task.rpartition(":")[2] if args.keep else Path(tmp)
            found = _search(data, limit, args.trials, out, args.workers)
        exact = all(r["size_bytes"] == r["predicted_bytes"] for r in (base, int8, w8a8))
        cells = [
            task.rpartition(":")[2], _row("", base).strip(), _row("", int8).strip(),
            _row("", w8a8).strip(), table,
            f"<= {limit:.3f} ms", _row("", found["best"]).strip(),
            (f"{found['error_median']:.1%} / {found['error_p90']:.1%} ({found['measured']})"
             if found["error_median"] is not None else "-"), noise,
            f"{found['measured'] - found['mismatched']} of {found['measured']}"
            + ("" if exact else " (uniform: NOT equal)"),
            f"{found['artifact_share']:.1%}", f"{found['within']} / {found['infeasible']}",
            f"{found['seconds']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)  # progress, row by row
    print(f"latency: target onnxruntime (CPU), batch {LATENCY['batch']}, "
          f"{LATENCY['threads']} thread, {args.trials} trials per search, {args.workers} worker(s)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
