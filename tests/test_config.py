"""Config validation (one line naming the key), budgets, and config JSON round trips."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.budget import Budget, BudgetError, parse_budget
from orchestrator.config import SearchConfig, load_config_file, make_config
from orchestrator.errors import ConfigError
from search_spaces.cost import Cost


def _error(data: dict, **overrides) -> str:
    with pytest.raises(ConfigError) as exc:
        make_config(data, **overrides)
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg  # one line
    return msg


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"trails": 10}, ["unknown config key 'trails'", "did you mean 'trials'"]),
        ({"workers": {"cout": 2}}, ["'workers.cout'", "did you mean 'workers.count'"]),
        ({"recovery": {"bn_recalib": False}},
         ["'recovery.bn_recalib'", "did you mean 'recovery.bn_recalibration'"]),
        ({"space": {"rules": [{"layers": "a", "tye": "x"}]}},
         ["'space.rules[0].tye'", "did you mean 'space.rules[0].tie'"]),
        ({"zzz": 1}, ["unknown config key 'zzz'"]),
        ({"trials": "many"}, ["config key 'trials'", "'many'"]),
        ({"trials": 0}, ["config key 'trials'", "greater than or equal to 1"]),
        ({"trials": 2.5}, ["config key 'trials'"]),
        ({"seed": "x"}, ["config key 'seed'"]),
        ({"workers": {"count": 0}}, ["config key 'workers.count'", "at least 1"]),
        ({"workers": {"count": "lots"}}, ["config key 'workers.count'", "'auto'"]),
        ({"workers": {"device": "tpu"}}, ["config key 'workers.device'"]),
        ({"sampler": "cmaes"}, ["config key 'sampler'"]),
        ({"pruning": "structured-ish"}, ["config key 'pruning'"]),
        ({"study": "a/b"}, ["config key 'study'", "plain directory name"]),
        ({"budget": "size=40XB"}, ["config key 'budget'", "size=40XB", "KB"]),
        ({"budget": "sise=40KB"}, ["config key 'budget'", "unknown budget 'sise'"]),
        ({"budget": "40KB"}, ["config key 'budget'", "KEY=VALUE"]),
        ({"budget": {"size": "0KB"}}, ["config key 'budget'", "positive"]),
        ({"budget": {"macs": "2Q"}}, ["config key 'budget'", "macs=2Q"]),
        ({"space": {"bits": [1, 4]}}, ["config key 'space.bits'", "1 is not a bit width"]),
        ({"space": {"bits": [4, 64]}}, ["config key 'space.bits'", "64 is not a bit width"]),
        ({"space": {"rules": [{"layers": "x", "bits": [0]}]}},
         ["config key 'space.rules[0].bits'", "not a bit width"]),
        ({"space": {"keep": [0.5, 1.5]}}, ["config key 'space.keep'", "1.5 is outside (0, 1]"]),
        ({"space": {"keep": {"min": 0, "max": 1}}}, ["config key 'space.keep'", "0 < min"]),
        ({"space": {"rules": [{"layers": "x", "keep": [-0.1]}]}},
         ["config key 'space.rules[0].keep'", "outside (0, 1]"]),
    ],
)  # fmt: skip
def test_bad_config_is_one_line_naming_the_key(data, expected):
    msg = _error(data)
    for part in expected:
        assert part in msg, msg


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"my-key": 1}, "my-key"),  # pydantic reports it; not an identifier
        ({"workers": {"cpus-per-worker": 2}}, "workers.cpus-per-worker"),
        ({"space": {"int": 3}}, "space.int"),  # a name pydantic also uses as a type tag
    ],
)
def test_unknown_key_that_is_not_an_identifier_is_named(data, key):
    msg = _error(data)
    assert f"unknown config key '{key}'" in msg, msg


def test_overrides_set_dotted_keys():
    cfg = make_config({"trials": 5, "workers": {"cpus_per_worker": 2}},
                      **{"workers.count": 3, "trials": None, "budget": "size=40KB"})  # fmt: skip
    assert cfg.trials == 5  # None: flag not given
    assert cfg.workers.count == 3 and cfg.workers.cpus_per_worker == 2
    assert cfg.parsed_budget == Budget(size_bytes=40_000)


def test_override_errors_name_the_key():
    assert "config key 'workers.count'" in _error({}, **{"workers.count": 0})


def test_overrides_do_not_change_the_callers_mapping():
    data = {"trials": 5, "workers": {"count": 2}}
    before = copy.deepcopy(data)
    cfg = make_config(data, **{"workers.count": 4})
    assert cfg.workers.count == 4
    assert data == before


def test_defaults():
    cfg = make_config()
    assert cfg.task == "digits-cnn" and cfg.trials == 60 and cfg.budget is None
    assert not cfg.parsed_budget
    assert cfg.workers.count == "auto"


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    ("spec", "budget"),
    [
        ("size=512B", Budget(size_bytes=512)),
        ("size=40KB", Budget(size_bytes=40_000)),
        ("size=1.5MB", Budget(size_bytes=1_500_000)),
        ("size=2GB", Budget(size_bytes=2 * 10**9)),
        ("size=40KiB", Budget(size_bytes=40 * 1024)),
        ("size=1MiB", Budget(size_bytes=2**20)),
        ("size=40kb", Budget(size_bytes=40_000)),
        ("macs=2M", Budget(macs=2_000_000)),
        ("macs=1500", Budget(macs=1500)),
        ("macs=2.5K", Budget(macs=2500)),
        ("bops=1G", Budget(bops=10**9)),
        ("bops=3T", Budget(bops=3 * 10**12)),
        ("size=40KB, macs=2M ,bops=1G", Budget(size_bytes=40_000, macs=2 * 10**6, bops=10**9)),
        ({"size": "40KB", "macs": 2_000_000}, Budget(size_bytes=40_000, macs=2_000_000)),
        ("latency=2ms", Budget(latency_ms=2.0)),
        ("latency<=2ms", Budget(latency_ms=2.0)),
        ("size<=1MB,latency<=500us", Budget(size_bytes=10**6, latency_ms=0.5)),
        ("latency=0.01s", Budget(latency_ms=10.0)),
        ({"latency": "3ms"}, Budget(latency_ms=3.0)),
        ("", Budget()),
        (None, Budget()),
    ],
)
def test_parse_budget_units(spec, budget):
    assert parse_budget(spec) == budget


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("size=40", "not an amount"),  # sizes need a unit
        ("size=40XB", "not an amount"),
        ("size=-1KB", "not an amount"),
        ("size=0KB", "must be positive"),
        ("macs=2MB", "not an amount"),
        ("speed=3", "unknown budget 'speed'"),
        ("latency=2", "not a time; write e.g. latency=2ms"),
        ("latency=0ms", "must be positive"),
        ("size40KB", "KEY=VALUE"),
        (42, "string like"),
    ],
)
def test_parse_budget_errors(spec, message):
    with pytest.raises(BudgetError, match=message):
        parse_budget(spec)


@settings(max_examples=100, deadline=None)
@given(
    thousandths=st.integers(1, 10**7),
    unit=st.sampled_from([("KB", 1), ("MB", 1000)]),
)
def test_decimal_sizes_parse_to_the_exact_byte(thousandths, unit):
    """'1.001KB' is 1001 bytes, not int(1.001 * 1000) = 1000 (float truncation)."""
    name, factor = unit
    text = f"{thousandths // 1000}.{thousandths % 1000:03d}{name}"
    assert parse_budget(f"size={text}").size_bytes == thousandths * factor


def test_macs_budget_is_exact_for_decimal_millions():
    assert parse_budget("macs=2.01M").macs == 2_010_000


@pytest.mark.parametrize("spec", ["size=0.5B", "macs=0.4", "bops=0.001K"])
def test_a_budget_is_never_a_zero_limit(spec):
    """A limit that truncates to 0 passes 'must be positive' and then divides by zero."""
    try:
        budget = parse_budget(spec)
    except BudgetError:
        return  # refusing it is fine
    assert all(v >= 1 for v in budget.limits.values())
    budget.violations(Cost(size_bytes=1, macs=1, bops=1))


def test_budget_violations_and_allows():
    budget = parse_budget("size=1KB,macs=100")
    inside = Cost(size_bytes=1000, macs=50, bops=7)
    outside = Cost(size_bytes=1500, macs=50, bops=7)
    assert budget.allows(inside) and not budget.allows(outside)
    assert budget.violations(outside) == {"size_bytes": 0.5, "macs": -0.5}
    assert budget.describe() == "size=1000,macs=100"
    assert Budget().allows(outside) and Budget().describe() == "none"


# ---------------------------------------------------------------- JSON round trips

CONFIGS = [
    {},
    {"task": "digits-lstm", "trials": 7, "seed": None, "sampler": "nsga2", "pruning": "none"},
    {"budget": "size=40KB,macs=2M", "study": "s1", "out": "/tmp/x", "baselines": False},
    {"budget": {"size": "40KB", "macs": 2_000_000}, "retries": 0},
    {"workers": {"count": 3, "cpus_per_worker": 0.5, "gpus_per_worker": 0.25, "device": "cpu"},
     "recovery": {"bn_recalibration": False, "calibration_batches": 2}},
    {"space": {"bits": [2, 4, 32], "keep": [0.25, 0.5, 1], "preset": "none", "rules": [
        {"layers": "features.0", "skip": True},
        {"layers": ["features.3", "features.7"], "tie": "mid", "bits": [4, 8],
         "keep": {"min": 0.2, "max": 0.8, "step": 0.3}},
        {"layers": "$last", "keep": [1.0]},
    ]}},
]  # fmt: skip


@pytest.mark.parametrize("data", CONFIGS)
def test_config_json_round_trip(data):
    cfg = make_config(data)
    assert SearchConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert make_config(cfg.to_dict()) == cfg
    assert SearchConfig.model_validate(cfg.to_dict()) == cfg


def test_configs_are_frozen():
    cfg = make_config()
    with pytest.raises(Exception, match="frozen"):
        cfg.trials = 3


# ---------------------------------------------------------------- config files


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trials: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML") as exc:
        load_config_file(bad)
    assert "\n" not in str(exc.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- task\n- trials\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config_file(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_config_file(empty) == {}
    good = tmp_path / "good.yaml"
    good.write_text("task: digits-lstm\ntrials: 4\nspace:\n  bits: [4, 8]\n")
    assert make_config(load_config_file(good)).space.bits == (4, 8)


def test_every_example_config_is_valid():
    from pathlib import Path

    from orchestrator.config import load_config_file

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        make_config(load_config_file(path))  # raises ConfigError on any bad key


def test_every_sampler_name_has_a_factory_and_auto_picks_among_them():
    from orchestrator import config, search

    assert set(search.SAMPLERS) | {"auto"} == set(config.SAMPLERS)
    assert {search.auto_sampler(k, t, w) for k in (4, 400) for t in (10, 1000)
            for w in (1, 8)} <= set(search.SAMPLERS)  # fmt: skip
