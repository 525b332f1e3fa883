"""Third-party packages whose import can break beside the user's torch build.

torchvision ships compiled ops (nms, roi_align, ...) built against one torch release and
build. Beside another build (here: PyPI's CUDA torchvision 0.28.0 beside the CPU torch
2.13.0) the library fails to load, and torchvision's import then fails outright with
"operator torchvision::nms does not exist": it registers fake kernels for nms and qnms
whether or not the library loaded. `import transformers` imports torchvision where it is
installed, so it fails the same way.

`prepare_torchvision()` checks, without importing torchvision, whether its compiled
library loads; where it does not, it defines the schemas of the ops torchvision's import
needs, so the import succeeds. Model definitions (every classification architecture)
work; the compiled ops themselves (detection's nms, roi_align) raise torchvision's own
"Couldn't load custom C++ ops" error when called. prunesearch calls it before importing
any task module, so a user's task may import torchvision or transformers freely.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import logging
import sys
from pathlib import Path

LOG = logging.getLogger("prunesearch")

# the ops torchvision's import registers fakes for unconditionally (torchvision/_meta_registrations.py)
_TORCHVISION_IMPORT_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES: list[object] = []  # a torch.library.Library must outlive its definitions


def _extension(package_dir: Path, name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (package_dir / f"{name}{suffix}").is_file():
            return package_dir / f"{name}{suffix}"
    return None


@functools.cache
def prepare_torchvision() -> str:
    """Make `import torchvision` work beside this torch. Returns "absent", "ops" (its
    compiled ops load: nothing to do) or "no-ops" (loaded without them)."""
    if "torchvision" in sys.modules:
        return "ops"  # imported already (it imports only where it works)
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    import torch

    library = _extension(Path(next(iter(spec.submodule_search_locations))), "_C")
    try:
        if library is None:
            raise OSError("torchvision has no compiled _C library")
        torch.ops.load_library(str(library))  # what torchvision's import does first
        return "ops"
    except (OSError, ImportError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_IMPORT_OPS:
        name = schema.partition("(")[0]
        if not torch._C._dispatch_has_kernel(f"torchvision::{name}") and not hasattr(
            torch.ops.torchvision, name
        ):
            lib.define(schema)
    _LIBRARIES.append(lib)
    LOG.info(
        "torchvision's compiled ops do not load beside torch %s (%s); its models work, its "
        "detection ops (nms, roi_align) do not",
        torch.__version__,
        reason,
    )
    return "no-ops"


def import_torchvision():
    """torchvision, imported beside any torch build (see the module docstring)."""
    if prepare_torchvision() == "absent":
        raise ImportError(
            "torchvision is not installed: `pip install torchvision` (pip keeps the "
            "torch you have when you name it too: `pip install torch==<yours> torchvision`)"
        )
    import torchvision

    return torchvision
