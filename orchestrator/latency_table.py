"""The per-layer latency table (issue 15): each Conv and Linear layer timed alone, in the
target runtime, on the worker's hardware, at a few widths and both activation precisions.

Why a table: a latency budget is enforced before dispatch, so the driver must price a
candidate it has never run. The study's own measurements alone cannot teach it what an
untried choice costs: if 8-bit activations were priced like float ones, no W8A8 candidate
would ever be admitted under a tight budget, and the predictor would never learn that
resnet18's convolutions run 2.6x faster in int8 here (and mobilenet's depthwise ones do
not). The table measures that up front.

- **Probes.** A layer's geometry (input shape at the latency batch, kernel, stride,
  padding, dilation, groups) is read once with forward hooks on the worker; a `Probe` is
  that geometry at some channel counts and activation bits. The runner times it as a
  one-node model: for ONNX Runtime a Conv or Gemm graph (with QuantizeLinear /
  DequantizeLinear pairs and int8 weights at 8 bits, which ONNX Runtime fuses into
  QLinearConv / QGemm); for torch the module itself (fake-quant around it at 8 bits).
  Weight bits cost no time on their own: both runtimes fold weight-only quantization into
  float weights before they run (ONNX Runtime at session creation: a float-activation
  layer's codes reach it through Cast and Mul, which it folds also in a model with
  integer layers, where it would keep a DequantizeLinear and dequantize on every run).
- **Grid.** Per layer and activation precision: the full width, half and a quarter (in
  and out channels scaled together, kept multiples of ALIGN where the layer's are), one
  width off the ALIGN grid, and the least width the space gives the layer. Aligned
  widths are linear in MACs between their points; a width off the grid is priced at the
  aligned curve times the ratio its neighbouring odd probes measured (ONNX Runtime's
  blocked CPU kernels run odd widths slower, and tiny ones slower than their MACs say).
- **Cache.** Probes are keyed by their geometry, so one table serves every model and
  study with the same layers; it lives in the user cache directory, one JSON file per
  machine type (CPU model or GPU name, runtime and version, threads), written atomically.
  The first latency-budget study on a machine pays for the probes (about 20 ms each;
  bounded by PROBE_SECONDS, with the full-width points first), later ones read them.
- **Calibration.** A layer alone is not a layer in a graph (fused activations, layout
  reorders, one run's fixed cost): orchestrator/latency.py fits the measured latencies of
  the study to the table's float and 8-bit layers and the weight bytes as they come, the
  base model first.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.atomic import atomic_write_json
from orchestrator.cache import cache_dir

ALIGN = 8  # channels per block of ONNX Runtime's CPU kernels (MLAS NCHWc on AVX2)
GRID = (1.0, 0.5, 0.25)  # widths probed, of the layer's full width
PROBE_WARMUP, PROBE_REPEATS = 3, 15
PROBE_SECONDS = 90.0  # at most this long probing on one call; the rest are priced by MACs
FLOAT = 32
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Probe:
    """One layer alone: `op` Conv (input N, C, *spatial) or Gemm (input M, C)."""

    op: str
    input: tuple[int, ...]
    out: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    act: int = FLOAT

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @property
    def output(self) -> tuple[int, ...]:
        if self.op == "Identity":
            return self.input
        if self.op == "Gemm":
            return (self.input[0], self.out)
        spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
                   for size, k, s, p, d in zip(self.input[2:], self.kernel, self.stride,
                                               self.padding, self.dilation, strict=True)]  # fmt: skip
        return (self.input[0], self.out, *spatial)

    @property
    def macs(self) -> int:
        if self.op == "Identity":
            return 0
        per_output = self.input[1] // self.groups * math.prod(self.kernel)  # 1 for a Gemm
        return math.prod(self.output) * per_output

    def at(self, out: int, inputs: int, act: int) -> Probe:
        """This layer with `out` output and `inputs` input channels (a depthwise conv
        keeps one group per channel; other grouped convs keep their group count)."""
        groups = out if _depthwise(self) else self.groups
        return replace(self, input=(self.input[0], inputs, *self.input[2:]), out=out,
                       groups=groups, act=act)  # fmt: skip


def geometry(model: nn.Module, inputs: Any, names: Iterable[str],
             call: Callable[[nn.Module, Any], Any]) -> dict[str, Probe]:  # fmt: skip
    """The full-width float probe of each named Conv/Linear layer whose forward runs on
    `inputs` (the latency batch); other layers (LSTM, attention's packed projections) are
    left out and priced by the calibration's constant."""
    found: dict[str, Probe | None] = {}

    def seen(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:  # None: the inputs stay as they are
            found.setdefault(name, _probe_of(module, args[0]) if args else None)

        return hook

    hooks = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, (*CONV_TYPES, nn.Linear)):
            hooks.append(module.register_forward_pre_hook(seen(name)))
    try:
        with torch.no_grad():
            call(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {k: v for k, v in found.items() if v is not None}


def _probe_of(module: nn.Module, x: Any) -> Probe | None:
    if not isinstance(x, torch.Tensor):
        return None
    if isinstance(module, nn.Linear):
        rows = math.prod(x.shape[:-1]) if x.dim() > 1 else 1
        return Probe(op="Gemm", input=(int(rows), int(x.shape[-1])), out=module.out_features)
    if not isinstance(module.padding, tuple) or module.padding_mode != "zeros":
        return None  # padding="same"/"valid" strings, reflect padding: not probed
    return Probe(op="Conv", input=tuple(int(s) for s in x.shape), out=module.out_channels,
                 kernel=tuple(module.kernel_size), stride=tuple(module.stride),
                 padding=tuple(module.padding), dilation=tuple(module.dilation),
                 groups=module.groups)  # fmt: skip


def _scaled(count: int, share: float) -> int:
    if count <= 1:
        return count
    if count % ALIGN == 0:
        return max(ALIGN, round(count * share / ALIGN) * ALIGN)
    return max(1, round(count * share))


def grid(base: Probe, acts: Sequence[int], least: Sequence[int] | None = None) -> list[Probe]:
    """The probes of one layer: GRID widths per activation precision, then one width off
    the ALIGN grid (where the layer has more than ALIGN channels), then the layer with the
    `least` weight shape the space can give it: below the GRID a layer's time stops
    following its MACs (mobilenet_v2's first depthwise conv at 3 of its 32 channels took
    34 us on 8-bit activations, 15 us at all 32)."""
    found = []
    for act in acts:
        found += [base.at(out, inputs, act) for out, inputs in _widths(base)]
        if base.out > ALIGN and not _grouped(base):
            half = found[-2]  # the GRID point at 0.5
            odd = half.out + 1
            found.append(base.at(odd, odd if _depthwise(base) else half.input[1] + 1, act))
        if least is not None:
            found.append(base.at(int(least[0]), _inputs(base, least), act))
    return list(dict.fromkeys(found))


def _depthwise(base: Probe) -> bool:
    return base.groups > 1 and base.groups == base.input[1] == base.out


def _grouped(base: Probe) -> bool:  # ResNeXt, RegNet: the width per group scales
    return base.groups > 1 and not _depthwise(base)


def _widths(base: Probe) -> list[tuple[int, int]]:
    """(out, in) channels at each GRID share of the layer's width."""
    found = []
    for share in GRID:
        if _depthwise(base):
            out = inputs = _scaled(base.out, share)
        elif _grouped(base):
            out = base.groups * max(1, round(base.out // base.groups * share))
            inputs = base.groups * max(1, round(base.input[1] // base.groups * share))
        else:
            out, inputs = _scaled(base.out, share), _scaled(base.input[1], share)
        found.append((out, inputs))
    return found


def aligned(probe: Probe) -> bool:
    return all(c <= 1 or c % ALIGN == 0 for c in (probe.out, probe.input[1] // probe.groups))


# -- the cache, per machine type ---------------------------------------------------------


def machine(target: str, device: Any, threads: int) -> str:
    """What a probe's time depends on besides the probe: hardware, runtime, threads."""
    if torch.device(device).type == "cuda":
        hardware = torch.cuda.get_device_name(torch.device(device))
    else:
        hardware = _cpu_model()
    runtime = f"torch {torch.__version__}"
    if target == "onnxruntime":
        import onnxruntime

        runtime = f"onnxruntime {onnxruntime.__version__}"
    return f"{hardware} | {platform.machine()} | {runtime} | {threads} threads"


def cache_bytes(device: Any) -> int:
    """The CPU's last-level cache (0 where unknown, or on a GPU): a model whose weights
    outgrow it streams them from memory on every run, which no layer timed alone shows
    (resnet18 at 64x64 here: its layers alone sum to 2.7 ms, the float model runs in 5.3;
    at W8A8, a quarter of the bytes, 1.0 against 1.3)."""
    if torch.device(device).type == "cuda":
        return 0
    found = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        found = max(found, size if level >= 2 else 0)
    return found


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def table_path(machine_id: str) -> Path:
    digest = hashlib.sha256(machine_id.encode()).hexdigest()[:16]
    return cache_dir() / "latency" / f"{digest}.json"


def read_table(machine_id: str) -> dict[str, float]:
    try:
        data = json.loads(table_path(machine_id).read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: measured again
    if not isinstance(data, dict) or data.get("machine") != machine_id:
        return {}
    return {k: float(v) for k, v in data.get("ms", {}).items() if isinstance(v, (int, float))}


def write_table(machine_id: str, entries: Mapping[str, float]) -> None:
    path = table_path(machine_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**read_table(machine_id), **entries}  # another worker may have added some
        atomic_write_json(path, {"machine": machine_id, "ms": merged})
    except OSError:
        pass  # a read-only cache costs the next study the probes again, nothing else


def time_ms(run: Callable[[], Any]) -> float:
    for _ in range(PROBE_WARMUP):
        run()
    times = []
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(probes: Sequence[Probe], machine_id: str, run_probe: Callable[[Probe], float], *,
            seconds: float = PROBE_SECONDS) -> tuple[list[float | None], int]:  # fmt: skip
    """ms of each probe (None: not measured within `seconds`, or the runtime could not run
    it alone: its layer is then priced by its MACs), from the machine's cache or timed now
    and added to it; and how many were timed now."""
    known = read_table(machine_id)
    new: dict[str, float] = {}
    failed: set[str] = set()
    deadline = time.monotonic() + seconds
    found: list[float | None] = []
    try:
        for probe in probes:
            key = probe.key
            if (
                key not in known
                and key not in new
                and key not in failed
                and time.monotonic() < deadline
            ):
                try:
                    new[key] = run_probe(probe)
                except Exception:  # noqa: BLE001 - a layer the runtime cannot run alone
                    failed.add(key)
            found.append(known.get(key, new.get(key)))
    finally:  # interrupted too: the probes timed so far are kept for the next study
        if new:
            write_table(machine_id, new)
    return found, len(new)


OVERHEAD = Probe(op="Identity", input=(1, 1), out=1)  # one run of a model that does nothing


def probe_order(probes: Mapping[str, Sequence[Probe]]) -> list[Probe]:
    """Every probe once: the fixed cost first, then each layer's full width at each
    precision (should time run out, every layer is still priced), then the rest."""
    full = [p for found in probes.values() for p in found if p.out == found[0].out]
    rest = [p for found in probes.values() for p in found]
    return list(dict.fromkeys([OVERHEAD, *full, *rest]))


# -- the driver's side: a layer's time at any width ---------------------------------------


class LayerTable:
    """Per layer, its probes' times; `layer_ms` interpolates a width never probed."""

    def __init__(self, probes: Mapping[str, Sequence[Probe]], ms: Mapping[Probe, float],
                 overhead: float, *, machine: str = "", timed: int = 0,
                 cache_bytes: int = 0, integer_weights: bool = False) -> None:  # fmt: skip
        # one run's fixed cost, in every probe: a model pays it once (the calibration's c0)
        self.overhead, self.machine, self.timed = overhead, machine, timed
        self.cache_bytes = cache_bytes  # the worker's last-level cache (0: unknown)
        # whether layers on 8-bit activations hold int8 weights in the runtime (onnxruntime)
        self.integer_weights = integer_weights
        self.base = {layer: found[0] for layer, found in probes.items() if found}
        self.probes = sum(len(found) for found in probes.values())
        # per (layer, activation bits): the aligned widths' MACs and ms, and the widths
        # off the ALIGN grid as (MACs, their ms over the aligned curve's there)
        self.curves: dict[tuple[str, int], tuple[np.ndarray, ...]] = {}
        for layer, found in probes.items():
            for act in sorted({p.act for p in found}):
                same = [p for p in found if p.act == act and p in ms]
                points = sorted((p.macs, max(ms[p] - overhead, 0.0)) for p in same if aligned(p))
                if not points:
                    continue
                x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points])
                odd = sorted((p.macs, max(ms[p] - overhead, 0.0)) for p in same if not aligned(p))
                ratios = [(m, t / e if (e := _interpolate(x, y, m)) > 0 else 1.0) for m, t in odd]
                ratios = ratios or [(0.0, 1.0)]
                self.curves[(layer, act)] = (x, y, np.array([r[0] for r in ratios], float),
                                             np.array([r[1] for r in ratios], float))  # fmt: skip

    @classmethod
    def of(cls, found: Mapping[str, Any]) -> LayerTable:
        """From what a worker's `latency_probes` returned (plain data over the wire)."""
        probes, ms = {}, {}
        for layer, entries in found["layers"].items():
            probes[layer] = []
            for data, value in entries:
                probe = Probe(
                    **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
                )
                probes[layer].append(probe)
                if value is not None:
                    ms[probe] = float(value)
        return cls(probes, ms, float(found["overhead"]), machine=found["machine"],
                   timed=int(found["timed"]), cache_bytes=int(found.get("cache_bytes", 0)),
                   integer_weights=bool(found.get("integer_weights", False)))  # fmt: skip

    def layer_ms(self, layer: str, weight_shape: Sequence[int], act: int) -> float | None:
        """The layer's time with this (sliced) weight and activation precision; None where
        the table has no curve for it."""
        base = self.base.get(layer)
        if base is None or (layer, act) not in self.curves:
            return None
        probe = base.at(int(weight_shape[0]), _inputs(base, weight_shape), act)
        x, y, odd_macs, ratios = self.curves[(layer, act)]
        ms = _interpolate(x, y, probe.macs)
        return ms if aligned(probe) else ms * float(np.interp(probe.macs, odd_macs, ratios))


    def input_elements(self, layer: str, weight_shape: Sequence[int]) -> int | None:
        """Elements of the layer's input (at the latency batch) with this sliced weight."""
        base = self.base.get(layer)
        if base is None:
            return None
        return math.prod(base.input) // base.input[1] * _inputs(base, weight_shape)


def _inputs(base: Probe, weight_shape: Sequence[int]) -> int:
    """Input channels of the layer of `base` with a sliced weight of `weight_shape`."""
    if base.op == "Gemm":
        return int(weight_shape[1])
    if _depthwise(base):
        return int(weight_shape[0])
    return int(weight_shape[1]) * base.groups


def _interpolate(x: np.ndarray, y: np.ndarray, macs: float) -> float:
    """Linear between probes; beyond them, in proportion to the nearest one."""
    if macs >= x[-1]:
        return float(y[-1] * macs / x[-1]) if x[-1] > 0 else float(y[-1])
    if macs <= x[0]:
        return float(y[0] * macs / x[0]) if x[0] > 0 else float(y[0])
    return float(np.interp(macs, x, y))
