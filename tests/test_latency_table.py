"""The per-layer latency table (issue 15): probes, their cache per machine, interpolation,
and the predictor calibrated on top of it."""

from __future__ import annotations

import collections
import json
import types

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.config import make_config
from orchestrator.evaluate import Evaluator, RecoverySettings
from orchestrator.latency import BEYOND, CHANGED, CHANGES, FLOAT_MS, HELD, INT_MS, LatencyModel
from orchestrator.latency_table import (
    ALIGN,
    LayerTable,
    Probe,
    aligned,
    geometry,
    grid,
    measure,
    read_table,
    table_path,
)
from orchestrator.prepare import build_space
from orchestrator.targets import TargetSettings
from orchestrator.targets.eager import _module_of
from orchestrator.targets.onnxrt import probe_bytes
from search_spaces.cost import sliced_weight_shapes
from search_spaces.kinds import layer_act_bits, reference_values
from search_spaces.policy import Policy

# a probe's cache key: its geometry and activation bits (tables timed by earlier versions
# read back as they were)
PROBE_FIELDS = ("op", "input", "out", "kernel", "stride", "padding", "dilation", "groups", "act")

ACTS = {"act_bits": [8, 32]}


def _conv(channels: int, out: int, groups: int, kernel: int, stride: int, size: int) -> Probe:
    return Probe(op="Conv", input=(1, channels, size, size), out=out, kernel=(kernel, kernel),
                 stride=(stride, stride), padding=(kernel // 2,) * 2, dilation=(1, 1),
                 groups=groups)  # fmt: skip


geometries = st.one_of(
    st.builds(lambda c, o, k, s, n: _conv(c, o, 1, k, s, n), st.integers(1, 48),
              st.integers(1, 48), st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]),
              st.integers(5, 12)),  # fmt: skip
    st.builds(lambda c, k, s, n: _conv(c, c, c, k, s, n), st.integers(2, 48),
              st.sampled_from([3, 5]), st.sampled_from([1, 2]), st.integers(5, 12)),  # fmt: skip
    st.builds(lambda g, w, o, n: _conv(g * w, g * o, g, 3, 1, n), st.integers(2, 6),
              st.integers(1, 8), st.integers(1, 8), st.integers(5, 10)),  # fmt: skip
    st.builds(lambda m, c, o: Probe(op="Gemm", input=(m, c), out=o), st.integers(1, 8),
              st.integers(1, 64), st.integers(1, 64)),  # fmt: skip
)


@settings(max_examples=60, deadline=None)
@given(base=geometries)
def test_every_probe_of_the_grid_is_a_valid_layer_and_counts_its_macs(base):
    """Depthwise convs keep a group per channel, grouped ones their group count; each
    probe runs as a module, and its MACs are the module's."""
    probes = grid(base, (32, 8))
    assert probes[0] == base.at(base.out, base.input[1], 32)
    assert {p.act for p in probes} == {32, 8}
    assert all(set(json.loads(p.key)) == set(PROBE_FIELDS) for p in probes)  # the cache's keys
    for probe in probes:
        module = _module_of(probe)
        with torch.no_grad():
            y = module(torch.zeros(probe.input))
        assert y.shape[1 if probe.op == "Conv" else -1] == probe.out
        per_output = module.weight[0].numel()  # inputs per group x kernel
        assert probe.macs == y.numel() * per_output
        if base.groups > 1 and base.groups == base.input[1] == base.out:
            assert probe.groups == probe.out == probe.input[1]
        elif base.groups > 1:
            assert probe.groups == base.groups


def _optimized(data: bytes, path) -> collections.Counter:
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(path)
    onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_an_onnx_probe_at_8_bits_runs_the_integer_kernel_a_candidate_would(tmp_path):
    conv = _conv(16, 32, 1, 3, 1, 8)
    for probe, op in [(conv, "Conv"), (Probe(op="Gemm", input=(1, 64), out=10), "Gemm")]:
        onnx.checker.check_model(onnx.load_from_string(probe_bytes(probe)))
        assert _optimized(probe_bytes(probe), tmp_path / "f.onnx")[op] == 1
        integer = _optimized(probe_bytes(probe.at(probe.out, probe.input[1], 8)), tmp_path / "i.onnx")
        assert integer[{"Conv": "QLinearConv", "Gemm": "QGemm"}[op]] == 1 and integer[op] == 0


