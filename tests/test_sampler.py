"""The sampler: exactly on schedule, resumable without replay, rank-sliced, keyed permutations."""

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpt.data.sampler import MixtureSampler, shuffled_index

FAST = settings(max_examples=250, deadline=None)


@st.composite
def schedules(draw, max_domains=6, max_steps=60, max_batch=32):
    """A weight matrix (steps, D) with abrupt or smooth changes and zero weights, and a batch size."""
    domains = draw(st.integers(1, max_domains))
    steps = draw(st.integers(1, max_steps))
    weight = st.one_of(st.just(0.0), st.floats(1e-3, 1.0), st.sampled_from([1e-9, 0.5, 1.0]))
    keys = np.array(draw(st.lists(st.lists(weight, min_size=domains, max_size=domains), min_size=1, max_size=5)))
    for i, row in enumerate(keys):
        if row.sum() == 0:
            row[i % domains] = 1.0
    keys /= keys.sum(axis=1, keepdims=True)
    if draw(st.booleans()):  # abrupt: phases at random steps
        cuts = np.sort(draw(st.lists(st.integers(0, steps), min_size=len(keys) - 1, max_size=len(keys) - 1)))
        W = keys[np.searchsorted(cuts, np.arange(steps), side="right")]
    else:  # smooth: linear interpolation between the key rows
        x = np.linspace(0, len(keys) - 1, steps)
        lo = np.minimum(np.floor(x).astype(int), len(keys) - 1)
        hi = np.minimum(lo + 1, len(keys) - 1)
        W = keys[lo] * (1 - (x - lo))[:, None] + keys[hi] * (x - lo)[:, None]
    W /= W.sum(axis=1, keepdims=True)
    return W, draw(st.integers(1, max_batch))


def stream(sampler):
    return [batch for batch in sampler]


@FAST
@given(schedules(), st.integers(0, 2**32))
def test_every_domain_stays_within_one_block_of_its_target(schedule, seed):
    W, batch = schedule
    domains = W.shape[1]
    sampler = MixtureSampler(W, [7] * domains, batch, seed, "stage")
    target = batch * np.cumsum(W, axis=0)
    realized = np.zeros(domains)
    for step, rows in enumerate(sampler):
        assert rows.shape == (batch, 2) and rows.dtype == np.int64
        realized += np.bincount(rows[:, 0], minlength=domains)
        assert np.abs(realized - target[step]).max() < 1
        np.testing.assert_array_equal(sampler.realized_blocks(), realized)
        assert ((rows[:, 1] >= 0) & (rows[:, 1] < 7)).all()
    never = W.sum(axis=0) == 0
    assert (realized[never] == 0).all()


@FAST
@given(schedules(max_batch=16), st.integers(0, 2**32), st.sampled_from([1, 2, 4, 8, 16]), st.data())
def test_resuming_from_a_saved_state_continues_the_same_stream(schedule, seed, world, data):
    W, batch = schedule
    batch *= world
    rank = data.draw(st.integers(0, world - 1))
    blocks = data.draw(st.lists(st.integers(1, 50), min_size=W.shape[1], max_size=W.shape[1]))
    k = data.draw(st.integers(0, len(W)))
    make = lambda: MixtureSampler(W, blocks, batch, seed, "cpt", rank=rank, world_size=world)  # noqa: E731

    first = make()
    before = [first.next_step() for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))
    after = stream(first)
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.step == k
    np.testing.assert_array_equal(resumed.realized_blocks(), state["counts"])
    again = stream(resumed)
    assert len(before) + len(again) == len(W)
    for x, y in zip(after, again):
        np.testing.assert_array_equal(x, y)


def test_restoring_is_independent_of_the_step():
    steps = 1_000_000
    sampler = MixtureSampler(np.tile([0.25, 0.75], (steps, 1)), [1000, 3000], 4, 0, "long")
    k = steps - 10  # targets are whole numbers here, so the counts at step k are exactly known
    start = time.perf_counter()
    sampler.load_state_dict({"step": k, "counts": [k, 3 * k]})
    assert time.perf_counter() - start < 0.1
    rest = np.concatenate(stream(sampler))
    assert np.bincount(rest[:, 0]).tolist() == [10, 30]


@settings(max_examples=30, deadline=None)
@given(schedules(max_batch=8), st.integers(0, 1000))
def test_ranks_are_disjoint_slices_of_the_global_batch(schedule, seed):
    W, batch = schedule
    batch *= 8
    blocks = [10_000] * W.shape[1]  # no epoch wraps inside a batch, so slots are distinct blocks
    global_stream = stream(MixtureSampler(W, blocks, batch, seed, "k"))
    for world in (2, 4, 8):
        ranks = [stream(MixtureSampler(W, blocks, batch, seed, "k", rank=r, world_size=world)) for r in range(world)]
        for step, whole in enumerate(global_stream):
            parts = [ranks[r][step] for r in range(world)]
            np.testing.assert_array_equal(np.concatenate(parts), whole)
            seen = [set(map(tuple, p.tolist())) for p in parts]
            assert sum(len(s) for s in seen) == len(set().union(*seen)) == batch


