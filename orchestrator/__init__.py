"""prunesearch: distributed pruning-and-quantization policy search for PyTorch models.

The public API. Names load on first use (PEP 562), so `import orchestrator` is cheap:
it imports neither torch nor Ray, and starts nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Budget": "orchestrator.budget", "parse_budget": "orchestrator.budget",
    "ConfigError": "orchestrator.errors",
    "Cost": "search_spaces.cost", "policy_cost": "search_spaces.cost",
    "Policy": "search_spaces.policy",
    "SearchConfig": "orchestrator.config", "load_config_file": "orchestrator.config",
    "make_config": "orchestrator.config",
    "SearchResult": "orchestrator.search", "run_search": "orchestrator.search",
    "load_front": "orchestrator.results", "load_results": "orchestrator.results",
    "Task": "orchestrator.task", "resolve_task": "orchestrator.task",
    "export_best": "orchestrator.export", "load_compressed": "orchestrator.export",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orchestrator' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
