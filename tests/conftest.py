"""Shared fixtures: one real local Ray for the whole session (started once: a Ray start costs seconds)."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", object_store_memory=150 * 2**20)  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture
def quiet_env(monkeypatch):
    """Environment for CLI subprocesses: no progress bar noise in captured output."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class _ReachedRay(AssertionError):
    pass


def _no_ray(*args, **kwargs):
    raise _ReachedRay("bad input got past validation and reached the search")


@pytest.fixture
def no_search(monkeypatch):
    """For tests of bad input: no search may start (reaching Ray fails the test); the
    CLI's sys.path and torch thread changes do not leak."""
    import ray
    import torch

    import orchestrator.search

    monkeypatch.setattr(orchestrator.search, "run_prepared", _no_ray)
    monkeypatch.setattr(ray, "init", _no_ray)
    monkeypatch.setattr(sys, "path", list(sys.path))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