def test_probes_are_timed_once_per_machine_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    probes = [_conv(8, 8, 1, 3, 1, 6), _conv(8, 16, 1, 3, 1, 6), Probe(op="Gemm", input=(1, 4), out=2)]
    timed = []

    def run(probe):
        timed.append(probe)
        return float(probe.macs) / 1e6

    first, count = measure(probes, "machine A", run)
    assert count == 3 and first == [p.macs / 1e6 for p in probes]
    again, count = measure(probes, "machine A", run)
    assert count == 0 and again == first and len(timed) == 3
    _, count = measure(probes, "machine B", run)  # another machine type: its own table
    assert count == 3 and table_path("machine A") != table_path("machine B")
    assert set(read_table("machine A")) == {p.key for p in probes}
    table_path("machine A").write_text("{not json")  # damaged: timed again, not an error
    _, count = measure(probes, "machine A", run)
    assert count == 3 and json.loads(table_path("machine A").read_text())["machine"] == "machine A"
    # out of time: the rest come back unmeasured (None), nothing is blocked
    found, count = measure([_conv(8, 24, 1, 3, 1, 6)], "machine C", run, seconds=0.0)
    assert found == [None] and count == 0

    def refuse(probe):
        if probe.op == "Gemm":
            raise RuntimeError("the runtime cannot run it alone")
        return 1.0

    found, count = measure(probes, "machine D", refuse)
    assert found == [1.0, 1.0, None] and count == 2
    assert set(read_table("machine D")) == {p.key for p in probes[:2]}  # tried again next time

    def interrupted(probe):
        if probe.op == "Gemm":
            raise KeyboardInterrupt
        return 2.0

    with pytest.raises(KeyboardInterrupt):
        measure(probes, "machine E", interrupted)
    assert set(read_table("machine E")) == {p.key for p in probes[:2]}  # what was timed stays


def _table(base: Probe, times: dict[int, dict[str, float]], overhead: float = 0.0) -> LayerTable:
    """A one-layer table with probe times of `time(probe)` per activation bits."""
    probes = grid(base, tuple(times))
    ms = {p: times[p.act]["per_mac"] * p.macs * (1.0 if aligned(p) else times[p.act]["odd"])
          + overhead for p in probes}  # fmt: skip
    return LayerTable({"conv": probes}, ms, overhead)


def test_the_table_interpolates_widths_never_probed_and_prices_odd_ones_by_their_ratio():
    base = _conv(64, 64, 1, 3, 1, 16)
    table = _table(base, {32: {"per_mac": 1e-7, "odd": 2.0}, 8: {"per_mac": 0.4e-7, "odd": 1.5}},
                   overhead=0.01)  # fmt: skip
    for out, inputs in [(64, 64), (48, 40), (24, 16), (8, 8)]:  # aligned: linear in MACs
        probe = base.at(out, inputs, 32)
        assert table.layer_ms("conv", (out, inputs, 3, 3), 32) == pytest.approx(probe.macs * 1e-7)
        assert table.layer_ms("conv", (out, inputs, 3, 3), 8) == pytest.approx(probe.macs * 0.4e-7)
    odd = base.at(37, 29, 32)
    assert not aligned(odd)
    assert table.layer_ms("conv", (37, 29, 3, 3), 32) == pytest.approx(2.0 * odd.macs * 1e-7)
    assert table.layer_ms("other", (8, 8, 3, 3), 32) is None
    sizes = [table.layer_ms("conv", (c, c, 3, 3), 32) for c in range(ALIGN, 65, ALIGN)]
    assert sizes == sorted(sizes)


def test_the_least_width_of_the_space_is_probed_and_odd_widths_take_their_neighbours_ratio():
    """A layer is also probed at the smallest weight the space gives it: there a layer's
    time stops following its MACs (a 3-channel depthwise conv ran slower than a
    32-channel one on 8-bit activations). An odd width between two odd probes is priced
    at the aligned curve times their ratios interpolated in MACs."""
    base = _conv(64, 64, 1, 3, 1, 16)
    probes = grid(base, (32,), least=(3, 5, 3, 3))
    tiny = base.at(3, 5, 32)
    assert tiny in probes and not aligned(tiny)
    assert len(probes) == len(grid(base, (32,))) + 1
    assert grid(base, (32,), least=(16, 16, 3, 3)) == grid(base, (32,))  # a GRID point already
    half_odd = next(p for p in grid(base, (32,)) if not aligned(p))
    ms = {p: p.macs * 1e-7 * (1.0 if aligned(p) else 4.0 if p == tiny else 2.0) for p in probes}
    table = LayerTable({"conv": probes}, ms, 0.0)
    assert table.layer_ms("conv", (3, 5, 3, 3), 32) == pytest.approx(4.0 * tiny.macs * 1e-7)
    assert table.layer_ms("conv", (half_odd.out, half_odd.input[1], 3, 3), 32) == pytest.approx(
        2.0 * half_odd.macs * 1e-7)
    between = base.at(9, 11, 32)
    assert tiny.macs < between.macs < half_odd.macs
    share = (between.macs - tiny.macs) / (half_odd.macs - tiny.macs)
    assert table.layer_ms("conv", (9, 11, 3, 3), 32) == pytest.approx(
        (4.0 + share * (2.0 - 4.0)) * between.macs * 1e-7)
    # the aligned widths keep their own curve
    assert table.layer_ms("conv", (32, 32, 3, 3), 32) == pytest.approx(base.at(32, 32, 32).macs * 1e-7)


