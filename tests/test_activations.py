"""Activation quantization (issue 15): the act_bits kind, calibration, the torch target's
simulation and the onnxruntime target's QuantizeLinear/DequantizeLinear pairs."""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from orchestrator.compress.activations import (
    ActQuantized,
    QParams,
    calibrate,
    fake_quantize_act,
)
from orchestrator.config import make_config
from orchestrator.errors import ConfigError
from orchestrator.evaluate import Evaluator, RecoverySettings
from orchestrator.prepare import build_space
from orchestrator.search import run_search
from orchestrator.targets import TargetSettings
from search_spaces.cost import policy_cost
from search_spaces.policy import Policy

MOBILE_TASK = "tests.test_export:mobile_task"
ACTS = {"act_bits": [8, 32]}


def _space(task: str, target: str = "torch", **config):
    return build_space(make_config({"task": task, "target": target, **config}))


def _act_knobs(space) -> dict[str, tuple]:
    return {k.name: k.choices for k in space.knobs if k.kind == "act_bits"}


def _uniform(space, bits: int, act: int) -> Policy:
    values = {k.name: act if k.kind == "act_bits" else bits if k.kind == "bits" else max(k.choices)
              for k in space.knobs}  # fmt: skip
    return Policy.from_values(space, values)


def test_no_activation_knob_unless_the_config_asks_for_one():
    _, _, space = _space("digits-cnn")
    assert _act_knobs(space) == {}
    _, _, space = _space("digits-cnn", space=ACTS)
    layers = [x.name for x in space.profile.layers]
    assert _act_knobs(space) == {f"act_bits:{name}": (8, 32) for name in layers}
    # a rule keeps one layer's activations in float: its knob goes
    _, _, ruled = _space(
        "digits-cnn", space={**ACTS, "rules": [{"layers": "$last", "act_bits": [32]}]}
    )
    assert (
        f"act_bits:{layers[-1]}" not in _act_knobs(ruled)
        and len(_act_knobs(ruled)) == len(layers) - 1
    )


def test_recurrent_layers_get_no_activation_knob():
    """Only Conv and Linear modules have integer kernels for 8-bit inputs and outputs."""
    _, _, space = _space("digits-lstm", space=ACTS)
    assert _act_knobs(space) == {"act_bits:head": (8, 32)}


@pytest.mark.parametrize("value", [4, 16, 0])
def test_an_activation_width_other_than_8_or_float_is_refused(value):
    with pytest.raises(ConfigError, match=f"{value} is not an activation width: use 8, or 32"):
        _space("digits-cnn", space={"act_bits": [value, 32]})


def test_bops_count_8_bit_activations():
    _, _, space = _space("digits-cnn", space=ACTS, pruning="none")
    float_acts, int_acts = _uniform(space, 8, 32), _uniform(space, 8, 8)
    a, b = policy_cost(space, float_acts), policy_cost(space, int_acts)
    assert a.macs == b.macs and a.size_bytes == b.size_bytes  # the torch file stores no scales
    assert a.bops == a.macs * 8 * 32 and b.bops == b.macs * 8 * 8


values = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(low=values, high=values, data=st.lists(values, min_size=1, max_size=64))
def test_fake_quant_is_onnx_quantize_then_dequantize(low, high, data):
    """The torch simulation rounds exactly as ONNX Runtime's QuantizeLinear (half to
    even, saturating) and DequantizeLinear do, and the range always holds zero."""
    params = QParams.of_range(min(low, high), max(low, high))
    assert 0 <= params.zero <= 255 and params.scale > 0
    assert float(fake_quantize_act(torch.zeros(1), params)) == 0.0  # zero is exact
    x = np.asarray(data, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [len(data)])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [len(data)])],
        [numpy_helper.from_array(np.array(params.scale, np.float32), "s"),
         numpy_helper.from_array(np.array(params.zero, np.uint8), "z")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])  # fmt: skip
    expected = session.run(None, {"x": x})[0]
    got = fake_quantize_act(torch.from_numpy(x), params).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=params.scale * 1e-4)


