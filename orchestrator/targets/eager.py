"""The `torch` target (the default): the rebuilt PyTorch model is scored as it is
(fake-quantized weights and, where `act_bits` says, activations), exported as
prunesearch's packed safetensors file, and its latency, when asked for, is PyTorch's
forward on the worker."""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.batches import call_model
from orchestrator.compress.activations import ActQuantized, QParams, fake_quantize_act
from orchestrator.latency_table import time_ms
from orchestrator.targets.base import Artifact, Runner, Target, register
from search_spaces.config import FLOAT_BITS


class TorchRunner(Runner):
    @torch.no_grad()
    def latency(self, artifact: Artifact, inputs: Any) -> tuple[float, float]:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.settings.latency.threads)
        try:
            return super().latency(artifact, inputs)
        finally:
            torch.set_num_threads(previous)

    def artifact(self, model: torch.nn.Module, bits: Any, activations: Any = None) -> Artifact:
        if activations:  # simulated: fake-quant around each layer (compress/activations.py)
            model = ActQuantized(model, activations)
        cuda = torch.device(self.device).type == "cuda"

        def run(inputs: Any) -> Any:
            output = call_model(model, inputs)
            if cuda:  # kernels run asynchronously: a forward ends when they do
                torch.cuda.synchronize(self.device)
            return output

        return Artifact(model=model, run=run)

    @torch.no_grad()
    def probe_ms(self, probe: Any) -> float:
        """The layer alone as a torch module (fake-quant around it at 8 bits)."""
        module = _module_of(probe).to(self.device).eval()
        x = torch.randn(probe.input, device=self.device)
        params = QParams(scale=0.05, zero=128)
        act = probe.act < FLOAT_BITS
        cuda = torch.device(self.device).type == "cuda"

        def forward() -> None:
            y = module(fake_quantize_act(x, params) if act else x)
            if act:
                fake_quantize_act(y, params)
            if cuda:
                torch.cuda.synchronize(self.device)

        previous = torch.get_num_threads()
        torch.set_num_threads(self.settings.latency.threads)
        try:
            return time_ms(forward)
        finally:
            torch.set_num_threads(previous)


def _module_of(probe: Any) -> torch.nn.Module:
    if probe.op == "Identity":
        return torch.nn.Identity()
    if probe.op == "Gemm":
        return torch.nn.Linear(probe.input[1], probe.out, bias=False)
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[len(probe.kernel)]
    return conv(probe.input[1], probe.out, probe.kernel, stride=probe.stride,
                padding=probe.padding, dilation=probe.dilation, groups=probe.groups, bias=False)  # fmt: skip


class TorchTarget(Target):
    name = "torch"

    def runner(self, space: Any, settings: Any, device: Any) -> Runner:
        return TorchRunner(space, settings, device)


TORCH = register(TorchTarget())
