"""Policy: canonical (keep rounded to whole element counts), hashable, exact JSON round trip."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.task import resolve_task
from search_spaces import SearchSpace, SpaceConfig, SpaceError, derive_space, profile_model
from search_spaces.policy import Policy

FEW = settings(max_examples=80, deadline=None)
TASKS = ("digits-cnn", "digits-lstm")
VALID_BITS = (*range(2, 17), 32)


@functools.cache
def _space(task: str, tied: bool = False) -> SearchSpace:
    t = resolve_task(task)
    profile = profile_model(t.model(), t.example_inputs())
    rules = [{"layers": ["features.3", "features.7"], "tie": "mid"}] if tied else []
    return derive_space(profile, SpaceConfig.model_validate({"rules": rules}))


def _values(space: SearchSpace):
    """Any valid value per knob, not only the knob's choices (e.g. --policy files)."""
    ratio = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)
    return st.fixed_dictionaries({
        k.name: st.sampled_from(VALID_BITS) if k.kind == "bits" else ratio for k in space.knobs
    })  # fmt: skip


_spaces = st.sampled_from([("digits-cnn", False), ("digits-lstm", False), ("digits-cnn", True)])


@FEW
@given(which=_spaces, data=st.data())
def test_json_round_trip_is_exact(which, data):
    space = _space(*which)
    policy = Policy.from_values(space, data.draw(_values(space)))
    text = policy.to_json()
    back = Policy.from_json(space, text)
    assert back == policy
    assert back.hash == policy.hash
    assert back.to_json() == text
    assert json.loads(text) == dict(policy)  # plain JSON of {knob: value}
    assert Policy.from_values(space, dict(policy)) == policy  # canonical form is a fixed point


@FEW
@given(which=_spaces, data=st.data())
def test_keep_is_a_whole_count_of_the_knobs_units(which, data):
    space = _space(*which)
    policy = Policy.from_values(space, data.draw(_values(space)))
    for knob in space.knobs:
        value = policy[knob.name]
        if knob.kind == "bits":
            assert type(value) is int and value in VALID_BITS
        else:
            count = value * knob.units
            assert type(value) is float and 0 < value <= 1
            assert abs(count - round(count)) < 1e-6 and round(count) >= 1


@FEW
@given(which=_spaces, data=st.data())
def test_keeps_rounding_to_the_same_count_are_the_same_policy(which, data):
    space = _space(*which)
    values = data.draw(_values(space))
    knob = data.draw(st.sampled_from([k for k in space.knobs if k.kind == "keep"]))
    count = data.draw(st.integers(1, knob.units))
    nudge = data.draw(st.floats(-0.49, 0.49))
    nudged = min(1.0, max(1e-9, (count + nudge) / knob.units))
    a = Policy.from_values(space, {**values, knob.name: count / knob.units})
    b = Policy.from_values(space, {**values, knob.name: nudged})
    assert a == b and a.hash == b.hash and a.to_json() == b.to_json()
    assert len({a, b}) == 1


def test_keeps_rounding_to_different_counts_differ():
    space = _space("digits-cnn")
    knob = space.by_name["keep:classifier.3"]  # 640 elements
    base = dict(Policy.uniform(space, 8))
    a = Policy.from_values(space, {**base, knob.name: 320 / 640})
    b = Policy.from_values(space, {**base, knob.name: 321 / 640})
    c = Policy.from_values(space, {**base, knob.name: 0.5004})  # 320.256 -> 320
    d = Policy.from_values(space, {**base, knob.name: 320.5 / 640})  # half rounds up, to 321
    assert a != b and a.hash != b.hash
    assert a == c and a.hash == c.hash
    assert d == b


def test_policy_is_a_mapping_with_sorted_knobs():
    space = _space("digits-lstm")
    policy = Policy.uniform(space, 4, 0.5)
    assert list(policy) == sorted(k.name for k in space.knobs)
    assert len(policy) == len(space.knobs)
    assert policy["bits:lstm"] == 4 and policy["keep:head"] == 0.5
    with pytest.raises(KeyError):
        policy["bits:nothing"]
    assert len(policy.hash) == 16 and int(policy.hash, 16) >= 0


def test_bits_given_as_whole_floats_are_ints():
    space = _space("digits-lstm")
    a = Policy.from_values(space, {"bits:lstm": 4.0, "keep:lstm": 1, "bits:head": 8,
                                   "keep:head": 1.0})  # fmt: skip
    b = Policy.from_values(space, {"bits:lstm": 4, "keep:lstm": 1.0, "bits:head": 8,
                                   "keep:head": 1.0})  # fmt: skip
    assert a == b and a.to_json() == b.to_json()
    assert type(a["bits:lstm"]) is int and type(a["keep:lstm"]) is float


# ---------------------------------------------------------------- parse


def test_parse_uniform():
    space = _space("digits-cnn")
    p = Policy.parse(space, "uniform:4")
    assert all(p[k.name] == (4 if k.kind == "bits" else 1.0) for k in space.knobs)
    assert p == Policy.uniform(space, 4, 1.0)
    q = Policy.parse(space, "uniform:4:0.5")
    assert all(q[k.name] == (4 if k.kind == "bits" else 0.5) for k in space.knobs)
    assert q == Policy.uniform(space, 4, 0.5) and q != p


