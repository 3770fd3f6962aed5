"""Learning-rate schedules: REFERENCES §1 and transformers parity, phase boundaries, and bad configs."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_wsd_schedule,
)

from cpt.config.schedule import (
    ConstantSchedule,
    CosineSchedule,
    InfiniteSchedule,
    ScheduleConfig,
    WSDSchedule,
    WSDSSchedule,
    validate_schedule,
)
from cpt.config.schema import resolve_length
from cpt.errors import CptError
from cpt.train.schedules import decay_ends, lr_at, lr_curve

SHAPES = ["linear", "cosine", "1-sqrt"]
ADAPTER = TypeAdapter(ScheduleConfig)


def peer_lambda(factory, **kwargs):
    """The lr factor per step of a transformers scheduler, for an optimizer at lr 1."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return factory(optimizer, **kwargs).lr_lambdas[0]


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
    peer = peer_lambda(
        get_wsd_schedule,
        num_warmup_steps=resolve_length(warmup, steps),
        num_decay_steps=resolve_length(decay, steps),
        num_training_steps=steps,
        warmup_type=warmup_type,
        decay_type=decay_type,
        min_lr_ratio=ratio,
    )
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


def test_constant_warmup_starts_at_zero_and_reaches_lr_at_warmup():
    cfg = ConstantSchedule(lr=1e-3, warmup=4)
    curve = lr_curve(cfg, 20)
    assert curve[0] == 0.0 and curve[1] == pytest.approx(1e-3 / 4)
    assert curve[4] == 1e-3 and np.all(curve[4:] == 1e-3)
    assert strictly_increasing(curve[:5])
    assert np.all(lr_curve(ConstantSchedule(lr=2.0), 7) == 2.0)
    assert decay_ends(cfg, 20) == []


def test_cosine_rewarm_then_decay_to_tenth_of_peak():
    cfg = CosineSchedule(lr=3e-4)  # warmup 1% of 1000 steps, floor 0.1 * lr
    curve = lr_curve(cfg, 1000)
    assert curve[0] == 0.0 < curve[9] < 3e-4
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
    assert curve[0] == 0.0 and curve[1] == pytest.approx(1.0 / 5)
    assert strictly_increasing(curve[: t_w + 1])
    assert curve[t_w] == 1.0
    assert strictly_decreasing(curve[t_w : t_cd + 1])
    assert curve[t_cd] == 0.4 and np.all(curve[t_cd : t_ann + 1] == 0.4)
    assert strictly_decreasing(curve[t_ann:])
    assert curve[-1] > 0.04  # the anneal meets min_lr at T_end = steps, one step after the stage
    assert lr_at(cfg, steps, steps) == lr_at(cfg, steps + 5, steps) == pytest.approx(0.04, rel=1e-12)
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
    assert lr_at(infinite(warmup=0, cooldown=0, anneal=0.5), 10, 10) == pytest.approx(0.04)


def test_infinite_warmup_without_cooldown_climbs_to_const_lr():
    curve = lr_curve(infinite(warmup=3, cooldown=0, anneal=0), 8)
    np.testing.assert_allclose(curve[:3], [0.0, 0.4 / 3, 0.8 / 3])
    assert np.all(curve[3:] == 0.4)


def test_infinite_one_step_anneal_meets_min_lr_after_the_stage():
    cfg = infinite(warmup=0, cooldown=0, anneal=1, anneal_type="linear")
    assert np.all(lr_curve(cfg, 5) == 0.4) and lr_at(cfg, 5, 5) == pytest.approx(0.04)
    assert decay_ends(cfg, 5) == [5]


def test_infinite_phases_may_fill_the_stage():
    cfg = infinite(warmup=2, cooldown=3, anneal=5)
    curve = lr_curve(cfg, 10)
    assert curve[2] == pytest.approx(1.0) and curve[5] == 0.4 and lr_at(cfg, 10, 10) == pytest.approx(0.04)


# REFERENCES §1, transcribed directly: every cpt schedule must give these values to 1e-12.


def infinite_reference(cfg, t, steps):
    """The infinite schedule of REFERENCES §1 at step t, with T_end = steps.

    Beyond the formula's domain: T_w = 0 starts the cooldown at eta_max; without a cooldown
    (which the papers always have) the warmup climbs to eta_const, as cpt documents; past the
    stage the anneal holds eta_min.
    """
    t_w = resolve_length(cfg.warmup, steps)
    t_cd = t_w + resolve_length(cfg.cooldown, steps)
    t_ann, t_end = steps - resolve_length(cfg.anneal, steps), steps
    eta_max, eta_const, eta_min = cfg.lr, cfg.const_lr, cfg.min_lr
    if 0 < t_w and t <= t_w:
        return (eta_max if t_cd > t_w else eta_const) * t / t_w
    if t_w < t_cd and t <= t_cd:
        p = (t - t_w) / (t_cd - t_w)
        if cfg.cooldown_type == "cosine":
            return eta_const + (eta_max - eta_const) / 2 * (1 + math.cos(math.pi * p))

        def h(x):
            return 1 / math.sqrt(1 + cfg.timescale * x) - 1

        return eta_max + (eta_const - eta_max) * h(p) / h(1)
    if t <= t_ann or t_ann == t_end:
        return eta_const
    p = min((t - t_ann) / (t_end - t_ann), 1.0)
    if cfg.anneal_type == "exp":
        return eta_const * (eta_min / eta_const) ** p
    if cfg.anneal_type == "linear":
        return eta_const + (eta_min - eta_const) * p
    return eta_min + (eta_const - eta_min) * (1 - math.sqrt(p))


