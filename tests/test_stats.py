"""Bootstrap intervals and paired tests (finegrain.platform.stats) on rows whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from finegrain.platform.stats import Correctness, bootstrap_ci, paired_test


def _row(matrix, videos=None) -> Correctness:
    m = np.asarray(matrix, dtype=float)
    runs = {
        s: dict(zip(videos or [f"v{i:03d}" for i in range(m.shape[1])], r)) for s, r in enumerate(m)
    }
    return Correctness.from_runs(runs)


def test_the_interval_of_a_constant_is_a_point():
    assert bootstrap_ci(_row(np.ones((3, 50)))) == (1.0, 1.0)
    assert bootstrap_ci(Correctness.from_accuracies({0: 0.4, 1: 0.4})) == (0.4, 0.4)


def test_the_interval_covers_the_mean_and_narrows_with_more_videos():
    rng = np.random.default_rng(0)
    small, large = (_row(rng.random((3, n)) < 0.6) for n in (40, 1000))
    for c in (small, large):
        lo, hi = bootstrap_ci(c)
        assert lo <= c.mean <= hi
    assert np.diff(bootstrap_ci(large)) < np.diff(bootstrap_ci(small)) / 2


def test_seeds_that_disagree_widen_the_interval():
    agree = _row(np.tile(np.arange(60) % 2, (3, 1)))
    disagree = _row([np.arange(60) % 2, np.ones(60), np.zeros(60)])
    assert np.diff(bootstrap_ci(disagree)) > np.diff(bootstrap_ci(agree))


def test_identical_rows_are_not_significantly_different():
    rng = np.random.default_rng(1)
    c = _row(rng.random((3, 80)) < 0.5)
    test = paired_test(c, c)
    assert test.p_value == 1.0 and not test.significant and test.difference == 0.0
    assert (test.seeds, test.videos) == (3, 80)


def test_a_clearly_better_row_is_significant_and_a_coin_flip_is_not():
    rng = np.random.default_rng(2)
    base = rng.random((3, 200)) < 0.5
    better = base | (rng.random((3, 200)) < 0.5)  # fixes about half the errors
    test = paired_test(_row(better), _row(base))
    assert test.significant and test.difference > 0.15
    noise = _row(rng.random((3, 200)) < 0.5)
    assert not paired_test(noise, _row(rng.random((3, 200)) < 0.5)).significant


def test_pairs_only_common_seeds_and_videos_and_needs_per_video_results():
    a = Correctness.from_runs({0: {"x": 1, "y": 0, "z": 1}, 1: {"x": 1, "y": 1, "z": 1}})
    b = Correctness.from_runs({1: {"y": 0, "z": 1, "w": 0}, 2: {"y": 1, "z": 1, "w": 1}})
    test = paired_test(a, b)
    assert (test.seeds, test.videos) == (1, 2) and test.difference == pytest.approx(0.5)
    assert paired_test(Correctness.from_accuracies({0: 0.5}), b) is None
