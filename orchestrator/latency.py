"""The driver's latency predictor (issue 15): a candidate over a latency budget is recorded
INFEASIBLE before any worker runs it.

With the per-layer table (orchestrator/latency_table.py, the default where the worker's
evaluator times probes): each Conv/Linear layer is priced at its kept widths and
activation bits by the table, timed alone on the worker's hardware; a candidate costs
`c0 + c1 x (its float layers' table ms) + c2 x (its 8-bit layers') + c3 x (MACs of layers
the table lacks) + c4 x (MB of weights the runtime holds) + c5 x (MB of them beyond a
share of the last-level cache) + c6 x (M elements of activations that change layout) + c7
x (layout changes)`. The last four are what no layer alone shows: a probe runs with its
weights hot in the core's own caches, a model's layers fetch theirs (c4); resnet18's float
weights (47 MB) stream from memory on every run, so the whole model took 5.3 ms where its
layers alone sum to 2.7; at W8A8 (12 MB) 1.1-1.3 against 1.0 (c5). And ONNX Runtime holds
8-bit activations in NHWC, float ones in blocks of 8 channels (NCHWc) where the channel
counts allow, in NCHW otherwise: every change between neighbouring layers is a Transpose,
a reorder and a quantize or dequantize of the tensor between them (c6, c7; a probe pays
its own both ends, a run of like layers only at its ends, so 8-bit layers also get their
own c2). mobilenet_v2 policies with 5-21 of 53 layers on 8-bit activations ran 0.25-0.29
ms, slower than the same cut all float (0.20) or all 8-bit (0.18). The coefficients
start from the base model's measurement (c1 = c2 = 1, the rest of its time on its
streamed bytes or on c0); while fewer than FIT_AFTER distinct candidates are measured
that start is calibrated by two factors (8-bit layers, the rest), from the first on
uniform W8A8's time too where the space has 8-bit activations (the driver has a worker
time it beside the base model: orchestrator/search.py, `_latency_anchors`); then they are fitted by
non-negative least squares at the cache share (CACHE_SHARES) the measurements agree with
best, c1 and c2 at least MAC_FLOOR of their start, a timing far off the first fit
(OUTLIER) left out of the second. Replayed on a mobilenet_v2 study of
benchmarks/latency.py (its measurements predicted again, in five orders), the layout
features took the median error from 6.9-12.8% to 6.6-8.6%; on 60 random policies of each
model re-timed on a quiet machine, 6.4-7.8% -> 3.3-7.7% (mobilenet_v2) and 6.3-7.5% ->
5.6-8.0% (resnet18).

Without a table (a custom evaluator): priced from the work the candidate keeps, from the
policy alone (the cost model's shapes): its multiply-accumulates in layers whose channel
counts are multiples of ALIGN, those in layers that are not, how many such layers there
are, and MACs and layers with 8-bit activations. The split is measured, not assumed: on
ONNX Runtime's CPU kernels (blocked by 8 channels), a mobilenet_v3_small cut to odd
widths in 25 of 27 groups ran at 0.82 ms with 2.7M MACs, one cut in 7 groups at 0.27 ms
with 3.5M MACs. While the distinct measurements are fewer than FIT_AFTER, a candidate is
priced in proportion to its total MACs; then by non-negative least squares over the
features, each MAC costing at least MAC_FLOOR of the mean ms per MAC (noisy timings can
otherwise fit the work a weight of zero: a prediction never ignores the work kept).

Every prediction is recorded beside the measurement (`latency_predicted_ms`). A
candidate is called over budget before dispatch only beyond the predictor's own typical
error (`margin`: the median relative error of its predictions so far, at least
MIN_MARGIN): a noisy machine's timings must not shut the search out of the budget's edge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy.optimize import nnls

from orchestrator.latency_table import LayerTable
from search_spaces import SearchSpace
from search_spaces.config import FLOAT_BITS
from search_spaces.cost import sliced_weight_shapes
from search_spaces.kinds import layer_act_bits

ALIGN = 8  # channels per block of the CPU kernels (ONNX Runtime's MLAS: NCHWc, 8 on AVX2)
FIT_AFTER = 6  # distinct measurements before the fit over every feature
MAC_FLOOR = 0.25  # of the mean ms per MAC: the least a MAC may cost in the fit
MIN_MARGIN = 0.1  # a prediction is trusted to within 10% (the target) at best
FEATURES = ("constant", "float MACs aligned", "float MACs not aligned", "layers not aligned",
            "integer MACs", "integer layers")  # fmt: skip
WORK = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])  # the features that count MACs


# with the per-layer table (orchestrator/latency_table.py): a run's fixed cost, the
# table's time for the layers it covers (float and 8-bit activations apart), the MACs of
# the layers it does not, and the weight bytes the runtime holds, all of them and those
# beyond the worker's last-level cache (streamed from memory on every run)
TABLE_FEATURES = ("constant", "float layers' table ms", "8-bit layers' table ms",
                  "MACs outside the table", "MB held", "MB beyond the cache",
                  "M elements changing layout", "layout changes")  # fmt: skip
FLOAT_MS, INT_MS, OUTSIDE, HELD, BEYOND, CHANGED, CHANGES = range(1, len(TABLE_FEATURES))
TABLE_WORK = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # the prior's part a fit keeps
# how ONNX Runtime's CPU kernels hold a layer's activations: 8-bit ones NHWC (a Transpose
# and a quantize or dequantize at each end of a run of them), float ones in blocks of
# ALIGN channels (NCHWc, reordered at each end of a run) where its channels allow, plain
# NCHW otherwise; a layout change costs in proportion to the tensor that changes
INTEGER, BLOCKED, PLAIN = "integer", "blocked", "plain"
INT8_BYTES = 1
# how much of the last-level cache a model's weights get: the workers of a node share it
# (and activations use it); the fit picks the share its measurements agree with best
CACHE_SHARES = (0.25, 0.5, 1.0)
OUTLIER, OUTLIER_FLOOR = 3.0, 0.25  # a timing this far off the fit (relative) is left out
PRIOR_SHARE = 0.25  # before the fit: resnet18 at 64x64 fell off the cliff between 12 and
# 26 MB of float weights on a 32 MB cache here


def _aligned(weight_shape: tuple[int, ...]) -> bool:
    """Whether a layer's channel counts (out, in per group; 1 aside) fill ALIGN blocks."""
    return all(c % ALIGN == 0 for c in weight_shape[:2] if c > 1)