@pytest.fixture(scope="module")
def resnet():
    config = make_config({"task": "digits-resnet", "target": "onnxruntime", "space": ACTS})
    task, _, space = build_space(config)
    evaluator = Evaluator(task, space, recovery=RecoverySettings(),
                          target=TargetSettings(name="onnxruntime"))  # fmt: skip
    return evaluator, space


def _w8a8(space, keep: float = 1.0) -> Policy:
    acts = {k.name for k in space.knobs if k.kind == "act_bits"}
    values = Policy.uniform(space, 8, keep)
    return Policy.from_values(space, {k: 8 if k in acts else v for k, v in values.items()})


def test_a_worker_probes_every_conv_and_linear_and_the_predictor_starts_from_them(
    resnet, tmp_path, monkeypatch
):
    """The table prices 8-bit activations before any such candidate is measured: a
    model's own measurements could never teach the predictor what it never admitted."""
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    evaluator, space = resnet
    acts = {x.name: [8, 32] for x in space.profile.layers}
    found = evaluator.latency_probes(acts)
    layers = {x.name for x in space.profile.layers}
    assert set(found["layers"]) == layers and found["timed"] > 2 * len(layers)
    assert found["machine"] and table_path(found["machine"]).exists()
    assert evaluator.latency_probes(acts)["timed"] == 0  # the machine's cache
    base = geometry(evaluator.rebuilder.model, evaluator.latency_inputs, acts,
                    lambda m, x: m(x))  # fmt: skip
    assert {name: p.input[0] for name, p in base.items()} == dict.fromkeys(layers, 1)  # batch 1
    table = LayerTable.of(json.loads(json.dumps(found)))  # as it crosses the wire
    model = LatencyModel(space, table)
    reference = Policy.uniform(space, 32)
    layers_float = model.features(reference)[FLOAT_MS]
    layers_int8 = model.features(_w8a8(space))[INT_MS]
    assert model.features(reference)[INT_MS] == model.features(_w8a8(space))[FLOAT_MS] == 0
    whole = 2 * layers_float  # the model measured slower than its layers alone
    model.observe(reference, whole)
    assert model.predict(reference) == pytest.approx(whole)
    # the layers' share of the time, as the table has it, and the rest unchanged
    assert model.predict(_w8a8(space)) == pytest.approx(whole - layers_float + layers_int8)
    half = Policy.uniform(space, 32, 0.5)  # priced the same way (the times are the probes')
    assert model.predict(half) == pytest.approx(whole - layers_float + model.features(half)[FLOAT_MS])
    assert model.features(half)[FLOAT_MS] != layers_float
    # a model measured faster than its layers alone: the table scaled down to it
    faster = LatencyModel(space, table)
    faster.observe(reference, layers_float / 2)
    assert faster.predict(_w8a8(space)) == pytest.approx(layers_int8 / 2)
    # a few measurements more calibrate that start: float ones by one factor (the median
    # measured / predicted: the base as predicted, half 1.2x), ...
    scaled = LatencyModel(space, table)
    scaled.observe(reference, whole)
    scaled.observe(half, 1.2 * model.predict(half))
    assert scaled.predict(_w8a8(space)) == pytest.approx(1.1 * model.predict(_w8a8(space)))
    # ... 8-bit layers by their own factor (chained, they run unlike their probes alone)
    scaled = LatencyModel(space, table)
    scaled.observe(reference, whole)
    scaled.observe(_w8a8(space), 1.5 * model.predict(_w8a8(space)))
    assert scaled.predict(_w8a8(space)) == pytest.approx(1.5 * model.predict(_w8a8(space)))
    assert scaled.predict(half) == pytest.approx(model.predict(half))


