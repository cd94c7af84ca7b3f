"""Frame sampling invariants: in range, ordered, eval deterministic, one frame per TSN segment."""

from __future__ import annotations

import numpy as np
import pytest

from finegrain.datasets.pipeline import ClipConfig, sample_views
from finegrain.datasets.sampling import dense_indices, tsn_indices

LENGTHS = [1, 3, 7, 8, 9, 16, 31, 64, 301]


def _valid(idx: np.ndarray, num_frames: int) -> None:
    assert idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() <= num_frames - 1
    assert (np.diff(idx, axis=-1) >= 0).all()  # ordered (non-decreasing)


@pytest.mark.parametrize("num_frames", LENGTHS)
@pytest.mark.parametrize("train", [True, False])
def test_tsn_in_range_ordered_one_per_segment(num_frames: int, train: bool) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = tsn_indices(num_frames, 8, train=train, rng=rng)
        assert idx.shape == (1, 8)
        _valid(idx, num_frames)
        if num_frames >= 8:  # exactly one frame inside each of the 8 segments
            edges = np.arange(9) * num_frames // 8  # segment i = [edges[i], edges[i + 1])
            assert ((edges[:-1] <= idx[0]) & (idx[0] < edges[1:])).all()
            assert (np.diff(idx[0]) > 0).all()


def test_tsn_eval_is_segment_centre_and_deterministic() -> None:
    np.testing.assert_array_equal(
        tsn_indices(80, 8, train=False), [[5, 15, 25, 35, 45, 55, 65, 75]]
    )
    np.testing.assert_array_equal(tsn_indices(33, 4, train=False), tsn_indices(33, 4, train=False))


def test_tsn_train_is_seedable_and_random() -> None:
    draws = [tsn_indices(64, 8, train=True, rng=np.random.default_rng(s)) for s in (1, 1, 2)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])
    with pytest.raises(ValueError, match="rng"):
        tsn_indices(64, 8, train=True)


def test_tsn_eval_multi_clip_tiles_segments() -> None:
    idx = tsn_indices(64, 4, train=False, n_clips=2)  # segments of 16: offsets 4 and 12
    np.testing.assert_array_equal(idx, [[4, 20, 36, 52], [12, 28, 44, 60]])


def test_tsn_short_video_repeats_frames() -> None:
    np.testing.assert_array_equal(tsn_indices(3, 6, train=False), [[0, 0, 1, 1, 2, 2]])


@pytest.mark.parametrize("num_frames", LENGTHS)
@pytest.mark.parametrize("stride", [1, 2, 4])
def test_dense_stride_and_range(num_frames: int, stride: int) -> None:
    rng = np.random.default_rng(0)
    span = 7 * stride + 1
    for train in (True, False):
        idx = dense_indices(num_frames, 8, stride, train=train, rng=rng, n_clips=3)
        assert idx.shape == ((1 if train else 3), 8)
        _valid(idx, num_frames)
        if num_frames >= span:  # stride respected exactly when the clip fits
            assert (np.diff(idx, axis=-1) == stride).all()
        else:  # short video: starts at 0, clamped to the last frame
            np.testing.assert_array_equal(idx[0], np.minimum(np.arange(8) * stride, num_frames - 1))


def test_dense_eval_evenly_spaced_and_deterministic() -> None:
    idx = dense_indices(100, 8, 2, train=False, n_clips=3)  # span 15, 86 valid starts
    np.testing.assert_array_equal(idx[:, 0], [14, 43, 71])
    np.testing.assert_array_equal(idx, dense_indices(100, 8, 2, train=False, n_clips=3))
    np.testing.assert_array_equal(dense_indices(100, 8, 2, train=False)[0, 0], 43)  # centred


def test_dense_train_start_covers_valid_range() -> None:
    rng = np.random.default_rng(0)
    starts = {int(dense_indices(20, 4, 3, train=True, rng=rng)[0, 0]) for _ in range(300)}
    assert starts == set(range(20 - 10 + 1))


@pytest.mark.parametrize(
    ("sampling", "n_clips", "train", "shape"),
    [("tsn", 4, False, (4, 8)), ("dense", 5, False, (5, 8)), ("tsn", 4, True, (1, 8))],
)
def test_sample_views_count(sampling: str, n_clips: int, train: bool, shape: tuple) -> None:
    cfg = ClipConfig(sampling=sampling, num_frames=8, n_clips=n_clips)  # type: ignore[arg-type]
    assert sample_views(40, cfg, train=train, rng=np.random.default_rng(0)).shape == shape


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sampling", "uniform", "sampling must be 'tsn' or 'dense'"),
        ("num_frames", 0, r"num_frames must be int in \[1, 1024\]"),
        ("stride", 0, r"stride must be int in \[1, 64\]"),
        ("crop_size", 80, r"crop_size must be int in \[8, 64\]"),
        ("n_crops", 2, "n_crops must be 1 or 3"),
        ("n_clips", 0, r"n_clips must be int"),
        ("flip", 1, "flip must be True or False"),
        ("decode_actors", 0, "decode_actors must be int"),
        ("cpus_per_actor", 0, r"cpus_per_actor must be float in \[0.05, 64.0\]"),
        ("decode_batch", 2.5, "decode_batch must be int"),
    ],
)
def test_clip_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"ClipConfig.{message}"):
        ClipConfig(**{field: value})  # type: ignore[arg-type]
