"""The `torch` target (the default): the rebuilt PyTorch model is scored as it is
(fake-quantized weights and, where `act_bits` says, activations), exported as prunesearch's packed safetensors file, and its
latency, when asked for, is PyTorch's forward on the worker."""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.batches import call_model
from orchestrator.compress.activations import ActQuantized
from orchestrator.targets.base import Artifact, Runner, Target, register


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


class TorchTarget(Target):
    name = "torch"

    def runner(self, space: Any, settings: Any, device: Any) -> Runner:
        return TorchRunner(space, settings, device)


TORCH = register(TorchTarget())