def test_a_float_layer_costs_the_same_whatever_its_weight_bits_in_an_integer_model_too(
    resnet, tmp_path, monkeypatch
):
    """A float-activation layer's codes are folded into float weights when the session is
    made, in a model with integer layers too (Cast and Mul, not DequantizeLinear): it is
    priced by its float probes whatever its bits."""
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    evaluator, space = resnet
    table = LayerTable.of(evaluator.latency_probes({x.name: [8, 32] for x in space.profile.layers}))
    acts = [k.name for k in space.knobs if k.kind == "act_bits"]
    model = LatencyModel(space, table)

    def policy(bits: int) -> Policy:
        values = dict(Policy.uniform(space, bits).items())
        values.update({a: 8 if a == acts[0] else 32 for a in acts})
        return Policy.from_values(space, values)

    expected = sum(table.layer_ms(layer.name, shapes[0], 32) or 0.0
                   for layer, shapes in sliced_weight_shapes(space, policy(32))
                   if layer.name not in layer_act_bits(space, policy(32)))  # fmt: skip
    for bits in (32, 8, 4):
        assert len(layer_act_bits(space, policy(bits))) == 1
        assert model.features(policy(bits))[FLOAT_MS] == pytest.approx(expected)
        assert model.features(policy(bits))[INT_MS] > 0


def test_layout_changes_are_counted_between_integer_blocked_and_plain_layers(
    resnet, tmp_path, monkeypatch
):
    """ONNX Runtime holds 8-bit activations NHWC, float ones NCHWc where the channels are
    multiples of 8, NCHW otherwise: each change between neighbouring layers is counted
    with the elements of the tensor that changes (the later layer's input); none on the
    torch target, none in a model of one layout."""
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    evaluator, space = resnet
    found = evaluator.latency_probes({x.name: [8, 32] for x in space.profile.layers})
    table = LayerTable.of(found)
    model = LatencyModel(space, table)
    acts = {k.layers[0]: k.name for k in space.knobs if k.kind == "act_bits"}
    order = [layer.name for layer, _ in sliced_weight_shapes(space, Policy.uniform(space, 32))]
    layers = [name for name in order if name in table.base and name in acts]
    assert len(layers) == len(order)  # every layer in the table and with an activation knob
    bits = {name: 8 if i % 2 else 32 for i, name in enumerate(layers)}
    values = dict(Policy.uniform(space, 32).items())
    values.update({acts[name]: b for name, b in bits.items()})
    mixed = Policy.from_values(space, values)
    shapes = dict((layer.name, s[0]) for layer, s in sliced_weight_shapes(space, mixed))
    # the layers the table prices (the 10-way fc has no curve: priced by its MACs, and
    # left out of the layouts); every neighbour among them differs
    priced = [n for n in layers if table.layer_ms(n, shapes[n], bits[n]) is not None]
    assert priced == layers[:-1]
    changed = priced[1:]
    x = model.features(mixed)
    assert x[CHANGES] == len(changed) > 0
    assert x[CHANGED] == pytest.approx(sum(table.input_elements(n, shapes[n]) for n in changed) / 1e6)
    for uniform in (Policy.uniform(space, 32), _w8a8(space)):
        assert model.features(uniform)[CHANGES] == model.features(uniform)[CHANGED] == 0
    torch_model = LatencyModel(space, LayerTable.of({**found, "integer_weights": False}))
    assert torch_model.features(mixed)[CHANGES] == 0


def test_w8a8_timed_beside_the_base_prices_integer_models_from_the_start(
    resnet, tmp_path, monkeypatch
):
    """The driver times uniform W8A8 at full width on a worker before the search (the
    budget's W8A8 baseline is chosen by prediction, and 8-bit layers alone are no guide
    to a run of them): with the base model's time, the predictor then prices both as
    measured."""
    from orchestrator.search import _latency_anchors

    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    evaluator, space = resnet
    asked = []

    class Pool:  # the worker pool's one call here, answered by a real evaluator
        def policy_latency(self, values):
            asked.append(values)
            return evaluator.policy_latency(values)

    prepared = types.SimpleNamespace(space=space)
    [(values, w8a8_ms)] = _latency_anchors(prepared, Pool())
    policy = Policy.from_values(space, values)
    assert policy.hash == _w8a8(space).hash and asked == [values] and w8a8_ms > 0
    table = LayerTable.of(evaluator.latency_probes({x.name: [8, 32] for x in space.profile.layers}))
    model = LatencyModel(space, table)
    reference = Policy.from_values(space, reference_values(space.knobs))
    base_ms = evaluator.base_latency()
    model.observe(reference, base_ms)
    model.observe(policy, w8a8_ms)
    assert model.predict(policy) == pytest.approx(w8a8_ms, rel=1e-6)
    assert model.predict(reference) == pytest.approx(base_ms, rel=1e-6)
    # a timed policy is within a limit its time keeps (an untimed one aims below it by the
    # predictor's margin): the budget's W8A8 baseline at full width
    from orchestrator.budget import Budget
    from orchestrator.proposals import Pricing

    pricing = Pricing(space, Budget(latency_ms=1.02 * w8a8_ms), model)
    assert model.timed(policy) == pytest.approx(w8a8_ms) and pricing.excess(values) == 0
    assert model.timed(_w8a8(space, 0.5)) is None
    assert model.predict(policy) * (1 + model.margin) > 1.02 * w8a8_ms
    # a space without 8-bit activations has no such anchor
    plain = build_space(make_config({"task": "digits-resnet", "target": "onnxruntime"}))[2]
    assert _latency_anchors(types.SimpleNamespace(space=plain), Pool()) == []


