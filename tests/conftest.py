"""Shared fixtures: one real local Ray for the whole session (DESIGN §6.8)."""

from __future__ import annotations

import os

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
