"""The `onnxruntime` target: every candidate is its ONNX file (onnx_artifact.py), scored
and timed in ONNX Runtime (the CPU execution provider; CUDA's on a GPU worker).

What it stores natively: weights of Conv and Linear layers (ONNX Conv, Gemm, MatMul) as
int8 or int4 codes per output channel behind `DequantizeLinear` (opset 21 has int4
initializers; ONNX Runtime dequantizes them when the session is made, or fuses the pair
into an integer kernel where one exists), and any other weight as int8 the same way;
everything else in float. Masks make no ONNX model smaller or faster, so only structured
pruning (or none) is offered.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.errors import ConfigError
from orchestrator.latency_table import time_ms
from orchestrator.targets.base import Artifact, Runner, Target, TargetSettings, register
from search_spaces.config import FLOAT_BITS
from search_spaces.space import StoredBits

# layer type (LayerInfo.kind) -> weight bits ONNX Runtime stores natively
STORED = {"Conv1d": (4, 8, FLOAT_BITS), "Conv2d": (4, 8, FLOAT_BITS),
          "Conv3d": (4, 8, FLOAT_BITS), "Linear": (4, 8, FLOAT_BITS)}  # fmt: skip
OTHER = (8, FLOAT_BITS)


def _require() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"target: onnxruntime needs the onnx extra ({exc.name} is missing): "
                          "pip install 'prunesearch[onnx]'") from None  # fmt: skip


class OrtModel(nn.Module):
    """An ONNX Runtime session called like the torch model it was exported from (the
    task's metric calls it with the same inputs); outputs come back on the inputs' device."""

    def __init__(self, session: Any, names: tuple[str, ...]) -> None:
        super().__init__()
        self.session, self.names = session, names

    def forward(self, *inputs: torch.Tensor) -> Any:
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(self.names, inputs, strict=True)}
        outputs = [torch.from_numpy(o).to(inputs[0].device) for o in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def session_of(data: bytes, *, threads: int, device: torch.device | str = "cpu",
               integer: bool = False) -> Any:  # fmt: skip
    """A session on `data`. Without `integer` (no activation is quantized) the weights'
    DequantizeLinear nodes are folded into float initializers when the session is made:
    ONNX Runtime otherwise keeps them for a QDQ fusion that needs quantized activations too,
    and dequantizes every weight on every run."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if not integer:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: it warns about every unused initializer
    cuda = torch.device(device).type == "cuda"
    providers = ["CUDAExecutionProvider"] if cuda else []
    return onnxruntime.InferenceSession(data, options,
                                        providers=[*providers, "CPUExecutionProvider"])  # fmt: skip


class OrtRunner(Runner):
    integer_weights = True  # QLinearConv / QGemm hold int8 weights
    def artifact(self, model: nn.Module, bits: Mapping[str, int],
                 activations: Mapping[str, Any] | None = None) -> Artifact:  # fmt: skip
        from orchestrator.targets.onnx_artifact import write_artifact

        start = time.perf_counter()
        layout = self.space.artifact
        weights = {layer.name: layer.weights[0].key for layer in self.space.profile.layers}
        # a torch study's policy exported to ONNX: a layer its graph cannot give a pair
        # (a Linear applied as MatMul) stays float there, as the parity table then shows
        acts = {weights[name]: params for name, params in (activations or {}).items()
                if weights[name] in layout.activation_keys}  # fmt: skip
        data = write_artifact(layout, model, bits, acts)
        session = session_of(data, threads=self.settings.latency.threads, device=self.device,
                             integer=bool(acts))  # fmt: skip
        ort_model = OrtModel(session, layout.inputs)
        return Artifact(model=ort_model, data=data, seconds=time.perf_counter() - start,
                        run=lambda inputs: ort_model(*_tuple(inputs)))  # fmt: skip

    def observed_outputs(self) -> dict[str, Any]:
        from orchestrator.compress.activations import OutputAt

        layout = self.space.artifact
        folded = {f.weight: f.module for f in layout.folds}
        return {layer.name: OutputAt(module=folded.get(act.key), relu=act.after is not None,
                                     high=act.after_high)
                for layer in self.space.profile.layers
                if (act := layout.activation_keys.get(layer.weights[0].key)) is not None}  # fmt: skip

    def probe_ms(self, probe: Any) -> float:
        session = session_of(probe_bytes(probe), threads=self.settings.latency.threads,
                             device=self.device, integer=probe.act < FLOAT_BITS)  # fmt: skip
        feeds = {"x": np.random.default_rng(0).standard_normal(probe.input).astype(np.float32)}
        return time_ms(lambda: session.run(None, feeds))


def probe_bytes(probe: Any) -> bytes:
    """A one-node ONNX model of a latency probe (orchestrator/latency_table.py): Conv or
    Gemm, random weights; at 8-bit activations a QuantizeLinear/DequantizeLinear pair on
    the input and the output and int8 weights behind DequantizeLinear, the pattern ONNX
    Runtime fuses into QLinearConv / QGemm, as in a candidate's artifact; float weights
    otherwise (a candidate's float-activation layer has its codes folded into float
    weights when its session is made). `Identity`: a model that does nothing (one run's
    fixed cost)."""
    from onnx import TensorProto, helper, numpy_helper

    from orchestrator.targets.onnx_artifact import OPSET

    integer = probe.act < FLOAT_BITS
    nodes, inits = [], []

    def pair(name: str) -> str:  # x -> Q -> DQ
        inits.extend([numpy_helper.from_array(np.array(0.05, np.float32), f"{name}_s"),
                      numpy_helper.from_array(np.array(128, np.uint8), f"{name}_z")])  # fmt: skip
        nodes.append(helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                                      [f"{name}_dq"]))  # fmt: skip
        return f"{name}_dq"

    x = pair("x") if integer else "x"
    if probe.op == "Identity":
        nodes.append(helper.make_node("Identity", [x], ["y"]))
    else:
        inits += _probe_weight(probe, nodes, integer)
        if probe.op == "Conv":
            nodes.append(helper.make_node("Conv", [x, "w"], ["y"], group=probe.groups,
                                          kernel_shape=list(probe.kernel),
                                          strides=list(probe.stride),
                                          pads=[*probe.padding, *probe.padding],
                                          dilations=list(probe.dilation)))  # fmt: skip
        else:
            nodes.append(helper.make_node("Gemm", [x, "w"], ["y"], transB=1))
    y = pair("y") if integer else "y"
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(probe.input))],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, list(probe.output))], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    return model.SerializeToString()