def test_the_calibration_learns_what_the_layers_alone_do_not_show(resnet, tmp_path, monkeypatch):
    """measured = c0 + c1 x float layers' table ms + c2 x 8-bit layers' + c4 x MB held +
    c5 x MB beyond the cache: fitted once candidates are measured; a whole model slower
    than its layers (weights streamed from memory) is priced by its bytes, and 8-bit
    layers chained faster than alone (one quantize at the chain's start, not one per
    layer) by their own coefficient."""
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    evaluator, space = resnet
    found = evaluator.latency_probes({x.name: [8, 32] for x in space.profile.layers})
    found["cache_bytes"] = 60_000  # most of these policies hold more than half of it
    table = LayerTable.of(found)
    model = LatencyModel(space, table)
    rng = np.random.default_rng(0)
    # ms per MB held, beyond half the cache; per M elements changing layout, per change
    truth = np.array([0.02, 1.3, 0.7, 0.0, 0.05, 0.4, 0.3, 0.001])

    def measured(policy):
        return float(model._beyond(model.features(policy), 0.5) @ truth)

    policies = [Policy.from_values(space, {k.name: k.choices[rng.integers(len(k.choices))]
                                           for k in space.knobs}) for _ in range(24)]  # fmt: skip
    for policy in [Policy.uniform(space, 32), *policies]:
        model.observe(policy, measured(policy))
    assert any(model._beyond(model.features(p), 0.5)[BEYOND] > 0 for p in policies)
    assert any(model.features(p)[INT_MS] > 0 for p in policies)
    for policy in [*policies, _w8a8(space), Policy.uniform(space, 32, 0.5)]:
        assert model.predict(policy) == pytest.approx(measured(policy), rel=0.02)
    # one run disturbed by the machine (3x its time) is left out of the fit
    model.observe(policies[0], 3 * measured(policies[0]))
    for policy in [*policies[1:], _w8a8(space), Policy.uniform(space, 32, 0.5)]:
        assert model.predict(policy) == pytest.approx(measured(policy), rel=0.02)


def test_the_torch_target_times_a_probe_as_its_module():
    from orchestrator.targets.eager import TorchRunner

    runner = TorchRunner(None, TargetSettings(), "cpu")
    conv = _conv(16, 16, 1, 3, 1, 8)
    for probe in [conv, conv.at(16, 16, 8), Probe(op="Gemm", input=(2, 32), out=8)]:
        assert 0 < runner.probe_ms(probe) < 1000


def test_only_a_runtime_with_integer_kernels_holds_8_bit_layers_weights_in_int8(
    resnet, tmp_path, monkeypatch
):
    """The bytes a model streams: ONNX Runtime's QLinearConv holds int8 weights; the torch
    target's fake-quant holds float ones whatever its activations (swin_t in torch at W8A8
    was predicted 31% faster than float for this, and ran 40% slower)."""
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    evaluator, space = resnet
    found = evaluator.latency_probes({x.name: [8, 32] for x in space.profile.layers})
    assert found["integer_weights"] is True  # the onnxruntime runner's
    held = {}
    for integer in (True, False):
        model = LatencyModel(space, LayerTable.of({**found, "integer_weights": integer}))
        held[integer] = (model.features(Policy.uniform(space, 32))[HELD],
                         model.features(_w8a8(space))[HELD])  # fmt: skip
    assert held[True][1] < held[True][0] / 3.5  # int8 against float32 weights
    assert held[False][1] == held[False][0]