def test_every_epoch_visits_every_block_once_in_a_new_order():
    blocks = [3, 10, 1]
    sampler = MixtureSampler(np.tile([0.3, 0.5, 0.2], (50, 1)), blocks, 16, 7, "epochs")
    rows = np.concatenate(stream(sampler))
    for d, n in enumerate(blocks):
        drawn = rows[rows[:, 0] == d, 1]
        full = len(drawn) // n
        assert full >= 3
        orders = drawn[: full * n].reshape(full, n)
        for order in orders:
            assert sorted(order) == list(range(n))
        if n == 10:
            assert len({tuple(o) for o in orders}) == full


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 16, 31, 64, 99, 1000, 1024, 10_007])
def test_permutation_is_a_bijection(n):
    out = shuffled_index(np.arange(n), n, seed=3, key="k", domain=1, epoch=2)
    assert sorted(out.tolist()) == list(range(n))


def test_permutation_is_keyed_and_deterministic():
    n = 1000
    base = shuffled_index(np.arange(n), n, 0, "a", 0, 0)
    np.testing.assert_array_equal(base, shuffled_index(np.arange(n), n, 0, "a", 0, 0))
    assert not np.array_equal(base, np.arange(n))
    for other in [(1, "a", 0, 0), (0, "b", 0, 0), (0, "a", 1, 0), (0, "a", 0, 1)]:
        assert (shuffled_index(np.arange(n), n, *other) == base).mean() < 0.05
    # neighbouring positions land far apart (not a rotation or stride)
    assert abs(np.corrcoef(base[:-1], base[1:])[0, 1]) < 0.15


def test_permutation_needs_no_memory_for_huge_corpora():
    n = 10**15
    positions = np.array([0, 1, 2, n // 2, n - 1])
    out = shuffled_index(positions, n, 0, "huge", 0, 0)
    assert ((out >= 0) & (out < n)).all() and len(set(out.tolist())) == 5


def test_different_keys_give_different_orders():
    W = np.tile([0.5, 0.5], (20, 1))
    a = np.concatenate(stream(MixtureSampler(W, [100, 100], 8, 0, "stage-a")))
    b = np.concatenate(stream(MixtureSampler(W, [100, 100], 8, 0, "stage-b")))
    np.testing.assert_array_equal(a[:, 0], b[:, 0])  # same schedule ...
    assert (a[:, 1] != b[:, 1]).mean() > 0.9  # ... different blocks


def test_one_domain():
    sampler = MixtureSampler(np.ones((5, 1)), [4], 3, 0, "solo")
    rows = np.concatenate(stream(sampler))
    assert (rows[:, 0] == 0).all()
    assert sorted(rows[:12, 1].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert sampler.realized_blocks().tolist() == [15]


def test_bad_arguments():
    W = np.tile([0.5, 0.5], (4, 1))
    with pytest.raises(ValueError, match="multiple of world_size"):
        MixtureSampler(W, [5, 5], 6, 0, "k", rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        MixtureSampler(W, [5, 5], 8, 0, "k", rank=4, world_size=4)
    with pytest.raises(ValueError, match="sum to 1"):
        MixtureSampler(W * 0.5, [5, 5], 8, 0, "k")
    with pytest.raises(ValueError, match="no blocks"):
        MixtureSampler(W, [5, 0], 8, 0, "k")
    MixtureSampler(np.tile([1.0, 0.0], (4, 1)), [5, 0], 8, 0, "k")  # an unused empty domain is fine
    sampler = MixtureSampler(W, [5, 5], 8, 0, "k")
    with pytest.raises(ValueError, match="off this schedule"):
        sampler.load_state_dict({"step": 2, "counts": [3, 13]})
    with pytest.raises(ValueError, match="does not fit"):
        sampler.load_state_dict({"step": 9, "counts": [36, 36]})
    stream(sampler)
    with pytest.raises(RuntimeError, match="only 4 steps"):
        sampler.next_step()


def test_a_step_costs_well_under_a_millisecond():
    rng = np.random.default_rng(0)
    W = np.repeat(rng.dirichlet(np.ones(8), size=4), 250, axis=0)
    sampler = MixtureSampler(W, [10**6, 5000, 300, 10**8, 77, 4096, 12_345, 999], 64, 0, "bench")
    start = time.process_time()
    stream(sampler)
    assert (time.process_time() - start) / len(W) < 1e-3


def test_offsets_continue_another_schedules_data_order():
    """A branch that starts where a run stopped draws the run's next blocks, not its first ones."""
    W = np.tile([0.5, 0.5], (10, 1))
    main = MixtureSampler(W, [7, 5], 4, seed=1, key="s")
    first = [main.next_step() for _ in range(4)]
    later = [main.next_step() for _ in range(6)]
    replay = MixtureSampler(W, [7, 5], 4, seed=1, key="s")
    for _ in range(4):
        replay.next_step()
    assert replay.state_dict()["counts"] != [0, 0]
    # same weights from the same position: the branch reproduces the main run's continuation
    branch = MixtureSampler(W[:6], [7, 5], 4, seed=1, key="s", offsets=replay.state_dict()["counts"])
    assert all(np.array_equal(a, branch.next_step()) for a in later)
    assert not np.array_equal(first[0], MixtureSampler(W, [7, 5], 4, seed=1, key="s", offsets=[3, 3]).next_step())