def test_minmax_calibration_covers_every_value_seen_and_percentile_clips_outliers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    batches = [(torch.randn(32, 8), None) for _ in range(3)]
    batches.append((torch.cat([torch.randn(31, 8), torch.full((1, 8), 50.0)]), None))
    inputs = torch.cat([b[0] for b in batches])
    minmax = calibrate(model, ["0", "2"], batches, "minmax")
    into, out = minmax["0"]
    assert into.scale == pytest.approx(float(inputs.max() - inputs.min()) / 255, rel=1e-6)
    with torch.no_grad():
        y = model[0](inputs)
    assert out.scale == pytest.approx(float(y.max() - y.min()) / 255, rel=1e-6)
    clipped = calibrate(model, ["0", "2"], batches, "percentile")["0"][0]
    assert clipped.scale < into.scale / 2  # the row of 50s is ignored
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_the_torch_simulation_quantizes_inputs_and_outputs_and_leaves_the_model_as_it_was():
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)
    ).eval()
    x = torch.randn(16, 8)
    params = calibrate(model, ["2"], [(x, None)])
    into, out = params["2"]
    with torch.no_grad():
        hidden = model[1](model[0](x))
        expected = fake_quantize_act(model[2](fake_quantize_act(hidden, into)), out)
        got = ActQuantized(model, params)(x)
        plain = model(x)
    assert torch.equal(got, expected) and not torch.equal(got, plain)
    assert not model[2]._forward_hooks and not model[2]._forward_pre_hooks


@pytest.mark.parametrize("task, pruning", [
    ("digits-cnn", "none"), ("digits-cnn", "structured"), ("digits-resnet", "structured"),
    (MOBILE_TASK, "structured"), ("digits-lstm", "auto"),
])  # fmt: skip
def test_an_onnx_file_with_activation_pairs_is_the_predicted_size_to_the_byte(task, pruning):
    loaded, _, space = _space(task, "onnxruntime", pruning=pruning, space=ACTS)
    assert _act_knobs(space)
    evaluator = Evaluator(loaded, space, recovery=RecoverySettings(),
                          target=TargetSettings(name="onnxruntime"))  # fmt: skip
    rng = random.Random(0)
    policies = [_uniform(space, 8, 8), _uniform(space, 4, 8), _uniform(space, 32, 8)]
    policies += [Policy.from_values(space, {k.name: rng.choice(k.choices) for k in space.knobs})
                 for _ in range(6)]  # fmt: skip
    for policy in policies:
        model = evaluator.compressed_model(policy)
        artifact = evaluator.artifact_of(model, policy)
        assert len(artifact.data) == policy_cost(space, policy).size_bytes
        onnx.checker.check_model(onnx.load_from_string(artifact.data))


