"""Deployment targets (issue 15): one module per target, registered by name. See base.py
for what a target provides."""

from orchestrator.targets import eager, onnxrt  # noqa: F401 - registers torch, onnxruntime
from orchestrator.targets.base import (
    TARGETS,
    Artifact,
    LatencySettings,
    Runner,
    Target,
    TargetSettings,
    register,
    target_of,
)

__all__ = ["TARGETS", "Artifact", "LatencySettings", "Runner", "Target", "TargetSettings",
           "register", "target_of"]  # fmt: skip
