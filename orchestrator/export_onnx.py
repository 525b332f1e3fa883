"""`prunesearch export --format onnx` (issue 15): a trial as the ONNX file it was scored as.

For a study of the onnxruntime target, the file is the very artifact the worker scored:
the same skeleton, tensors and codes (orchestrator/targets/onnx_artifact.py). Before
anything is written it is loaded into ONNX Runtime and must reproduce the trial's recorded
size (to the byte), metric (to METRIC_TOLERANCE) and latency (within LATENCY_NOISE), or
the export stops with one line. Latency is a property of the machine as much as of the
file: a run disagreeing with the record is timed again (RETIMES rounds, the fastest
counts: load only ever slows a run), and a user whose trial was timed on a loaded
machine may accept the export's own timing (`--accept-latency`; policy.json records both).
For a study of the torch target the same writer gives
its integer-weight ONNX file (3-bit codes in int4, 5..8-bit in int8), from a skeleton of
the candidate's own architecture (a torch study may cut what the base model's ONNX graph
fixes, e.g. an LSTM's hidden size); its metric in ONNX Runtime is recorded beside the
trial's (`artifact_metric`), as a parity check, not a condition.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from orchestrator.budget import Budget
from orchestrator.compress.codec import ExportError
from orchestrator.config import SearchConfig
from orchestrator.errors import ConfigError
from orchestrator.runrecord import RunRecord
from orchestrator.targets import TargetSettings, target_of
from search_spaces import SearchSpace
from search_spaces.cost import artifact_bytes
from search_spaces.policy import Policy

METRIC_TOLERANCE = 1e-6  # ONNX Runtime on the same inputs and threads as the worker
# the latency measured at export against the trial's: a shared machine's timings vary by
# tens of percent from run to run, a wrong artifact by far more
LATENCY_NOISE = 2.0
LATENCY_FLOOR_MS = 0.05
RETIMES = 3  # rounds of the configured warm-up and timed runs before the latency disagrees
ONNX_POLICY_FORMAT = "prunesearch-onnx-policy/1"


def export_onnx_trial(config: SearchConfig, run: RunRecord, row: Any, space: SearchSpace,
                      task: Any, base: Any, *, budget: Budget | None = None,
                      device: Any = "cpu", accept_latency: bool = False,
                      ) -> tuple[bytes, dict[str, Any]]:  # fmt: skip
    """Trial `row` as its ONNX file and the record of it (policy.json's), checked; nothing
    written. The caller sets the workers' thread count. `accept_latency`: a latency more
    than LATENCY_NOISE off the recorded one is recorded, not refused."""
    from orchestrator.evaluate import Evaluator, RecoverySettings

    onnxruntime = target_of("onnxruntime")
    onnxruntime.check(task.example_inputs())
    deployed = config.target == "onnxruntime"
    policy = Policy.from_json(space, row.policy)
    settings = config.target_settings() if deployed else TargetSettings(name="onnxruntime")
    evaluator = Evaluator(task, space, recovery=RecoverySettings(**config.recovery.model_dump()),
                          device=device, target=settings)  # fmt: skip
    model = evaluator.compressed_model(policy)
    if not deployed:  # no layout priced this study: the candidate's own architecture's
        own = dataclasses.replace(space, artifact=onnxruntime.layout(model, task.example_inputs()))
        evaluator.runner = onnxruntime.runner(own, settings, evaluator.device)
    artifact = evaluator.artifact_of(model, policy)  # activations calibrated as when scored
    metric = float(task.metric(artifact.model, evaluator.validation))
    recorded = _recorded(row, "latency_ms")  # a torch study's: another runtime's
    median, p90, rounds = _timed(evaluator, artifact, recorded if deployed else None)
    data = artifact.data
    if deployed and len(data) != artifact_bytes(space, policy):
        raise ExportError(f"internal: the ONNX file takes {len(data)} bytes, the cost model "
                          f"counted {artifact_bytes(space, policy)}")  # fmt: skip
    latency_check = None
    if deployed:
        latency_check = _check(row, len(data), metric, median, accept_latency=accept_latency)
    record = {
        "format": ONNX_POLICY_FORMAT, "study": run.study, "trial": int(row.trial),
        "task": config.task, "target": config.target, "policy": dict(policy.items_),
        "policy_hash": policy.hash, "budget": budget.describe() if budget else None,
        "metric": float(row.metric), "artifact_metric": metric,
        "latency_ms": median, "latency_p90_ms": p90,
        "recorded_latency_ms": recorded, "latency_check": latency_check,
        "latency_rounds": rounds,
        "latency_settings": dataclasses.asdict(settings.latency),
        "model_file": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "base": run.base.model_dump(exclude_unset=True),
    }  # fmt: skip
    return data, record


def _recorded(row: Any, column: str) -> float | None:
    value = getattr(row, column, None)
    return None if value is None or value != value else float(value)  # NaN: not measured


def _agrees(latency: float, recorded: float | None) -> bool:
    return recorded is None or (recorded / LATENCY_NOISE - LATENCY_FLOOR_MS <= latency
                                <= recorded * LATENCY_NOISE + LATENCY_FLOOR_MS)  # fmt: skip


def _timed(evaluator: Any, artifact: Any, recorded: float | None) -> tuple[float, float, int]:
    """(median, p90, rounds): the artifact timed as a worker times it, again while it
    disagrees with `recorded` (up to RETIMES rounds); the round with the lowest median
    counts, as the one the machine disturbed least."""
    timed: list[tuple[float, float]] = []
    while len(timed) < RETIMES and (not timed or not _agrees(min(timed)[0], recorded)):
        timed.append(evaluator.runner.latency(artifact, evaluator.latency_inputs))
    return (*min(timed), len(timed))


def _check(row: Any, size: int, metric: float, latency: float, *,
           accept_latency: bool = False) -> str | None:  # fmt: skip
    """The file must be the trial: its size, its metric and (within noise) its latency.
    Returns how the latency compared (None: the trial recorded none)."""
    trial = int(row.trial)
    if size != int(row.size_bytes):
        raise ExportError(f"the ONNX file of trial {trial} takes {size} bytes but the trial "
                          f"recorded {int(row.size_bytes)} (a study recorded by an earlier "
                          "prunesearch, whose files folded no BatchNorm? export it with that "
                          "version); nothing was written")  # fmt: skip
    if not abs(metric - row.metric) <= METRIC_TOLERANCE:
        raise ExportError(f"the ONNX file of trial {trial} scores {metric:.6f} in ONNX Runtime "
                          f"but the trial recorded {row.metric:.6f} (another device or "
                          "onnxruntime version?); nothing was written")  # fmt: skip
    recorded = _recorded(row, "latency_ms")
    if recorded is None:
        return None
    if _agrees(latency, recorded):
        return "within noise"
    if accept_latency:
        return "accepted"
    raise ExportError(f"the ONNX file of trial {trial} runs in {latency:.3f} ms here ({RETIMES} "
                      f"rounds) but the trial measured {recorded:.3f} ms (more than "
                      f"{LATENCY_NOISE:g}x apart: another machine, or a loaded one?); nothing "
                      "was written (export on the machine type the study ran on, or pass "
                      "--accept-latency to export it with the latency measured now)")  # fmt: skip


def check_format(format: str | None, config: SearchConfig) -> str:
    """The export format: given, or the target's."""
    chosen = format or target_of(config.target).export_format
    if chosen not in ("safetensors", "onnx"):
        raise ConfigError(f"--format '{chosen}': use safetensors or onnx")
    if chosen == "safetensors" and config.target == "onnxruntime":
        raise ConfigError("--format safetensors: this study's target is onnxruntime, whose "
                          "trials are ONNX files; export with --format onnx")  # fmt: skip
    return chosen