def _optimized_ops(data: bytes, path) -> collections.Counter:
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_onnx_runtime_runs_8_bit_layers_as_integer_kernels(tmp_path):
    """W8A8: every conv becomes QLinearConv and every Linear QGemm in ONNX Runtime's own
    optimized graph; the file's outputs follow the torch simulation's."""
    loaded, _, space = _space("digits-cnn", "onnxruntime", pruning="none", space=ACTS)
    evaluator = Evaluator(loaded, space, recovery=RecoverySettings(),
                          target=TargetSettings(name="onnxruntime"))  # fmt: skip
    policy = _uniform(space, 8, 8)
    model = evaluator.compressed_model(policy)
    artifact = evaluator.artifact_of(model, policy)
    ops = _optimized_ops(artifact.data, tmp_path / "w8a8.onnx")
    kinds = collections.Counter(x.kind for x in space.profile.layers)
    assert ops["QLinearConv"] == kinds["Conv2d"] and ops["QGemm"] == kinds["Linear"]
    # BatchNorm folded into the integer conv, ReLU into the output pair: no float node
    # between two integer layers
    assert ops["Conv"] == 0 and ops["Gemm"] == 0
    assert ops["BatchNormalization"] == ops["Relu"] == 0
    # the simulation quantizes where the file does: a folded conv's output after its norm
    outputs = evaluator.runner.observed_outputs()
    assert outputs  # digits-cnn's convs each have a BatchNorm after them
    params = calibrate(model, evaluator.rebuilder.activation_bits(policy), evaluator.calibration,
                       outputs=outputs)  # fmt: skip
    x = loaded.validation()[0][0]
    with torch.no_grad():
        simulated = ActQuantized(model, params, outputs)(x)
    deployed = artifact.model(x)
    agree = (simulated.argmax(1) == deployed.argmax(1)).float().mean()
    assert agree >= 0.95
    # 4-bit weights under 8-bit activations: int8 codes, which the integer kernels take
    # (int4 ones would leave the layer to a float kernel dequantizing every run)
    w4a8 = _uniform(space, 4, 8)
    artifact = evaluator.artifact_of(evaluator.compressed_model(w4a8), w4a8)
    ops = _optimized_ops(artifact.data, tmp_path / "w4a8.onnx")
    assert ops["QLinearConv"] == kinds["Conv2d"] and ops["QGemm"] == kinds["Linear"]
    # float weights under 8-bit activations: int8 codes too (a float weight ONNX Runtime
    # quantizes itself, into a slower kernel); the file is W8A8's size, as priced
    w32a8 = _uniform(space, 32, 8)
    artifact = evaluator.artifact_of(evaluator.compressed_model(w32a8), w32a8)
    assert len(artifact.data) == policy_cost(space, w32a8).size_bytes
    assert policy_cost(space, w32a8).size_bytes == policy_cost(space, policy).size_bytes
    types = {t.name: t.data_type for t in onnx.load_from_string(artifact.data).graph.initializer}
    assert all(types.get(f"{x.weights[0].key}_quantized") == 3 for x in space.profile.layers)
    # one layer on 8-bit activations, the others' 8-bit weights folded into float ones when
    # the session is made (Cast and Mul: a DequantizeLinear would stay for the QDQ fusion
    # and dequantize on every run): one integer kernel, no weight left to dequantize
    acts = _act_knobs(space)
    one = Policy.from_values(space, {**dict(_uniform(space, 8, 32).items()), next(iter(acts)): 8})
    artifact = evaluator.artifact_of(evaluator.compressed_model(one), one)
    ops = _optimized_ops(artifact.data, tmp_path / "one.onnx")
    assert ops["QLinearConv"] + ops["QGemm"] == 1
    assert ops["DequantizeLinear"] == 1  # the integer layer's output, back to float
    assert ops["Cast"] == ops["Mul"] == 0
    # activations in float: the integer weights are dequantized once, the kernels are float
    float_acts = _uniform(space, 8, 32)
    artifact = evaluator.artifact_of(evaluator.compressed_model(float_acts), float_acts)
    assert artifact.model.session.get_session_options().get_session_config_entry(
        "session.disable_quant_qdq") == "1"  # fmt: skip


def test_an_integer_layers_batchnorm_and_relu6_leave_no_float_node_between_integer_kernels(
    tmp_path,
):
    """Conv -> BatchNorm -> ReLU6 at W8A8: the norm is folded into the conv and the output
    pair follows the ReLU6 with a range from 0, which ONNX Runtime drops; the file's
    outputs follow the simulation that quantizes where the file does."""
    loaded, _, space = _space(MOBILE_TASK, "onnxruntime", pruning="none", space=ACTS)
    evaluator = Evaluator(loaded, space, recovery=RecoverySettings(),
                          target=TargetSettings(name="onnxruntime"))  # fmt: skip
    policy = _uniform(space, 8, 8)
    model = evaluator.compressed_model(policy)
    artifact = evaluator.artifact_of(model, policy)
    relu6 = sum(isinstance(m, torch.nn.ReLU6) for m in model.modules())
    assert sum(a.after is not None for a in space.artifact.acts) == relu6 > 0
    assert {n.op_type for n in onnx.load_from_string(artifact.data).graph.node} >= {"Clip"}
    ops = _optimized_ops(artifact.data, tmp_path / "w8a8.onnx")
    assert ops["Clip"] == ops["Relu"] == ops["BatchNormalization"] == 0
    assert ops["QLinearConv"] == sum(x.kind == "Conv2d" for x in space.profile.layers)
    outputs = evaluator.runner.observed_outputs()
    params = calibrate(model, evaluator.rebuilder.activation_bits(policy), evaluator.calibration,
                       outputs=outputs)  # fmt: skip
    relu_out = [params[name][1] for name, at in outputs.items() if at.relu]
    assert len(relu_out) == relu6 and all(p.zero == 0 for p in relu_out)
    assert all(p.scale <= 6 / 255 * (1 + 1e-6) for p in relu_out)  # ReLU6's bound
    x = loaded.validation()[0][0]
    with torch.no_grad():
        simulated = ActQuantized(model, params, outputs)(x)
    deployed = artifact.model(x)
    assert (simulated.argmax(1) == deployed.argmax(1)).float().mean() >= 0.95


