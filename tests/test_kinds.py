"""Knob kinds as a registry (issue 13): a toy third kind, registered by its own module
(tests/toy_kind.py) and known to no other, is searched end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from orchestrator.config import make_config
from orchestrator.prepare import build_space
from orchestrator.search import run_search
from search_spaces.kinds import KINDS, register

TOY_TASK = "tests.toy_kind:task"


@pytest.fixture
def flip_kind():
    from tests import toy_kind

    register(toy_kind.FLIP)  # again: an earlier test may have dropped it
    yield toy_kind.FLIP
    KINDS.pop(toy_kind.FLIP.name)  # the other tests' spaces have bits and keep only


def test_a_registered_kind_gets_knobs_and_keeps_out_of_the_price(flip_kind):
    _, _, space = build_space(make_config({"task": TOY_TASK}))
    flips = [k for k in space.knobs if k.kind == "flip"]
    assert [k.choices for k in flips] == [(0, 1)]
    assert space.knobs[-1] is flips[0]  # the last layer's knobs end with the newest kind
    values = {k.name: k.choices[-1] for k in space.knobs}
    assert space.layer_settings(values) == space.layer_settings({**values, flips[0].name: 0})


def test_a_search_over_a_toy_kind_scores_it_through_its_own_apply(ray_cluster, tmp_path,
                                                                 flip_kind):  # fmt: skip
    config = make_config({"task": TOY_TASK, "out": str(tmp_path), "study": "s", "trials": 16,
                          "seed": 3, "sampler": "random", "workers": {"count": 2}})  # fmt: skip
    run_search(config)
    trials = pd.read_parquet(tmp_path / "s" / "trials")
    done = trials[trials["state"].isin(["COMPLETE", "PRUNED"])]  # PRUNED: a prefix's metric
    flip = done["policy"].map(lambda p: next(v for k, v in json.loads(p).items()
                                             if k.startswith("flip:")))  # fmt: skip
    assert set(flip) == {0, 1}  # the sampler and the baselines drew both values
    # negated logits pick the least likely class: the worker applied the kind
    assert done.loc[flip == 1, "metric"].max() < 0.2 < done.loc[flip == 0, "metric"].max()
    assert done.loc[done["metric"].idxmax(), "metric"] == done.loc[flip == 0, "metric"].max()