def _probe_weight(probe: Any, nodes: list, integer: bool) -> list:
    """The initializers of a probe's weight `w`: float, or for an `integer` probe int8
    codes per output channel behind DequantizeLinear (its node added to `nodes`)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    shape = ([probe.out, probe.input[1] // probe.groups, *probe.kernel] if probe.op == "Conv"
             else [probe.out, probe.input[1]])  # fmt: skip
    if not integer:
        return [numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), "w")]
    nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0))
    return [numpy_helper.from_array(rng.integers(-127, 128, size=shape, dtype=np.int8), "w_q"),
            numpy_helper.from_array(np.full(probe.out, 0.01, np.float32), "w_s"),
            numpy_helper.from_array(np.zeros(probe.out, np.int8), "w_z")]  # fmt: skip


def _tuple(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    pruning = ("structured", "none")
    export_format = "onnx"
    measures_latency = True
    # the exported LSTM/GRU node carries hidden_size, and its gate slices are constants:
    # their hidden units stay (a group through one is left out, with why)
    fixed_width = ("LSTM", "GRU")

    def stored_bits(self) -> StoredBits:
        return StoredBits(target=self.name, by_kind=STORED, other=OTHER)

    def check(self, example_inputs: Any) -> None:
        _require()
        if isinstance(example_inputs, Mapping):
            raise ConfigError("target: onnxruntime: the task's inputs are a dict (keyword "
                              "arguments), which the ONNX export here does not take yet; give "
                              "them as a tensor or a tuple, or use target: torch")  # fmt: skip

    def layout(self, model: nn.Module, example_inputs: Any) -> Any:
        from orchestrator.targets.onnx_artifact import skeleton_of

        return skeleton_of(model, example_inputs)

    def runner(self, space: Any, settings: TargetSettings, device: Any) -> Runner:
        return OrtRunner(space, settings, device)


ONNXRUNTIME = register(OnnxRuntimeTarget())
