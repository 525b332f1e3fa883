"""torchvision's classification architectures as Tasks, with nothing downloaded.

    task: orchestrator.tasks.vision:resnet50        # any name torchvision.models lists

Each model is torchvision's definition, randomly initialised with a fixed seed, its
BatchNorm statistics settled on the task's own images (as a trained model's would be),
at 64x64 inputs by default. The images are smooth random fields (low-resolution noise
upsampled, plus fine noise), so a model's predictions spread over many classes. The
metric is fidelity: top-1 agreement with the float model on the validation images,
which needs no labels and drops as compression changes what the model computes.

This is how prunesearch exercises real architectures (coupling, grouped and depthwise
convs, attention, norms) end to end; for a real search bring your trained weights and
data in a Task of your own (README, "Your own model").
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from orchestrator.task import Task
from orchestrator.thirdparty import import_torchvision

SIZE = 64
# architectures that need other input sizes or constructor arguments at small inputs
_SIZES = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 70}
_KWARGS: dict[str, dict[str, Any]] = {
    "vit_b_16": {"image_size": SIZE}, "vit_b_32": {"image_size": SIZE},
    "vit_l_16": {"image_size": SIZE}, "vit_l_32": {"image_size": SIZE},
    "vit_h_14": {"image_size": 70},
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}  # fmt: skip
VALIDATION, CALIBRATION, BATCH = 128, 64, 32


def architectures() -> list[str]:
    """Every classification architecture torchvision defines."""
    models = import_torchvision().models
    return sorted(models.list_models(module=models))


def _images(count: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 6, 6, generator=g)
    x = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return x + 0.25 * torch.randn(count, 3, size, size, generator=g)


@functools.lru_cache(maxsize=4)
def _settled(arch: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """The seeded model with BatchNorm statistics settled, and its float predictions on
    the validation images (the metric's targets)."""
    model = _construct(arch, seed)
    size = _SIZES.get(arch, SIZE)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the settling batches
        model.train()
        with torch.no_grad():
            for batch in _images(4 * BATCH, size, seed + 1).split(BATCH):
                model(batch)
        for m in norms:
            m.momentum = 0.1
    model.eval()
    with torch.no_grad():
        labels = torch.cat(
            [model(b).argmax(1) for b in _images(VALIDATION, size, seed + 2).split(BATCH)]
        )
    return model, labels


def _construct(arch: str, seed: int) -> nn.Module:
    models = import_torchvision().models
    torch.manual_seed(seed)
    return models.get_model(arch, weights=None, **_KWARGS.get(arch, {}))


def vision_task(arch: str, *, seed: int = 0) -> Task:
    """The Task for torchvision architecture `arch` (see the module docstring)."""
    if arch not in architectures():
        raise ValueError(f"torchvision has no classification architecture '{arch}'")
    size = _SIZES.get(arch, SIZE)

    def model() -> nn.Module:
        return copy.deepcopy(_settled(arch, seed)[0])

    def validation():
        _, labels = _settled(arch, seed)
        return list(
            zip(_images(VALIDATION, size, seed + 2).split(BATCH), labels.split(BATCH), strict=True)
        )

    def calibration():
        return [(x, None) for x in _images(CALIBRATION, size, seed + 3).split(BATCH)]

    return Task(name=f"torchvision-{arch}", model=model,
                example_inputs=lambda: _images(1, size, seed + 4),
                calibration=calibration, validation=validation)  # fmt: skip


def __getattr__(name: str) -> Callable[[], Task]:
    """`orchestrator.tasks.vision:<arch>` names a zero-argument task factory."""
    if name.startswith("_") or name not in architectures():
        raise AttributeError(f"module 'orchestrator.tasks.vision' has no attribute '{name}'")
    return functools.partial(vision_task, name)
