"""Evaluation inside one worker: rebuild, recovery, metric. No Ray here.

An Evaluator loads the task's model and data once (onto the worker's device) and then
scores many policies; `evaluate` returns a plain dict that crosses the wire to the driver.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.batches import Batch, call_model, logits_of, to_device
from orchestrator.compress.activations import calibrate
from orchestrator.compress.rebuild import Rebuilder
from orchestrator.fidelity import FidelitySettings, dominated, prefix_lengths, upper_bound
from orchestrator.targets import Artifact, TargetSettings, target_of
from orchestrator.task import Task
from search_spaces import SearchSpace
from search_spaces.kinds import kind_of

# the timings the latency predictor starts from are the fastest of this many rounds: the
# driver's own start-up runs beside them, and one disturbed round would skew every price
ANCHOR_ROUNDS = 3

_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True, kw_only=True)
class RecoverySettings:
    bn_recalibration: bool = True
    calibration_batches: int | None = None  # None: all the task's calibration batches
    finetune_steps: int = 0  # optimizer steps on the task's train batches before quantizing
    optimizer: str = "adam"
    lr: float = 1e-3
    act_calibration: str = "minmax"  # compress/activations.py METHODS


OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def finetune(model: nn.Module, batches: list[Batch], *, steps: int, optimizer: str, lr: float,
             loss_fn: Callable, masks: Mapping[str, torch.Tensor]) -> None:  # fmt: skip
    """A short fine-tune of the pruned float model (before quantization); unstructured masks
    are re-applied after every step, so pruned weights stay zero. Same code on CPU and GPU."""
    params = dict(model.named_parameters())
    opt = OPTIMIZERS[optimizer]([p for p in params.values() if p.requires_grad], lr=lr)
    model.train()
    with torch.enable_grad():
        for step in range(steps):
            inputs, targets = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss_fn(logits_of(call_model(model, inputs)), targets).backward()
            opt.step()
            with torch.no_grad():
                for key, mask in masks.items():
                    params[key].mul_(mask)
    model.eval()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch]) -> list[str]:
    """Re-estimate BatchNorm running statistics on `batches` (cumulative average).

    Pruning and quantization shift activation statistics; stale statistics cost far more
    accuracy than the compression itself (e.g. Nagel et al. 2021, "A White Paper on Neural
    Network Quantization", section on BN re-estimation). Returns the state keys it changed.
    """
    norms = {n: m for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats}
    if not norms:
        return []
    momenta = {}
    for module in norms.values():
        momenta[module] = module.momentum
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average: every batch weighs the same
        module.train()
    try:
        for inputs, _ in batches:
            call_model(model, inputs)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
            module.eval()
    suffixes = ("running_mean", "running_var", "num_batches_tracked")
    return [f"{n}.{s}" for n in norms for s in suffixes]


def batch_of(inputs: Any, size: int) -> Any:
    """The task's example inputs (one sample) repeated to `size` samples along dim 0."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1].expand(size, *inputs.shape[1:]).contiguous() if inputs.dim() else inputs
    if isinstance(inputs, Mapping):
        return {k: batch_of(v, size) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(batch_of(v, size) for v in inputs)
    return inputs


def _count(targets: Any) -> int:
    """Samples in a batch's targets (the first dimension of the first tensor)."""
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0]) if targets.dim() else 1
    if isinstance(targets, Mapping):
        return _count(next(iter(targets.values())))
    if isinstance(targets, (tuple, list)):
        return _count(targets[0]) if targets else 0
    return 1


