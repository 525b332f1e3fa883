"""What every deployment target provides (issue 15; one module per target: eager.py for
`torch`, onnxrt.py for `onnxruntime`, registered by name in TARGETS).

A target is the runtime the model ships on. It says what it stores (weight bits per layer
type: the space offers only those), which pruning modes make its model smaller, how a
candidate becomes its artifact (the file that ships, scored in that runtime), and how
latency is measured there. The driver asks it for the artifact's layout once (so the
cost model prices every candidate's file before dispatch); each worker makes one Runner.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from search_spaces import SearchSpace
    from search_spaces.onnx_layout import OnnxLayout
    from search_spaces.space import StoredBits


@dataclass(frozen=True, kw_only=True)
class LatencySettings:
    """How latency is measured on a worker (config `latency:`): inputs of `batch` samples,
    `threads` intra-op threads, `warmup` untimed runs, then `repeats` timed ones."""

    batch: int = 1
    threads: int = 1
    warmup: int = 10
    repeats: int = 50


@dataclass(frozen=True, kw_only=True)
class TargetSettings:
    """What a worker needs of the config to score for a target."""

    name: str = "torch"
    latency: LatencySettings = LatencySettings()
    measure_latency: bool = False  # torch: only when asked (onnxruntime always measures)


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A candidate as its target runs it: `model` is called as the task's metric calls
    any model; `data` the file's bytes (None: the torch model itself is the artifact)."""

    model: nn.Module
    data: bytes | None = None
    seconds: float = 0.0  # writing the file and loading it into the runtime
    run: Callable[[Any], Any] | None = None  # one forward on inputs, for latency


class Runner:
    """One worker's side of a target: candidate -> artifact, artifact -> latency."""

    def __init__(self, space: SearchSpace, settings: TargetSettings, device: Any) -> None:
        self.space, self.settings, self.device = space, settings, device

    def artifact(self, model: nn.Module, bits: Mapping[str, int],
                 activations: Mapping[str, Any] | None = None) -> Artifact:  # fmt: skip
        """The candidate `model` (its weights fake-quantized to `bits`, by state key) as
        the target runs it; `activations`: (input, output) QParams by layer name, for the
        layers whose activations are quantized (compress/activations.py)."""
        return Artifact(model=model)

    def observed_outputs(self) -> dict[str, Any]:
        """Layer name -> where its output is quantized in the artifact (an `OutputAt` of
        compress/activations.py: after a BatchNorm folded into it, and a ReLU the
        quantization applies); the layer's own output where absent."""
        return {}

    # whether a layer on 8-bit activations holds its weights as int8 when it runs (an
    # integer kernel's); the torch target's fake-quant keeps them float
    integer_weights = False

    def probe_ms(self, probe: Any) -> float:
        """Median ms of one layer alone in this runtime (orchestrator/latency_table.py)."""
        raise NotImplementedError(f"{type(self).__name__} times no layer probes")

    def latency(self, artifact: Artifact, inputs: Any) -> tuple[float, float]:
        """(median, p90) milliseconds of one forward over `inputs`."""
        latency = self.settings.latency
        run = artifact.run or artifact.model
        for _ in range(latency.warmup):
            run(inputs)
        times = []
        for _ in range(latency.repeats):
            start = time.perf_counter()
            run(inputs)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), _percentile(times, 0.9)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Target:
    name = ""
    pruning = ("structured", "unstructured", "none")  # modes whose model it runs smaller
    export_format = "safetensors"
    measures_latency = False  # always, not only when a budget or the front asks
    fixed_width: tuple[str, ...] = ()  # layer types whose exported node fixes their width

    def stored_bits(self) -> StoredBits | None:
        """Weight bits it stores per layer type; None: any the space allows."""
        return None

    def check(self, example_inputs: Any) -> None:
        """Raise ConfigError (one line) when this target cannot run the task here."""

    def layout(self, model: nn.Module, example_inputs: Any) -> OnnxLayout | None:
        """Its artifact's layout (the driver makes it once), None for the torch model."""
        return None

    def runner(self, space: SearchSpace, settings: TargetSettings, device: Any) -> Runner:
        return Runner(space, settings, device)


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def target_of(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target '{name}'; use one of {', '.join(TARGETS)}") from None