def _layout(weight_shape: tuple[int, ...], integer: bool) -> str:
    """How the runtime holds the activations of a layer with this weight (INTEGER, BLOCKED
    or PLAIN)."""
    if integer:
        return INTEGER
    return BLOCKED if _aligned(weight_shape) else PLAIN


class LatencyModel:
    def __init__(self, space: SearchSpace, table: LayerTable | None = None) -> None:
        self.space, self.table = space, table
        self._rows: list[np.ndarray] = []
        self._measured: list[float] = []
        self._coef: np.ndarray | None = None
        self._share = PRIOR_SHARE  # of the cache, the weights' (the table's MB feature)
        self._errors: list[float] = []  # |predicted / measured - 1| of each measured prediction
        self._timed: dict[tuple[float, ...], list[float]] = {}  # by features: what was measured

    def features(self, policy: Mapping[str, int | float]) -> np.ndarray:
        """[1, float MACs in aligned layers, float MACs in the others, layers not aligned,
        MACs in layers with 8-bit activations, such layers]: an integer kernel costs per
        MAC what it costs (2.6x less than float on resnet18's convs here, no less on
        depthwise ones), and its quantize / dequantize pairs cost per layer."""
        if self.table is not None:
            return self._table_features(policy)
        x = np.zeros(len(FEATURES))
        x[0] = 1.0
        integer = layer_act_bits(self.space, policy)
        for layer, shapes in sliced_weight_shapes(self.space, policy):
            macs = sum(math.prod(shape) for shape in shapes) * layer.uses
            if layer.name in integer:
                x[4] += macs
                x[5] += 1
                continue
            aligned = _aligned(shapes[0])
            x[1 if aligned else 2] += macs
            x[3] += not aligned
        return x

    def _table_features(self, policy: Mapping[str, int | float]) -> np.ndarray:
        """TABLE_FEATURES of a policy (the last one the MB held: `_beyond` subtracts the
        cache). The runtime holds a weight in float unless its layer runs an integer kernel
        (weight-only quantization is dequantized before the first run; the torch target's
        fake-quant holds float weights whatever the activations)."""
        x = np.zeros(len(TABLE_FEATURES))
        x[0] = 1.0
        integer = layer_act_bits(self.space, policy)
        held, before = 0, None
        for layer, shapes in sliced_weight_shapes(self.space, policy):
            act = integer.get(layer.name, FLOAT_BITS)
            numel = sum(math.prod(shape) for shape in shapes)
            int8 = act < FLOAT_BITS and self.table.integer_weights
            held += numel * (INT8_BYTES if int8 else layer.dtype_bytes)
            ms = self.table.layer_ms(layer.name, shapes[0], act)
            if ms is None:
                x[OUTSIDE] += numel * layer.uses
                continue
            x[INT_MS if act < FLOAT_BITS else FLOAT_MS] += ms
            if self.table.integer_weights:  # a runtime of integer kernels: ONNX Runtime's
                layout = _layout(shapes[0], int8)
                if before is not None and layout != before:
                    x[CHANGED] += self.table.input_elements(layer.name, shapes[0]) / 1e6
                    x[CHANGES] += 1
                before = layout
        x[HELD] = x[BEYOND] = held / 2**20
        return x

    def _beyond(self, x: np.ndarray, share: float) -> np.ndarray:
        """Rows of table features with the last column's MB held turned into MB beyond
        `share` of the cache (0 where the cache is unknown)."""
        out = np.array(x, float, copy=True)
        cache = self.table.cache_bytes * share / 2**20
        out[..., BEYOND] = np.maximum(out[..., BEYOND] - cache, 0.0) if cache else 0.0
        return out

    @property
    def measured(self) -> int:
        return len(self._measured)

    @property
    def margin(self) -> float:
        """How far above the limit a prediction must be to call a candidate over it."""
        errors = self._errors[-50:]
        return max(MIN_MARGIN, float(np.median(errors))) if errors else MIN_MARGIN

    def observe(self, policy: Mapping[str, int | float], latency_ms: float | None,
                predicted: float | None = None) -> None:  # fmt: skip
        if latency_ms is None or not np.isfinite(latency_ms) or latency_ms <= 0:
            return
        if predicted is not None:
            self._errors.append(abs(predicted / latency_ms - 1.0))
        row = self.features(policy)
        self._rows.append(row)
        self._measured.append(float(latency_ms))
        self._timed.setdefault(tuple(row.tolist()), []).append(float(latency_ms))
        self._coef = None

    def timed(self, policy: Mapping[str, int | float]) -> float | None:
        """The median of what policies priced as `policy` measured (the base model, W8A8
        timed before the search, a candidate measured): no prediction needed, nor its
        margin. None where none was."""
        return self.priced(policy)[1]

    def predict(self, policy: Mapping[str, int | float]) -> float | None:
        """Milliseconds, or None before any measurement."""
        return self.priced(policy)[0]

    def priced(self, policy: Mapping[str, int | float]) -> tuple[float | None, float | None]:
        """(`predict`, `timed`) of a policy, its features computed once (a repair prices
        thousands of policies)."""
        if not self._measured:
            return None, None
        x = self.features(policy)
        found = self._timed.get(tuple(x.tolist()))
        return self._predicted(x), (float(np.median(found)) if found else None)

    def _predicted(self, x: np.ndarray) -> float:
        if self._coef is None:
            self._coef = self._fit()
        if self.table is not None:
            x = self._beyond(x, self._share)
        return float(self._coef @ x)

    def _fit(self) -> np.ndarray:
        """Least squares with every coefficient >= 0 and each MAC's at least MAC_FLOOR of
        the study's mean ms per MAC: noisy timings cannot make the work free."""
        if self.table is not None:
            return self._fit_table()
        x, y = np.array(self._rows), np.array(self._measured)
        macs = x @ WORK
        ratio = float(np.median(y[macs > 0] / macs[macs > 0])) if (macs > 0).any() else 0.0
        if len({tuple(r) for r in x.tolist()}) < FIT_AFTER:  # proportional to the work
            coef = ratio * WORK
            coef[0] = 0.0 if ratio else float(np.median(y))
            return coef
        floor = MAC_FLOOR * ratio * WORK
        scale = np.maximum(x.max(0), 1e-12)  # columns of 1 and of millions of MACs
        return nnls(x / scale, y - x @ floor)[0] / scale + floor

    def _fit_table(self) -> np.ndarray:
        """The coefficients over every measurement but the outliers: a timing more than
        OUTLIER x the typical relative error (and OUTLIER_FLOOR) off a first fit is left
        out of the second (a run disturbed by the machine: one mobilenet_v2 file re-timed
        ten times ranged 0.45-0.68 ms); the base model's is always kept."""
        rows, y = np.array(self._rows), np.array(self._measured)
        coef = self._fit_rows(rows, y)
        if len(y) < FIT_AFTER:
            return coef
        error = np.abs(self._beyond(rows, self._share) @ coef / y - 1)
        kept = error <= max(OUTLIER_FLOOR, OUTLIER * float(np.median(error)))
        kept[0] = True
        return coef if kept.all() else self._fit_rows(rows[kept], y[kept])

    def _fit_rows(self, rows: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The prior of the base model's measurement (`_prior`) calibrated by two factors
        until FIT_AFTER distinct measurements (a few timings cannot pin six coefficients):
        one for the 8-bit layers' table time, one for the rest (how 8-bit layers run
        chained is the model's: a Transpose on each side of a run of them, and
        mobilenet_v3's hardswish and squeeze-excite blocks in float between); then
        non-negative least squares, c1 and c2 at least MAC_FLOOR of the prior (noisy
        timings cannot make the layers free), at the share of the cache that fits the
        measurements best."""
        if len({tuple(r) for r in rows.tolist()}) < FIT_AFTER:
            self._share = PRIOR_SHARE
            return self._calibrated(self._beyond(rows, PRIOR_SHARE), y)
        best = None
        for share in CACHE_SHARES:
            x = self._beyond(rows, share)
            floor = MAC_FLOOR * self._prior(x, y) * TABLE_WORK
            scale = np.maximum(x.max(0), 1e-12)
            coef = nnls(x / scale, y - x @ floor)[0] / scale + floor
            residual = float(np.sum((x @ coef - y) ** 2))
            if best is None or residual < best[0]:
                best = (residual, share, coef)
        _, self._share, coef = best
        return coef

    def _calibrated(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The prior scaled to the measurements: by the median measured / predicted, or,
        once an 8-bit layer was measured, by two factors fitted (non-negative least
        squares) to the 8-bit layers' part and the rest."""
        prior = self._prior(x, y)
        integer = np.zeros(len(prior))
        integer[INT_MS] = prior[INT_MS]
        rest = prior - integer
        if (x[:, INT_MS] > 0).any():
            factors = nnls(np.stack([x @ rest, x @ integer], axis=1), y)[0]
            if factors[0] > 0:
                return factors[0] * rest + factors[1] * integer
        return prior * float(np.median(y / np.maximum(x @ prior, 1e-12)))

    @staticmethod
    def _prior(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The coefficients the base model's measurement (the first row) implies alone:
        the layers as the table timed them, the rest of its time on the bytes it streams or,
        where it fits the cache, on c0 (where the layers alone took longer than the whole
        model, the table scaled down to it)."""
        first, measured = x[0], y[0]
        covered, streamed = first[FLOAT_MS] + first[INT_MS], first[BEYOND]
        prior = np.zeros(len(TABLE_FEATURES))
        if covered <= 0:  # nothing in the table: in proportion to the MACs
            prior[OUTSIDE] = measured / first[OUTSIDE] if first[OUTSIDE] > 0 else 0.0
            prior[0] = 0.0 if prior[OUTSIDE] else measured
        elif measured < covered:
            prior[[FLOAT_MS, INT_MS]] = measured / covered
        elif streamed > 0:  # the rest: weights streamed from memory
            prior[[FLOAT_MS, INT_MS]] = 1.0
            prior[BEYOND] = (measured - covered) / streamed
        else:
            prior[0], prior[[FLOAT_MS, INT_MS]] = measured - covered, 1.0
        return prior
