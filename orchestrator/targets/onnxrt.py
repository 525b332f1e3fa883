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

import torch
from torch import nn

from orchestrator.errors import ConfigError
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
