"""Learning-rate schedules: transformers parity for WSD, phase boundaries, and bad configs."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError
from transformers import get_wsd_schedule

from cpt.errors import CptError
from cpt.schema import resolve_length
from cpt.train.schedules import (
    ConstantSchedule,
    CosineSchedule,
    InfiniteSchedule,
    ScheduleConfig,
    WSDSchedule,
    WSDSSchedule,
    decay_ends,
    lr_at,
    lr_curve,
    validate_schedule,
)

SHAPES = ["linear", "cosine", "1-sqrt"]
ADAPTER = TypeAdapter(ScheduleConfig)


def strictly_decreasing(xs):
    return bool(np.all(np.diff(xs) < 0))


def strictly_increasing(xs):
    return bool(np.all(np.diff(xs) > 0))


# (warmup, decay, steps, min_lr_ratio), lengths in steps or as fractions of the stage
WSD_CASES = [
    (0, 0, 10, 0.0),
    (4, 30, 100, 0.0),
    (0.1, 0.2, 97, 0.1),
    (0.05, 0.5, 33, 0.25),
    (7, 0.25, 50, 0.0),
    (1, 1, 2, 0.5),
    (0, 0.2, 1000, 0.0),
    (0.3, 0.7, 20, 0.9),
]


@pytest.mark.parametrize(("warmup_type", "decay_type"), list(itertools.product(SHAPES, SHAPES)))
@pytest.mark.parametrize(("warmup", "decay", "steps", "ratio"), WSD_CASES)
def test_wsd_equals_transformers(warmup_type, decay_type, warmup, decay, steps, ratio):
    cfg = WSDSchedule(
        lr=1.0, warmup=warmup, decay=decay, warmup_type=warmup_type, decay_type=decay_type, min_lr_ratio=ratio
    )
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    peer = get_wsd_schedule(
        optimizer,
        num_warmup_steps=resolve_length(warmup, steps),
        num_decay_steps=resolve_length(decay, steps),
        num_training_steps=steps,
        warmup_type=warmup_type,
        decay_type=decay_type,
        min_lr_ratio=ratio,
    ).lr_lambdas[0]
    ours = [lr_at(cfg, t, steps) for t in range(steps + 3)]  # and past the end
    np.testing.assert_allclose(ours, [peer(t) for t in range(steps + 3)], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(lr_curve(cfg, steps), ours[:steps])


def test_wsd_scales_with_lr_and_ends_decayed():
    cfg = WSDSchedule(lr=3e-4, warmup=10, decay=0.2)
    curve = lr_curve(cfg, 100)
    assert curve[0] == 0.0  # transformers' warmup starts at lr * min_lr_ratio
    assert np.all(curve[10:81] == 3e-4)  # the decay's first step is still at the peak
    assert strictly_increasing(curve[:11]) and strictly_decreasing(curve[80:])
    assert curve[-1] > 0 and lr_at(cfg, 100, 100) == 0.0
    assert decay_ends(cfg, 100) == [100]
    assert decay_ends(WSDSchedule(lr=1.0, decay=0), 100) == []


def test_wsd_exp_decay_is_geometric_with_minicpm_half_life():
    # min_lr_ratio 0.25 over 10 steps: the lr halves every 10 * ln 2 / ln 4 = 5 steps
    cfg = WSDSchedule(lr=2.0, decay=10, decay_type="exp", min_lr_ratio=0.25)
    curve = lr_curve(cfg, 30)
    assert curve[20] == 2.0
    assert curve[25] == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(curve[21:] / curve[20:-1], 0.25 ** (1 / 10), rtol=1e-12)
    assert lr_at(cfg, 30, 30) == pytest.approx(0.5, rel=1e-12)


def test_constant_warmup_starts_above_zero_and_reaches_lr_at_warmup():
    cfg = ConstantSchedule(lr=1e-3, warmup=4)
    curve = lr_curve(cfg, 20)
    assert curve[0] == pytest.approx(1e-3 / 5)
    assert curve[4] == 1e-3 and np.all(curve[4:] == 1e-3)
    assert strictly_increasing(curve[:5])
    assert np.all(lr_curve(ConstantSchedule(lr=2.0), 7) == 2.0)
    assert decay_ends(cfg, 20) == []


def test_cosine_rewarm_then_decay_to_tenth_of_peak():
    cfg = CosineSchedule(lr=3e-4)  # warmup 1% of 1000 steps, floor 0.1 * lr
    curve = lr_curve(cfg, 1000)
    assert 0 < curve[0] < curve[9] < 3e-4
    assert curve[10] == 3e-4
    assert strictly_increasing(curve[:11]) and strictly_decreasing(curve[10:])
    assert cfg.floor == pytest.approx(3e-5) and curve[-1] == cfg.floor and lr_at(cfg, 1000, 1000) == cfg.floor
    assert decay_ends(cfg, 1000) == [1000]
    explicit = lr_curve(CosineSchedule(lr=1.0, warmup=0, min_lr=0.0), 11)
    assert explicit[0] == 1.0 and explicit[5] == pytest.approx(0.5) and explicit[-1] == 0.0


def infinite(**fields):
    return InfiniteSchedule(**{"lr": 1.0, "const_lr": 0.4, "min_lr": 0.04, **fields})


@pytest.mark.parametrize("cooldown_type", ["cosine", "inv-sqrt"])
@pytest.mark.parametrize("anneal_type", ["exp", "linear", "1-sqrt"])
def test_infinite_phase_boundaries(cooldown_type, anneal_type):
    cfg = infinite(warmup=5, cooldown=10, anneal=20, cooldown_type=cooldown_type, anneal_type=anneal_type)
    steps, t_w, t_cd, t_ann = 100, 5, 15, 80
    curve = lr_curve(cfg, steps)
    assert curve[0] == pytest.approx(1.0 / 6)
    assert strictly_increasing(curve[: t_w + 1])
    assert curve[t_w] == 1.0
    assert strictly_decreasing(curve[t_w : t_cd + 1])
    assert curve[t_cd] == 0.4 and np.all(curve[t_cd : t_ann + 1] == 0.4)
    assert strictly_decreasing(curve[t_ann:])
    assert curve[-1] == pytest.approx(0.04, rel=1e-12)
    assert lr_at(cfg, steps + 5, steps) == pytest.approx(0.04, rel=1e-12)
    assert decay_ends(cfg, steps) == [steps]


def test_infinite_inv_sqrt_cooldown_follows_the_paper_and_hits_const_lr():
    cfg = infinite(warmup=0, cooldown=4, anneal=0, cooldown_type="inv-sqrt", timescale=10.0)
    curve = lr_curve(cfg, 10)

    def h(x):
        return 1 / math.sqrt(1 + 10 * x) - 1

    expected = [1.0 + (0.4 - 1.0) * h(t / 4) / h(1) for t in range(5)]
    np.testing.assert_allclose(curve[:5], expected, rtol=1e-14)
    assert curve[4] == 0.4  # exactly, at T_cd


def test_infinite_without_anneal_stays_on_the_constant_branch():
    cfg = infinite(warmup=0.05, cooldown=0.1, anneal=0)
    curve = lr_curve(cfg, 200)
    assert np.all(curve[30:] == 0.4)
    assert lr_at(cfg, 10_000, 200) == 0.4
    assert decay_ends(cfg, 200) == []


def test_infinite_later_task_starts_on_the_constant_branch():
    curve = lr_curve(infinite(warmup=0, cooldown=0, anneal=0.5), 10)
    assert np.all(curve[:6] == 0.4) and strictly_decreasing(curve[5:])
    assert curve[-1] == pytest.approx(0.04)


def test_infinite_warmup_without_cooldown_climbs_to_const_lr():
    curve = lr_curve(infinite(warmup=3, cooldown=0, anneal=0), 8)
    np.testing.assert_allclose(curve[:3], [0.1, 0.2, 0.3])
    assert np.all(curve[3:] == 0.4)


def test_infinite_one_step_anneal_lands_on_min_lr():
    curve = lr_curve(infinite(warmup=0, cooldown=0, anneal=1, anneal_type="linear"), 5)
    assert np.all(curve[:4] == 0.4) and curve[4] == pytest.approx(0.04)


def test_infinite_phases_may_fill_the_stage():
    curve = lr_curve(infinite(warmup=2, cooldown=3, anneal=5), 10)
    assert curve[2] == pytest.approx(1.0) and curve[5] == 0.4 and curve[-1] == pytest.approx(0.04)


def test_wsds_restarts_at_peak_after_every_decay():
    cfg = WSDSSchedule(lr=1.0, warmup=10, period=100, decay=0.2, decay_type="linear", min_lr_ratio=0.1)
    steps = 450  # the remainder of 50 steps lengthens the last period
    ends = decay_ends(cfg, steps)
    assert ends == [100, 200, 300, 450]
    curve = lr_curve(cfg, steps)
    assert curve[0] == pytest.approx(0.1) and curve[10] == 1.0
    for start, end in zip([0, *ends[:-1]], ends):
        assert curve[end - 20] == 1.0 and strictly_decreasing(curve[end - 20 : end])
        np.testing.assert_array_equal(curve[end - 20 : end], curve[80:100])  # the same decay each time
        assert start == 0 or np.all(curve[start : end - 20] == 1.0)  # no re-warmup
    assert lr_at(cfg, steps, steps) == pytest.approx(0.1)


def test_wsds_with_one_period_is_wsd():
    fields = dict(lr=1.0, warmup=0.1, decay=0.3, warmup_type="cosine", decay_type="exp", min_lr_ratio=0.05)
    np.testing.assert_array_equal(
        lr_curve(WSDSSchedule(period=77, **fields), 77), lr_curve(WSDSchedule(**fields), 77)
    )
    assert decay_ends(WSDSSchedule(period=0.5, decay=5, lr=1.0), 21) == [10, 21]


def test_configs_parse_from_recipe_dicts():
    for raw in [
        {"type": "constant", "lr": 1e-3},
        {"type": "cosine", "lr": 2e-3, "warmup": 0.05, "min_lr": 2e-4},
        {"type": "wsd", "lr": 1e-3, "warmup": 100, "decay": 0.2, "decay_type": "1-sqrt"},
        {"type": "infinite", "lr": 3e-4, "const_lr": 1.65e-4, "min_lr": 3e-5},
        {"type": "wsd-s", "lr": 1e-3, "period": 0.25},
    ]:
        cfg = ADAPTER.validate_python(raw)
        assert cfg.type == raw["type"]
        assert ADAPTER.validate_python(cfg.model_dump()) == cfg


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "constant", "lr": 0.0},
        {"type": "constant", "lr": float("inf")},
        {"type": "constant", "lr": 1.0, "warmup": 2.5},
        {"type": "constant", "lr": 1.0, "warmup": -1},
        {"type": "constant", "lr": 1.0, "decay": 0.1},
        {"type": "cosine", "lr": 1.0, "min_lr": 2.0},
        {"type": "cosine", "lr": 1.0, "min_lr": -0.1},
        {"type": "wsd", "lr": 1.0, "decay_type": "exp"},
        {"type": "wsd", "lr": 1.0, "decay_type": "step"},
        {"type": "wsd", "lr": 1.0, "warmup_type": "exp"},
        {"type": "wsd", "lr": 1.0, "min_lr_ratio": 1.5},
        {"type": "wsd-s", "lr": 1.0},
        {"type": "wsd-s", "lr": 1.0, "period": 0},
        {"type": "infinite", "lr": 1.0, "const_lr": 2.0, "min_lr": 0.1},
        {"type": "infinite", "lr": 1.0, "const_lr": 0.5, "min_lr": 0.6},
        {"type": "infinite", "lr": 1.0, "const_lr": 0.5, "min_lr": 0.0},
        {"type": "infinite", "lr": 1.0, "const_lr": 0.5, "min_lr": 0.1, "timescale": 0},
        {"type": "infinite", "lr": 1.0, "const_lr": 0.5, "min_lr": 0.1, "cooldown_type": "exp"},
        {"type": "linear", "lr": 1.0},
    ],
)
def test_bad_configs_are_validation_errors(raw):
    with pytest.raises(ValidationError):
        ADAPTER.validate_python(raw)


def test_assignment_is_validated_too():
    cfg = infinite()
    with pytest.raises(ValidationError, match="const_lr"):
        cfg.const_lr = 2.0


@pytest.mark.parametrize(
    ("cfg", "steps", "field"),
    [
        (ConstantSchedule(lr=1.0, warmup=11), 10, "schedule.warmup"),
        (CosineSchedule(lr=1.0, warmup=10), 10, "schedule.warmup"),
        (WSDSchedule(lr=1.0, warmup=11, decay=0), 10, "schedule.warmup"),
        (WSDSchedule(lr=1.0, warmup=5, decay=6), 10, "schedule.decay"),
        (WSDSchedule(lr=1.0, warmup=0.5, decay=0.6), 10, "schedule.decay"),
        (infinite(warmup=11, cooldown=0, anneal=0), 10, "schedule.warmup"),
        (infinite(warmup=5, cooldown=6, anneal=0), 10, "schedule.cooldown"),
        (infinite(warmup=3, cooldown=3, anneal=5), 10, "schedule.anneal"),
        (WSDSSchedule(lr=1.0, period=11), 10, "schedule.period"),
        (WSDSSchedule(lr=1.0, period=0.01), 10, "schedule.period"),
        (WSDSSchedule(lr=1.0, period=5, warmup=3, decay=3), 10, "schedule.decay"),
        (WSDSSchedule(lr=1.0, period=5, warmup=6, decay=1), 10, "schedule.warmup"),
        (WSDSSchedule(lr=1.0, period=5, decay=0.05), 10, "schedule.decay"),
    ],
)
def test_lengths_that_do_not_fit_the_stage_raise(cfg, steps, field):
    for call in (validate_schedule, lr_curve, decay_ends):
        with pytest.raises(CptError) as info:
            call(cfg, steps)
        assert info.value.where == field
    with pytest.raises(CptError):
        lr_at(cfg, 0, steps)


def test_step_and_steps_out_of_range():
    with pytest.raises(ValueError):
        lr_at(ConstantSchedule(lr=1.0), -1, 10)
    with pytest.raises(ValueError):
        lr_curve(ConstantSchedule(lr=1.0), 0)


lengths = st.one_of(st.integers(0, 60).map(float), st.floats(0, 0.95))
levels = st.floats(1e-6, 10.0)


@st.composite
def schedules(draw):
    """A stage length and a config of any type, valid by construction for that stage."""
    steps = draw(st.integers(2, 300))
    lr = draw(levels)
    kind = draw(st.sampled_from(["constant", "cosine", "wsd", "infinite", "wsd-s"]))
    ratio = draw(st.floats(0.001, 1.0))
    if kind == "constant":
        return ConstantSchedule(lr=lr, warmup=draw(st.integers(0, steps))), steps
    if kind == "cosine":
        return CosineSchedule(lr=lr, warmup=draw(st.integers(0, steps - 1)), min_lr=lr * ratio), steps
    shapes = dict(
        warmup_type=draw(st.sampled_from(SHAPES)),
        decay_type=draw(st.sampled_from([*SHAPES, "exp"])),
        min_lr_ratio=ratio,
    )
    if kind == "wsd":
        warmup = draw(st.integers(0, steps))
        return WSDSchedule(lr=lr, warmup=warmup, decay=draw(st.integers(0, steps - warmup)), **shapes), steps
    if kind == "wsd-s":
        period = draw(st.integers(1, steps))
        decay = draw(st.integers(1, period))
        warmup = draw(st.integers(0, period - decay))
        return WSDSSchedule(lr=lr, period=period, decay=decay, warmup=warmup, **shapes), steps
    warmup = draw(st.integers(0, steps))
    cooldown = draw(st.integers(0, steps - warmup))
    const_lr = lr * draw(st.floats(0.01, 1.0))
    cfg = InfiniteSchedule(
        lr=lr,
        const_lr=const_lr,
        min_lr=const_lr * ratio,
        warmup=warmup,
        cooldown=cooldown,
        anneal=draw(st.integers(0, steps - warmup - cooldown)),
        cooldown_type=draw(st.sampled_from(["cosine", "inv-sqrt"])),
        timescale=draw(st.floats(0.1, 100.0)),
        anneal_type=draw(st.sampled_from(["exp", "linear", "1-sqrt"])),
    )
    return cfg, steps


@settings(max_examples=150, deadline=None)
@given(schedules())
def test_curve_is_lr_at_and_stays_in_range(case):
    cfg, steps = case
    curve = lr_curve(cfg, steps)
    assert curve.dtype == np.float64 and curve.shape == (steps,)
    assert np.array_equal(curve, [lr_at(cfg, t, steps) for t in range(steps)])
    tolerance = cfg.lr * 1e-12
    assert np.all(curve >= 0) and np.all(curve <= cfg.lr + tolerance)
    assert 0 <= lr_at(cfg, steps + 3, steps) <= cfg.lr + tolerance
    ends = decay_ends(cfg, steps)
    assert ends == sorted(ends) and all(0 < n <= steps for n in ends)


@settings(max_examples=100, deadline=None)
@given(lengths, lengths, st.integers(1, 500))
def test_fractional_wsd_lengths_either_fit_or_name_the_field(warmup, decay, steps):
    cfg = WSDSchedule(lr=1.0, warmup=warmup, decay=decay)
    fits = resolve_length(warmup, steps) + resolve_length(decay, steps) <= steps
    try:
        validate_schedule(cfg, steps)
    except CptError as error:
        assert not fits and error.where in {"schedule.warmup", "schedule.decay"}
    else:
        assert fits