class Evaluator:
    """Scores policies on one task; made once per worker."""

    def __init__(self, task: Task, space: SearchSpace, *, recovery: RecoverySettings,
                 device: torch.device | str = "cpu",
                 target: TargetSettings | None = None) -> None:  # fmt: skip
        self.task, self.space, self.recovery = task, space, recovery
        self.device = torch.device(device)
        self.target = target or TargetSettings()
        self.runner = target_of(self.target.name).runner(space, self.target, self.device)
        self.rebuilder = Rebuilder(task.model(), space).to(self.device)
        self.latency_inputs = batch_of(to_device(task.example_inputs(), self.device),
                                       self.target.latency.batch)  # fmt: skip
        self.validation = [to_device(b, self.device) for b in task.validation()]
        calibration = [to_device(b, self.device) for b in task.calibration()]
        limit = recovery.calibration_batches
        self.calibration = calibration if limit is None else calibration[:limit]
        counts = [_count(targets) for _, targets in self.validation]
        self._samples = {n: sum(counts[:n]) for n in range(len(counts) + 1)}
        self.train: list[Batch] = []
        if recovery.finetune_steps:
            if task.train is None:
                raise ValueError("recovery.finetune_steps needs the task's train batches")
            self.train = [to_device(b, self.device) for b in task.train()]

    def base_metric(self) -> float:
        """The unchanged model's metric, as the target runs it."""
        self.rebuilder.restore()
        artifact = self.runner.artifact(self.rebuilder.model, {})
        return float(self.task.metric(artifact.model, self.validation))

    def base_latency(self) -> float:
        """The unchanged model's median latency in the target runtime (ms), the fastest of
        ANCHOR_ROUNDS (the predictor starts from it, timed while the driver starts up)."""
        self.rebuilder.restore()
        artifact = self.runner.artifact(self.rebuilder.model, {})
        return min(self.runner.latency(artifact, self.latency_inputs)[0]
                   for _ in range(ANCHOR_ROUNDS))  # fmt: skip

    def policy_latency(self, policy: Mapping[str, int | float]) -> float:
        """The median latency of `policy`'s artifact in the target runtime (ms), unscored,
        the fastest of ANCHOR_ROUNDS (as `base_latency`)."""
        artifact = self.artifact_of(self.compressed_model(policy), policy)
        return min(self.runner.latency(artifact, self.latency_inputs)[0]
                   for _ in range(ANCHOR_ROUNDS))  # fmt: skip

    def latency_probes(self, acts: Mapping[str, Sequence[int]],
                       least: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:  # fmt: skip
        """The per-layer latency table's probes of the named layers at their activation
        bits (orchestrator/latency_table.py), and with `least` each at its smallest weight
        shape in the space too, read from this machine's cache or timed here in the
        target runtime: plain data for the driver's LayerTable."""
        from orchestrator.latency_table import (
            OVERHEAD,
            cache_bytes,
            geometry,
            grid,
            machine,
            measure,
            probe_order,
        )

        self.rebuilder.restore()
        base = geometry(self.rebuilder.model, self.latency_inputs, acts, call_model)
        least = least or {}
        probes = {name: grid(probe, acts[name], least.get(name)) for name, probe in base.items()}
        order = probe_order(probes)
        machine_id = machine(self.target.name, self.device, self.runner.settings.latency.threads)
        times, timed = measure(order, machine_id, self.runner.probe_ms)
        ms = dict(zip(order, times, strict=True))
        return {"machine": machine_id, "timed": timed, "overhead": ms[OVERHEAD] or 0.0,
                "cache_bytes": cache_bytes(self.device),
                "integer_weights": self.runner.integer_weights,
                "layers": {name: [(dataclasses.asdict(p), ms[p]) for p in found]
                           for name, found in probes.items()}}  # fmt: skip

    def evaluate(self, policy: Mapping[str, int | float], *, size: int | None = None,
                 front: Sequence[tuple[int, float]] = (),
                 fidelity: FidelitySettings | None = None,
                 share: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Rebuild, recover, score. With `fidelity` and the current `front`, score growing
        prefixes of the validation batches and stop early (`stopped_early`) once the candidate of
        `size` bytes cannot reach the front (orchestrator.fidelity). With `share`, score only
        that share of the validation batches, the first ones (a sensitivity probe)."""
        start = time.perf_counter()
        model, compressed = self._rebuild(policy)
        rebuilt = time.perf_counter()
        self._recover(model, compressed)
        recovered = time.perf_counter()
        artifact = self.artifact_of(model, policy)
        metric, scored, stopped_early = self._score(artifact.model, size, front, fidelity, share)
        result = {
            "metric": metric,
            "fidelity": scored,
            "stopped_early": stopped_early,  # recorded as Optuna's state PRUNED
            "rebuild_seconds": rebuilt - start - self._tuned_seconds,
            "recovery_seconds": recovered - rebuilt + self._tuned_seconds,
            **self._deployed(artifact, measure=not stopped_early and share is None),
        }
        result["eval_seconds"] = time.perf_counter() - start  # rebuild + recovery + scoring
        return result

    def artifact_of(self, model: nn.Module, policy: Mapping[str, int | float]) -> Artifact:
        """The rebuilt, recovered `model` of `policy` as its target runs it: quantized
        weights by their bits, quantized activations with scales calibrated on it now."""
        params = self.activation_params(model, policy)
        return self.runner.artifact(model, self.rebuilder.weight_bits(policy), params)

    def activation_params(self, model: nn.Module,
                          policy: Mapping[str, int | float]) -> dict[str, Any]:  # fmt: skip
        """Scales of the activations `policy` quantizes, calibrated on `model` (float
        activations) with the calibration batches; {} where it quantizes none."""
        acts = self.rebuilder.activation_bits(policy)
        if not acts:
            return {}
        return calibrate(model, acts, self.calibration, self.recovery.act_calibration,
                         self.runner.observed_outputs())  # fmt: skip

    def _deployed(self, artifact: Artifact, *, measure: bool) -> dict[str, Any]:
        """The artifact's figures: its file's bytes and the time to write and load it, and
        (for a candidate scored in full) its latency in the target runtime."""
        figures: dict[str, Any] = {"artifact_seconds": artifact.seconds}
        if artifact.data is not None:
            figures["artifact_bytes"] = len(artifact.data)
        if measure and self.target.measure_latency:
            median, p90 = self.runner.latency(artifact, self.latency_inputs)
            figures.update(latency_ms=median, latency_p90_ms=p90)
        return figures

    def compressed_model(self, policy: Mapping[str, int | float], *,
                         before_quantize: Callable | None = None) -> nn.Module:  # fmt: skip
        """The model `evaluate` scores for `policy`: rebuilt, recovered and fake-quantized
        (valid until the next call). `before_quantize(model, masks)` sees the float weights
        the quantizer gets, after any fine-tuning (export takes their integer codes)."""
        model, compressed = self._rebuild(policy, before_quantize)
        self._recover(model, compressed)
        return model

    def _rebuild(self, policy: Mapping[str, int | float],
                 observe: Callable | None = None) -> tuple[nn.Module, bool]:  # fmt: skip
        self._tuned_seconds = 0.0
        compressed = self._compresses(policy)
        steps = [self._finetune] if compressed and self.recovery.finetune_steps else []
        steps += [observe] if observe is not None else []

        def before_quantize(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
            for step in steps:
                step(model, masks)

        model = self.rebuilder(policy, before_quantize=before_quantize if steps else None)
        return model, compressed

    def _recover(self, model: nn.Module, compressed: bool) -> None:
        if self.recovery.bn_recalibration and compressed:
            changed = set(recalibrate_batchnorm(model, self.calibration))
            if model is self.rebuilder.model:  # a sliced model is new: nothing to restore
                self.rebuilder.mark_dirty(changed)

    @torch.no_grad()
    def _score(self, model: nn.Module, size: int | None, front: Sequence[tuple[int, float]],
               fidelity: FidelitySettings | None,
               share: float | None = None) -> tuple[float, float, bool]:  # fmt: skip
        lengths = [len(self.validation)]
        if share is not None:  # a low-fidelity probe: the first batches only (at least one)
            lengths = [min(len(self.validation), max(1, round(share * len(self.validation))))]
        if fidelity is not None and front and size is not None:
            lengths = prefix_lengths(len(self.validation), fidelity.steps)
        for length in lengths:
            batches = self.validation[:length]
            metric = float(self.task.metric(model, batches))
            if not math.isfinite(metric):
                raise ValueError(f"the task's metric returned {metric}")
            seen = self._samples[length]
            if length < lengths[-1] and dominated(size, upper_bound(metric, seen, fidelity), front):
                return metric, seen / self._samples[len(self.validation)], True
        return metric, self._samples[lengths[-1]] / self._samples[len(self.validation)], False

    def _finetune(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        r, start = self.recovery, time.perf_counter()
        finetune(model, self.train, steps=r.finetune_steps, optimizer=r.optimizer, lr=r.lr,
                 loss_fn=self.task.loss, masks=masks)  # fmt: skip
        self._tuned_seconds = time.perf_counter() - start

    def _compresses(self, policy: Mapping[str, int | float]) -> bool:
        return any(kind_of(k).compresses(policy[k.name]) for k in self.space.knobs)
