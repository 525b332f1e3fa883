"""Activation quantization (issue 15): calibrated 8-bit inputs and outputs of a layer.

A layer whose `act_bits` knob is 8 has its input and its output quantized per tensor to
uint8 (asymmetric: a scale and a zero point, the range always holding 0 so that zero
padding and ReLU's zeros stay exact). That is what ONNX Runtime's integer kernels take
(QLinearConv, QGemm, QLinearMatMul: uint8 activations with int8 weights, its fast path on
x86), so the onnxruntime target writes the same scales as QuantizeLinear/DequantizeLinear
pairs (orchestrator/targets/onnx_artifact.py) and the torch target simulates them here
with fake-quant (`ActQuantized`).

Scales are calibrated per candidate, after BatchNorm statistics are restored, on the
task's calibration batches with the model's activations in float (`calibrate`):

| method       | range of each tensor                                           |
|--------------|----------------------------------------------------------------|
| `minmax`     | the smallest and largest value seen (default)                 |
| `percentile` | the 0.01% and 99.99% quantiles, averaged over the batches      |

minmax is the default, as in ONNX Runtime's `quantize_static`: at 8 bits a clipped
outlier costs more than the resolution it buys, and minmax needs no sample of the
values. `percentile` helps where a few extreme activations stretch the range (long-tailed
outputs of a last layer, say); `recovery.act_calibration` picks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.batches import call_model

LEVELS = 255  # uint8
PERCENTILE = 0.9999
SAMPLE = 1 << 20  # values a percentile is taken over, per tensor and batch
MIN_SCALE = 1e-8  # a tensor (nearly) constant at 0: any positive scale, not a subnormal one


@dataclass(frozen=True)
class OutputAt:
    """Where a layer's output is quantized in its artifact: after `module` (a BatchNorm
    folded into the layer; None: the layer's own output), the range clamped to [0, high]
    where a ReLU (high inf) or ReLU6 (high 6) follows that the quantization applies (its
    range from 0 makes the zero point 0, so the codes' floor is the ReLU)."""

    module: str | None = None
    relu: bool = False
    high: float = math.inf

    def clamp(self, low: float, high: float) -> tuple[float, float]:
        if not self.relu:
            return low, high
        return min(max(low, 0.0), self.high), min(max(high, 0.0), self.high)


@dataclass(frozen=True)
class QParams:
    """One tensor's uint8 quantization: value = (code - zero) x scale."""

    scale: float  # float32-exact: ONNX stores it as float32, the simulation must agree
    zero: int

    @classmethod
    def of_range(cls, low: float, high: float) -> QParams:
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        scale = float(np.float32(max((high - low) / LEVELS, MIN_SCALE)))
        return cls(scale=scale, zero=int(np.clip(round(-low / scale), 0, LEVELS)))


def fake_quantize_act(x: torch.Tensor, params: QParams) -> torch.Tensor:
    """x rounded to its uint8 grid and back (ONNX QuantizeLinear: round half to even,
    saturate; then DequantizeLinear)."""
    codes = torch.clamp(torch.round(x / params.scale) + params.zero, 0, LEVELS)
    return (codes - params.zero) * params.scale


def _minmax(x: torch.Tensor) -> tuple[float, float]:
    return float(x.min()), float(x.max())


def _percentile(x: torch.Tensor) -> tuple[float, float]:
    flat = x.detach().reshape(-1).float()
    if flat.numel() > SAMPLE:  # an even stride: deterministic and spread over the tensor
        flat = flat[:: -(-flat.numel() // SAMPLE)]
    low, high = torch.quantile(flat, torch.tensor([1 - PERCENTILE, PERCENTILE], device=flat.device))
    return float(low), float(high)


# method -> (range of one batch's tensor, how ranges of several batches combine)
METHODS: dict[str, tuple[Callable[[torch.Tensor], tuple[float, float]],
                         Callable[[list[tuple[float, float]]], tuple[float, float]]]] = {
    "minmax": (_minmax, lambda r: (min(x[0] for x in r), max(x[1] for x in r))),
    "percentile": (_percentile, lambda r: (sum(x[0] for x in r) / len(r),
                                           sum(x[1] for x in r) / len(r))),
}  # fmt: skip


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def calibrate(model: nn.Module, layers: Iterable[str], batches: Iterable[Any],
              method: str = "minmax", outputs: Mapping[str, OutputAt] | None = None,
              ) -> dict[str, tuple[QParams, QParams]]:  # fmt: skip
    """(input, output) quantization of each named layer, from the float model's
    activations on `batches` ((inputs, targets) pairs). `outputs`: where a layer's output
    is quantized in its artifact (`OutputAt`); its own output, unclamped, otherwise."""
    measure, combine = METHODS[method]
    outputs = outputs or {}
    seen: dict[str, tuple[list, list]] = {name: ([], []) for name in layers}
    hooks = []
    for name, (into, out) in seen.items():
        hooks.append(
            model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, into=into: into.append(measure(_first_tensor(args)))
            )
        )
        hooks.append(
            model.get_submodule(_output_module(name, outputs)).register_forward_hook(
                lambda _m, _a, y, into=out: into.append(measure(_first_tensor(y)))
            )
        )
    try:
        for inputs, _ in batches:
            call_model(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    missing = [name for name, (inputs, _) in seen.items() if not inputs]
    if missing:
        raise ValueError(f"activation calibration: layer {missing[0]} was not called on the "
                         "calibration batches (does the task have any?)")  # fmt: skip
    at = {name: outputs.get(name, OutputAt()) for name in seen}
    return {name: (QParams.of_range(*combine(i)), QParams.of_range(*at[name].clamp(*combine(o))))
            for name, (i, o) in seen.items()}  # fmt: skip


def _output_module(layer: str, outputs: Mapping[str, OutputAt]) -> str:
    at = outputs.get(layer)
    return layer if at is None or at.module is None else at.module


def quantize_activations(model: nn.Module, params: Mapping[str, tuple[QParams, QParams]],
                         outputs: Mapping[str, OutputAt] | None = None) -> list:  # fmt: skip
    """Fake-quantize the named layers' inputs and outputs from now on (forward hooks on
    the layers, or for an output where `outputs` says, as in `calibrate`: a range from 0
    applies the ReLU after it, which then changes nothing; returns their handles). A
    loaded export keeps them for good."""
    outputs = outputs or {}
    handles = []
    for name, (into, out) in params.items():
        handles.append(
            model.get_submodule(name).register_forward_pre_hook(
                lambda _m, a, p=into: (fake_quantize_act(a[0], p), *a[1:])
            )
        )
        handles.append(
            model.get_submodule(_output_module(name, outputs)).register_forward_hook(
                lambda _m, _a, y, p=out: fake_quantize_act(y, p)
            )
        )
    return handles


def params_to_json(params: Mapping[str, tuple[QParams, QParams]]) -> dict[str, Any]:
    """The scales as an export's manifest keeps them: {layer: {input, output}}."""
    return {name: {"input": {"scale": i.scale, "zero": i.zero},
                   "output": {"scale": o.scale, "zero": o.zero}}
            for name, (i, o) in sorted(params.items())}  # fmt: skip


def params_from_json(data: Mapping[str, Any]) -> dict[str, tuple[QParams, QParams]]:
    return {name: (QParams(float(d["input"]["scale"]), int(d["input"]["zero"])),
                   QParams(float(d["output"]["scale"]), int(d["output"]["zero"])))
            for name, d in data.items()}  # fmt: skip


class ActQuantized(nn.Module):
    """`model` with the named layers' inputs and outputs fake-quantized (the torch
    target's simulation). The hooks live only during a forward: the rebuild reuses the
    model's modules for the next candidate."""

    def __init__(self, model: nn.Module, params: Mapping[str, tuple[QParams, QParams]],
                 outputs: Mapping[str, OutputAt] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.model, self.params, self.outputs = model, dict(params), dict(outputs or {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hooks = quantize_activations(self.model, self.params, self.outputs)
        try:
            return self.model(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
