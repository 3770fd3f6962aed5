"""Mixture schedules: weights, temperatures, replay, phases, epoch caps, and every bad input."""

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cpt.config.mixture import MixtureConfig
from cpt.data.mixture import cap_epochs, epochs, planned_blocks, weight_matrix
from cpt.errors import CptError

TOKENS = {"a": 100, "b": 300, "c": 400}


def matrix(steps=10, own=("a", "b"), known=(), tokens=TOKENS, replay_shares=None, **cfg):
    return weight_matrix(MixtureConfig(**cfg), steps, list(own), list(known), tokens, replay_shares)


def test_static_weights_are_normalised_and_unnamed_domains_get_nothing():
    names, W = matrix(own=("a", "b", "c"), weights={"a": 3, "b": 1})
    assert names == ["a", "b", "c"]
    assert W.shape == (10, 3) and W.dtype == np.float64
    np.testing.assert_allclose(W, np.tile([0.75, 0.25, 0.0], (10, 1)))


def test_default_is_natural_proportions():
    names, W = matrix()
    assert names == ["a", "b"]
    np.testing.assert_allclose(W, np.tile([0.25, 0.75], (10, 1)))


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.0, [1 / 3, 1 / 3, 1 / 3]),
        (1.0, [0.125, 0.375, 0.5]),
        (0.5, np.sqrt([100, 300, 400]) / np.sqrt([100, 300, 400]).sum()),
    ],
)
def test_temperature(alpha, expected):
    _, W = matrix(own=("a", "b", "c"), temperature=alpha)
    np.testing.assert_allclose(W[0], expected)


def test_temperature_skips_domains_without_tokens():
    _, W = matrix(own=("a", "b"), tokens={"a": 0, "b": 5}, temperature=0)
    np.testing.assert_allclose(W[0], [0.0, 1.0])
    with pytest.raises(CptError) as info:
        matrix(own=("a",), tokens={"a": 0})
    assert info.value.where == "mixture.temperature"


def test_replay_splits_by_the_previous_stage_plan():
    shares = {"old1": 30, "old2": 10}
    names, W = matrix(own=("a", "b"), known=tuple(shares), weights={"a": 1, "b": 1}, replay=0.25, replay_shares=shares)
    assert names == ["a", "b", "old1", "old2"]
    np.testing.assert_allclose(W, np.tile([0.375, 0.375, 0.1875, 0.0625], (10, 1)))


def test_replay_of_a_domain_the_stage_also_trains_on_adds_up():
    shares = {"a": 1, "c": 1}
    names, W = matrix(own=("a", "b"), known=("c",), weights={"a": 1, "b": 1}, replay=0.5, replay_shares=shares)
    assert names == ["a", "b", "c"]
    np.testing.assert_allclose(W[0], [0.25 + 0.25, 0.25, 0.25])


def test_weights_without_replay_may_name_earlier_domains():
    names, W = matrix(own=("b",), known=("a", "b"), weights={"a": 1, "b": 3})
    assert names == ["b", "a"]
    np.testing.assert_allclose(W[0], [0.75, 0.25])


def test_phases_switch_at_the_right_step_for_end_upsampling():
    phases = [{"until": 0.8, "weights": {"a": 1, "b": 1}}, {"until": 1.0, "weights": {"a": 1, "b": 3}}]
    _, W = matrix(steps=10, phases=phases)
    np.testing.assert_allclose(W[:8], np.tile([0.5, 0.5], (8, 1)))
    np.testing.assert_allclose(W[8:], np.tile([0.25, 0.75], (2, 1)))
    _, W = matrix(steps=7, phases=[{"until": 0.5, "weights": {"a": 1}}, {"until": 1, "weights": {"b": 1}}])
    # p = t / 7 < 0.5 for t <= 3
    assert W[:, 0].tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_phases_inherit_unset_fields_from_the_top_level():
    cfg = {
        "weights": {"a": 1, "b": 1},
        "replay": 0.2,
        "replay_shares": {"old": 1},
        "known": ("old",),
        "phases": [
            {"until": 0.5},
            {"until": 0.75, "weights": {"a": 3, "b": 1}},
            {"until": 1, "temperature": 0, "replay": 0},
        ],
    }
    names, W = matrix(steps=4, **cfg)
    assert names == ["a", "b", "old"]
    np.testing.assert_allclose(W[:2], np.tile([0.4, 0.4, 0.2], (2, 1)))  # all inherited
    np.testing.assert_allclose(W[2], [0.6, 0.2, 0.2])  # own weights, inherited replay
    np.testing.assert_allclose(W[3], [0.5, 0.5, 0.0])  # temperature replaces weights; replay off


