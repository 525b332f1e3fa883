"""prunesearch: distributed pruning-and-quantization policy search for PyTorch models.

Importing this package does not import or start Ray.
"""

from orchestrator.budget import Budget, parse_budget
from orchestrator.config import SearchConfig, load_config_file, make_config
from orchestrator.cost import Cost, policy_cost
from orchestrator.errors import ConfigError
from orchestrator.policy import Policy
from orchestrator.results import load_front, load_results
from orchestrator.task import Task, resolve_task


def run_search(config, **kwargs):  # noqa: ANN001, ANN003 - thin lazy wrapper
    """Run or resume a search (see `orchestrator.search.run_search`)."""
    from orchestrator.search import run_search as _run

    return _run(config, **kwargs)


__all__ = [
    "Budget", "ConfigError", "Cost", "Policy", "SearchConfig", "Task", "load_config_file",
    "load_front", "load_results", "make_config", "parse_budget", "policy_cost", "resolve_task",
    "run_search",
]  # fmt: skip