def test_uniform_keeps_knobs_a_rule_fixes_and_ignores_narrowed_choices():
    """`uniform:3:0.5` is literal for searchable knobs (3 bits even where a preset allows
    only 4+), but a knob a rule fixes to one choice keeps it: a `keep: [1.0]` layer is
    never cut, a `bits: [8]` layer stays at 8."""
    t = resolve_task("digits-cnn")
    profile = profile_model(t.model(), t.example_inputs())
    rules = [{"layers": "features.3", "keep": [1.0]}, {"layers": "features.7", "bits": [8]}]
    space = derive_space(profile, SpaceConfig.model_validate({"rules": rules}))
    p = Policy.uniform(space, 3, 0.5)
    assert p["keep:features.3"] == 1.0 and p["bits:features.7"] == 8
    assert p["bits:features.0"] == 3  # the cnn preset allows 4+ here; uniform is literal
    assert p["bits:features.3"] == 3 and p["keep:features.0"] == 0.5


def test_parse_json_text_and_wrapped_policy():
    space = _space("digits-lstm")
    policy = Policy.uniform(space, 6, 0.3)
    assert Policy.parse(space, policy.to_json()) == policy
    wrapped = json.dumps({"policy": dict(policy), "metric": 0.9})
    assert Policy.parse(space, wrapped) == policy


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("uniform:", "uniform:BITS"),
        ("uniform:x", "uniform:BITS"),
        ("uniform:4.5", "uniform:BITS"),
        ("uniform:4:half", "uniform:BITS"),
        ("uniform:1", "1 bits is not supported"),
        ("uniform:64", "64 bits is not supported"),
        ("uniform:4:1.5", "keep must be a ratio in (0, 1]"),
        ("uniform:4:0", "keep must be a ratio in (0, 1]"),
        ("uniform:4:nan", "keep must be a ratio in (0, 1]"),
        ("{not json", "not valid JSON"),
        ("[4, 0.5]", "must be an object"),
        ('"uniform"', "must be an object"),
    ],
)
def test_parse_bad_text_raises_space_error(text, message):
    space = _space("digits-cnn")
    with pytest.raises(SpaceError) as exc:
        Policy.parse(space, text)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_parse_uniform_with_extra_parts_is_refused():
    """'uniform:4:0.5:9' is not uniform:BITS[:KEEP]: it must not silently drop the ':9'."""
    with pytest.raises(SpaceError, match="uniform:BITS"):
        Policy.parse(_space("digits-cnn"), "uniform:4:0.5:9")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_bits_in_json_raise_space_error(value):
    """json.loads accepts NaN/Infinity; int() of them raises ValueError/OverflowError."""
    space = _space("digits-lstm")
    text = f'{{"bits:lstm": {value}, "keep:lstm": 1.0, "bits:head": 8, "keep:head": 1.0}}'
    with pytest.raises(SpaceError, match="bits:lstm"):
        Policy.parse(space, text)


def test_unknown_knob_names_it_and_lists_the_knobs():
    space = _space("digits-lstm")
    values = {**dict(Policy.uniform(space, 8)), "bits:lstn": 4}
    with pytest.raises(SpaceError) as exc:
        Policy.from_values(space, values)
    msg = str(exc.value)
    assert "unknown knob 'bits:lstn'" in msg
    assert all(k.name in msg for k in space.knobs)


def test_missing_knob_is_named():
    space = _space("digits-lstm")
    values = dict(Policy.uniform(space, 8))
    del values["keep:head"]
    with pytest.raises(SpaceError, match="no value for knob 'keep:head'"):
        Policy.from_values(space, values)


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        ("bits:lstm", 4.5, "bits must be an integer"),
        ("bits:lstm", True, "bits must be an integer"),
        ("bits:lstm", "4", "bits must be an integer"),
        ("bits:lstm", 1, "not supported"),
        ("bits:lstm", 17, "not supported"),
        ("keep:lstm", 0.0, "keep must be a ratio"),
        ("keep:lstm", -0.5, "keep must be a ratio"),
        ("keep:lstm", 1.01, "keep must be a ratio"),
        ("keep:lstm", True, "keep must be a ratio"),
        ("keep:lstm", "0.5", "keep must be a ratio"),
    ],
)
def test_bad_values_name_the_knob(knob, value, message):
    space = _space("digits-lstm")
    values = {**dict(Policy.uniform(space, 8)), knob: value}
    with pytest.raises(SpaceError) as exc:
        Policy.from_values(space, values)
    assert knob in str(exc.value) and message in str(exc.value)


def test_tiny_keep_rounds_up_to_one_element():
    space = _space("digits-lstm")
    policy = Policy.from_values(space, {**dict(Policy.uniform(space, 8)), "keep:head": 1e-9})
    assert policy["keep:head"] == 1 / 640
    assert space.layer_settings(policy)["head"].keep_count == 1


def test_tied_knob_sets_every_member():
    space = _space("digits-cnn", tied=True)
    policy = Policy.from_values(space, {**dict(Policy.uniform(space, 8)), "bits:mid": 3,
                                        "keep:mid": 0.5})  # fmt: skip
    settings_ = space.layer_settings(policy)
    assert settings_["features.3"].bits == settings_["features.7"].bits == 3
    assert settings_["features.3"].keep_count == 4608 // 2
    assert settings_["features.7"].keep_count == 9216 // 2