def test_large_schedules_are_cheap():
    phases = [{"until": 0.1, "temperature": 0}, {"until": 0.9}, {"until": 1, "weights": {"a": 1}}]
    start = time.perf_counter()
    _, W = matrix(steps=1_000_000, phases=phases)
    assert time.perf_counter() - start < 2.0
    assert W.shape == (1_000_000, 2)
    assert W[:, 0].sum() == pytest.approx(0.1e6 * 0.5 + 0.8e6 * 0.25 + 0.1e6)


@pytest.mark.parametrize(
    "cfg, loc",
    [
        ({"weights": {"a": -1}}, ("weights", "a")),
        ({"weights": {"a": math.nan}}, ("weights", "a")),
        ({"weights": {"a": math.inf}}, ("weights", "a")),
        ({"weights": {"a": 0, "b": 0}}, ("weights",)),
        ({"weights": {}}, ("weights",)),
        ({"weights": {"a": 1}, "temperature": 1}, ()),
        ({"temperature": -0.5}, ("temperature",)),
        ({"temperature": math.nan}, ("temperature",)),
        ({"replay": 1.0}, ("replay",)),
        ({"replay": -0.1}, ("replay",)),
        ({"phases": []}, ("phases",)),
        ({"phases": [{"until": 0.5}, {"until": 0.5}, {"until": 1}]}, ("phases",)),
        ({"phases": [{"until": 0.6}, {"until": 0.3}, {"until": 1}]}, ("phases",)),
        ({"phases": [{"until": 0.5}]}, ("phases",)),
        ({"phases": [{"until": 0}, {"until": 1}]}, ("phases", 0, "until")),
        ({"phases": [{"until": 1.5}]}, ("phases", 0, "until")),
        ({"phases": [{"until": 1, "replay": 1}]}, ("phases", 0, "replay")),
        ({"phases": [{"until": 0.5}, {"until": 1, "weights": {"a": 1}, "temperature": 0}]}, ("phases", 1)),
        ({"phases": [{"until": 1, "weights": {"a": -2}}]}, ("phases", 0, "weights", "a")),
        ({"ratio": 0.5}, ("ratio",)),
    ],
)
def test_bad_configs_name_the_field(cfg, loc):
    with pytest.raises(ValidationError) as info:
        MixtureConfig(**cfg)
    assert [e["loc"] for e in info.value.errors()] == [loc]


@pytest.mark.parametrize(
    "cfg, where, mentions",
    [
        ({"weights": {"a": 1, "zzz": 1}}, "mixture.weights", "zzz"),
        ({"phases": [{"until": 0.5}, {"until": 1, "weights": {"nope": 1}}]}, "mixture.phases.1.weights", "nope"),
        ({"weights": {"a": 1, "old": 1}, "replay": 0.1, "replay_shares": {"old": 1}}, "mixture.weights", "old"),
        ({"replay": 0.1}, "mixture.replay", "earlier stage"),
        ({"replay": 0.1, "replay_shares": {"old": 0}}, "mixture.replay", "earlier stage"),
        ({"phases": [{"until": 1, "replay": 0.3}]}, "mixture.phases.0.replay", "earlier stage"),
    ],
)
def test_bad_domains_and_replay_raise_cpt_errors(cfg, where, mentions):
    with pytest.raises(CptError) as info:
        matrix(known=("old",), **cfg)
    assert info.value.where == where
    assert mentions in info.value.message


def test_epochs_and_planned_blocks():
    W = np.tile([0.25, 0.75], (10, 1))
    np.testing.assert_allclose(planned_blocks(W, 8), [20, 60])
    assert epochs(W, 8, {"a": 10, "b": 60}) == {"a": 2.0, "b": 1.0}
    assert epochs(np.tile([0.0, 1.0], (2, 1)), 1, {"a": 0, "b": 4}) == {"a": 0.0, "b": 0.5}
    with pytest.raises(ValueError, match="columns"):
        epochs(W, 8, {"a": 10})


