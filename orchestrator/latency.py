"""The driver's latency predictor (issue 15): a candidate over a latency budget is recorded
INFEASIBLE before any worker runs it.

With the per-layer table (orchestrator/latency_table.py, the default where the worker's
evaluator times probes): each Conv/Linear layer is priced at its kept widths and
activation bits by the table, timed alone on the worker's hardware; a candidate costs
`c0 + c1 x (sum of its layers) + c2 x (MACs of layers the table lacks) + c3 x (MB of
weights the runtime holds beyond a share of the last-level cache)`. The last term is
what no layer alone shows: resnet18's float weights (47 MB) stream from memory on every
run, so the whole model took 5.3 ms where its layers alone sum to 2.7; at W8A8 (12 MB)
1.1-1.3 against 1.0. The coefficients start from the base model's measurement (c1 = 1,
the rest of its time on its streamed bytes or on c0) and are fitted by non-negative least
squares once FIT_AFTER distinct candidates are measured, at the cache share
(CACHE_SHARES) the measurements agree with best, c1 at least MAC_FLOOR of its start.

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
# table's time for the layers it covers, the MACs of the layers it does not, and the
# weight bytes the runtime holds beyond the worker's last-level cache (streamed from
# memory on every run)
TABLE_FEATURES = ("constant", "table ms", "MACs outside the table", "MB beyond the cache")
TABLE_WORK = np.array([0.0, 1.0, 0.0, 0.0])  # the prior's part that a fit may not drop
INT8_BYTES = 1
# how much of the last-level cache a model's weights get: the workers of a node share it
# (and activations use it); the fit picks the share its measurements agree with best
CACHE_SHARES = (0.25, 0.5, 1.0)
PRIOR_SHARE = 0.25  # before the fit: resnet18 at 64x64 fell off the cliff between 12 and
# 26 MB of float weights on a 32 MB cache here


class LatencyModel:
    def __init__(self, space: SearchSpace, table: LayerTable | None = None) -> None:
        self.space, self.table = space, table
        self._rows: list[np.ndarray] = []
        self._measured: list[float] = []
        self._coef: np.ndarray | None = None
        self._share = PRIOR_SHARE  # of the cache, the weights' (the table's MB feature)
        self._errors: list[float] = []  # |predicted / measured - 1| of each measured prediction

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
            channels = [c for c in shapes[0][:2] if c > 1]  # out, in (per group)
            aligned = all(c % ALIGN == 0 for c in channels)
            x[1 if aligned else 2] += macs
            x[3] += not aligned
        return x

    def _table_features(self, policy: Mapping[str, int | float]) -> np.ndarray:
        """[1, the table's ms for the layers it covers, MACs of the others, MB of weights
        beyond the cache]. The runtime holds a weight in float unless its layer runs an
        integer kernel (weight-only quantization is dequantized before the first run; the
        torch target's fake-quant holds float weights whatever the activations)."""
        x = np.zeros(len(TABLE_FEATURES))
        x[0] = 1.0
        integer = layer_act_bits(self.space, policy)
        held = 0
        for layer, shapes in sliced_weight_shapes(self.space, policy):
            act = integer.get(layer.name, FLOAT_BITS)
            numel = sum(math.prod(shape) for shape in shapes)
            int8 = act < FLOAT_BITS and self.table.integer_weights
            held += numel * (INT8_BYTES if int8 else layer.dtype_bytes)
            ms = self.table.layer_ms(layer.name, shapes[0], act)
            if ms is None:
                x[2] += numel * layer.uses
            else:
                x[1] += ms
        x[3] = held / 2**20  # MB held; `_beyond` subtracts the cache
        return x

    def _beyond(self, x: np.ndarray, share: float) -> np.ndarray:
        """Rows of table features with the MB held turned into MB beyond `share` of the
        cache (0 where the cache is unknown)."""
        out = np.array(x, float, copy=True)
        cache = self.table.cache_bytes * share / 2**20
        out[..., 3] = np.maximum(out[..., 3] - cache, 0.0) if cache else 0.0
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
        self._rows.append(self.features(policy))
        self._measured.append(float(latency_ms))
        self._coef = None

    def predict(self, policy: Mapping[str, int | float]) -> float | None:
        """Milliseconds, or None before any measurement."""
        if not self._measured:
            return None
        x = self.features(policy)
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
        """measured = c0 + c1 x table ms + c2 x MACs outside it + c3 x MB beyond the cache.
        Until FIT_AFTER distinct measurements: the layers as the table timed them (c1 = 1)
        and the rest of the base model's time put on the bytes it streams (c3) or, where it
        fits the cache, on c0 (where the layers alone took longer than the whole model, c1
        scaled down to it); then non-negative least squares, c1 at least MAC_FLOOR of that
        prior (noisy timings cannot make the layers free), at the share of the cache that
        fits the measurements best."""
        rows, y = np.array(self._rows), np.array(self._measured)
        if len({tuple(r) for r in rows.tolist()}) < FIT_AFTER:
            self._share = PRIOR_SHARE
            return self._prior(self._beyond(rows, PRIOR_SHARE), y)
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

    @staticmethod
    def _prior(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The coefficients the base model's measurement (the first row) implies alone."""
        first, measured = x[0], y[0]
        covered, streamed = first[1], first[3]
        prior = np.zeros(len(TABLE_FEATURES))
        if covered <= 0:  # nothing in the table: in proportion to the MACs
            prior[2] = measured / first[2] if first[2] > 0 else 0.0
            prior[0] = 0.0 if prior[2] else measured
        elif measured < covered:
            prior[1] = measured / covered
        elif streamed > 0:  # the rest: weights streamed from memory
            prior[1], prior[3] = 1.0, (measured - covered) / streamed
        else:
            prior[:2] = measured - covered, 1.0
        return prior