@st.composite
def infinite_cases(draw, cooldown_type, anneal_type):
    """An infinite schedule of the given shapes, with any lengths that fit, and its stage length."""
    steps = draw(st.integers(1, 400))
    fraction = st.sampled_from([0.0, 0.05, 0.1, 0.15, 0.2, 0.25])
    warmup = draw(st.one_of(st.integers(0, steps).map(float), fraction))
    cooldown = draw(st.one_of(st.integers(0, steps - resolve_length(warmup, steps)).map(float), fraction))
    room = steps - resolve_length(warmup, steps) - resolve_length(cooldown, steps)
    anneal = draw(st.one_of(st.integers(0, max(room, 0)).map(float), fraction))
    assume(room >= resolve_length(anneal, steps))
    lr = draw(st.floats(1e-6, 10.0))
    const_lr = lr * draw(st.floats(0.01, 1.0))
    floor = st.floats(0.001, 1.0) if anneal_type == "exp" else st.floats(0.0, 1.0)
    cfg = infinite(
        lr=lr, const_lr=const_lr, min_lr=const_lr * draw(floor), warmup=warmup, cooldown=cooldown, anneal=anneal,
        cooldown_type=cooldown_type, timescale=draw(st.floats(0.1, 100.0)), anneal_type=anneal_type,
    )
    return cfg, steps


@pytest.mark.parametrize("cooldown_type", ["cosine", "inv-sqrt"])
@pytest.mark.parametrize("anneal_type", ["exp", "linear", "1-sqrt"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_infinite_is_the_formula_of_references(cooldown_type, anneal_type, data):
    cfg, steps = data.draw(infinite_cases(cooldown_type, anneal_type))
    ts = range(steps + 3)  # and past the end
    np.testing.assert_allclose(
        [lr_at(cfg, t, steps) for t in ts], [infinite_reference(cfg, t, steps) for t in ts], rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("steps", [7, 20, 33, 100, 1000])
def test_infinite_defaults_are_the_formula_of_references(steps):
    cfg = infinite()  # warmup 5%, cooldown to 15%, anneal over the last 20%
    np.testing.assert_allclose(
        lr_curve(cfg, steps), [infinite_reference(cfg, t, steps) for t in range(steps)], rtol=0, atol=1e-12
    )


def linear_warmups(lr, warmup):
    """One config of each schedule type whose warmup rises linearly from 0 to ``lr``."""
    return [
        ConstantSchedule(lr=lr, warmup=warmup),
        CosineSchedule(lr=lr, warmup=warmup),
        WSDSchedule(lr=lr, warmup=warmup, decay=0),
        WSDSSchedule(lr=lr, warmup=warmup, period=1.0 * (warmup + 1), decay=1),
        infinite(lr=lr, const_lr=lr / 2, min_lr=lr / 20, warmup=warmup, cooldown=1, anneal=0),
    ]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200), st.integers(2, 50), st.floats(1e-6, 10.0))
def test_every_linear_warmup_is_lr_t_over_warmup(warmup, extra, lr):
    steps = warmup + extra
    for cfg in linear_warmups(lr, warmup):
        ours = [lr_at(cfg, t, steps) for t in range(warmup + 1)]
        expected = [lr * t / warmup for t in range(warmup + 1)]
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12, err_msg=cfg.type)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 400), st.floats(0, 0.5))
def test_constant_equals_transformers_constant_with_warmup(steps, warmup):
    cfg = ConstantSchedule(lr=1.0, warmup=warmup)
    peer = peer_lambda(get_constant_schedule_with_warmup, num_warmup_steps=resolve_length(warmup, steps))
    ts = range(steps + 3)
    np.testing.assert_allclose([lr_at(cfg, t, steps) for t in ts], [peer(t) for t in ts], rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(3, 400), st.floats(0, 0.5), st.floats(0, 1))
def test_cosine_equals_transformers_cosine_with_min_lr_ending_at_the_last_step(steps, warmup, ratio):
    cfg = CosineSchedule(lr=1.0, warmup=warmup, min_lr=ratio)
    w = resolve_length(warmup, steps)
    assume(w <= steps - 2)  # transformers needs a decay of at least one step to reach its floor
    # transformers' cosine reaches its floor at num_training_steps; cpt's at the last step
    peer = peer_lambda(
        get_cosine_with_min_lr_schedule_with_warmup, num_warmup_steps=w, num_training_steps=steps - 1, min_lr_rate=ratio
    )
    np.testing.assert_allclose(lr_curve(cfg, steps), [peer(t) for t in range(steps)], rtol=0, atol=1e-12)


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