def test_cap_scales_down_and_redistributes_to_a_fixed_point():
    W = np.tile([0.6, 0.2, 0.2], (10, 1))
    capped = cap_epochs(W, 10, {"a": 10, "b": 5, "c": 1000}, {"a": 3, "b": 5})
    # a: 60 -> 30 blocks; b is pushed to 35 > 25 by the redistribution and capped in turn
    np.testing.assert_allclose(capped, np.tile([0.3, 0.25, 0.45], (10, 1)))
    assert epochs(capped, 10, {"a": 10, "b": 5, "c": 1000}) == pytest.approx({"a": 3, "b": 5, "c": 0.045})
    np.testing.assert_array_equal(cap_epochs(W, 10, {"a": 10, "b": 5, "c": 1}, {}), W)


def test_cap_keeps_the_upsampling_profile():
    W = np.array([[0.5, 0.5]] * 8 + [[0.25, 0.75]] * 2)
    capped = cap_epochs(W, 4, {"big": 10_000, "small": 10}, {"small": 1.5})
    assert planned_blocks(capped, 4)[1] == pytest.approx(15)
    assert capped[9, 1] / capped[0, 1] == pytest.approx(1.5)  # still upsampled at the end, by as much
    np.testing.assert_allclose(capped.sum(axis=1), 1)


def test_cap_meets_the_cap_elsewhere_when_some_steps_have_only_capped_domains():
    W = np.array([[1.0, 0.0]] * 5 + [[0.5, 0.5]] * 5)
    capped = cap_epochs(W, 1, {"a": 6, "b": 100}, {"a": 1})
    np.testing.assert_allclose(capped[:5, 0], 1)
    np.testing.assert_allclose(capped[5:], np.tile([0.2, 0.8], (5, 1)))
    with pytest.raises(CptError, match="'a' must supply 5 blocks"):
        cap_epochs(W, 1, {"a": 4, "b": 100}, {"a": 1})


def test_cap_that_cannot_fill_the_stage_is_an_error():
    with pytest.raises(CptError) as info:
        cap_epochs(np.tile([0.5, 0.5], (10, 1)), 10, {"a": 10, "b": 20}, {"a": 2, "b": 1})
    assert info.value.where == "mixture"
    assert info.value.message == "stage needs 100 blocks but max_epochs of its domains allow only 40"


def test_weighted_domain_without_blocks_is_an_error():
    with pytest.raises(CptError, match="'b' has weight but no training blocks"):
        cap_epochs(np.tile([0.5, 0.5], (2, 1)), 2, {"a": 10, "b": 0}, {})


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.floats(0, 1), min_size=3, max_size=3).filter(lambda r: sum(r) > 0.01), min_size=1,
                  max_size=4),
    steps=st.integers(1, 50),
    blocks=st.lists(st.integers(1, 200), min_size=3, max_size=3),
    caps=st.lists(st.one_of(st.none(), st.floats(0.1, 5)), min_size=3, max_size=3),
)
def test_capped_plans_are_valid_or_refused(rows, steps, blocks, caps):
    names = ["a", "b", "c"]
    R = np.array(rows) / np.array(rows).sum(axis=1, keepdims=True)
    W = R[np.arange(steps) * len(rows) // steps]
    available = dict(zip(names, blocks))
    max_epochs = {n: c for n, c in zip(names, caps) if c is not None}
    limit = np.array([max_epochs.get(n, math.inf) * available[n] for n in names])
    try:
        capped = cap_epochs(W, 8, available, max_epochs)
    except CptError:
        assert (planned_blocks(W, 8) > limit).any()
        return
    planned = planned_blocks(capped, 8)
    np.testing.assert_allclose(capped.sum(axis=1), 1)
    assert (capped >= 0).all()
    assert (planned <= limit * (1 + 1e-6) + 1e-6).all()
    unchanged = planned_blocks(W, 8) <= limit
    if unchanged.all():
        np.testing.assert_array_equal(capped, W)
    # a capped domain lands exactly on its cap
    was_capped = ~np.isclose(planned, planned_blocks(W, 8)) & (planned < planned_blocks(W, 8))
    np.testing.assert_allclose(planned[was_capped], limit[was_capped])