def test_a_search_over_activation_bits_on_onnxruntime(ray_cluster, tmp_path):
    cfg = make_config({"task": "digits-cnn", "target": "onnxruntime", "out": str(tmp_path),
                       "study": "s", "trials": 8, "workers": {"count": 2}, "space": ACTS,
                       "latency": {"repeats": 3, "warmup": 1}})  # fmt: skip
    run_search(cfg)
    trials = pd.read_parquet(tmp_path / "s" / "trials")
    done = trials[(trials["state"] == "COMPLETE") & trials["cached_from"].isna()]
    assert (trials["state"] != "FAIL").all() and len(done) >= 3
    _, _, space = build_space(cfg)
    acts = 0
    for row in done.itertuples():
        policy = Policy.from_json(space, row.policy)
        assert row.size_bytes == policy_cost(space, policy).size_bytes
        assert row.bops == policy_cost(space, policy).bops
        acts += any(policy[k] == 8 for k in _act_knobs(space))
    assert acts  # the search tried 8-bit activations


def test_a_torch_export_keeps_its_activation_scales_and_reproduces_the_metric(tmp_path):
    """The packed safetensors export of a W8A8 policy: the manifest keeps each layer's
    input and output scales and load_compressed fake-quantizes with them, so the loaded
    model scores what the trial recorded (without them it would score the float
    activations' metric and the export would be refused)."""
    from types import SimpleNamespace

    from orchestrator.export import MANIFEST_FILE, POLICY_FILE, export_trial, load_compressed
    from orchestrator.runrecord import RunRecord

    config = make_config({"task": "digits-cnn", "space": ACTS})
    task, _, space = build_space(config)
    policy = _uniform(space, 8, 8)
    evaluator = Evaluator(task, space, recovery=RecoverySettings())
    metric = evaluator.evaluate(policy)["metric"]
    row = SimpleNamespace(trial=0, policy=policy.to_json(), metric=metric,
                          size_bytes=policy_cost(space, policy).size_bytes)  # fmt: skip
    exported = export_trial(config, RunRecord(study="t", space=space.to_dict()), row)
    for name, data in exported.files.items():
        (tmp_path / name).write_bytes(data)
    manifest = json.loads(exported.files[MANIFEST_FILE])
    layers = [x.name for x in space.profile.layers]
    assert sorted(manifest["activations"]) == sorted(layers)
    for scales in manifest["activations"].values():
        assert scales["input"]["scale"] > 0 and 0 <= scales["output"]["zero"] <= 255
    record = json.loads(exported.files[POLICY_FILE])
    assert {entry["act_bits"] for entry in record["layers"]} == {8}
    loaded = load_compressed(tmp_path)
    assert task.metric(loaded, evaluator.validation) == pytest.approx(metric, abs=1e-9)
    # the loaded model's outputs sit on the last layer's uint8 grid
    out_scale = manifest["activations"][layers[-1]]["output"]
    with torch.no_grad():
        logits = loaded(evaluator.validation[0][0])
    codes = logits / out_scale["scale"] + out_scale["zero"]
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert len(torch.unique(codes.round())) <= 256
