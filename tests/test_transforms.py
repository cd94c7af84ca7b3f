"""Clip transforms: shapes, one crop for all frames, flip mirrors pixels and swaps left/right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finegrain.datasets.pipeline import to_model_input
from finegrain.datasets.transforms import (
    clip_views,
    default_flip,
    flip_swap_map,
    hflip,
    resize_short_side,
    short_side_size,
    three_crop_boxes,
    unflippable_classes,
)

SSV2_LIKE = [
    "Moving something from left to right",  # 0 <-> 1
    "Moving something from right to left",
    "Pushing something from Left to Right",  # 2 <-> 3 (case-insensitive match)
    "Pushing something from right to left",
    "Turning the camera left while filming something",  # 4 <-> 5
    "Turning the camera right while filming something",
    "Holding something next to something",  # 6: no direction
    "Moving something to the left",  # 7: direction without a mirrored class
    "Bright flash",  # 8: 'right' only inside a word
]


def _ramp_clip(t: int = 4, h: int = 24, w: int = 40) -> np.ndarray:
    """(T, H, W, 3) uint8 whose frame k is frame 0 plus k: crops must keep that offset."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, size=(1, h, w, 3))
    return (base + np.arange(t)[:, None, None, None]).astype(np.uint8)


def test_flip_swap_map_swaps_exactly_left_right_pairs() -> None:
    swap = flip_swap_map(SSV2_LIKE)
    assert swap == {0: 1, 1: 0, 2: 3, 3: 2, 4: 5, 5: 4}
    assert unflippable_classes(SSV2_LIKE) == {7}
    as_json = {str(i): n for i, n in enumerate(SSV2_LIKE)}  # classes.json form
    assert flip_swap_map(as_json) == swap


def test_default_flip_off_for_ssv2_on_for_others() -> None:
    assert default_flip("ssv2") is False and default_flip("synthetic") is False
    assert all(default_flip(d) for d in ("diving48", "ucf101", "hmdb51", "kinetics"))
    with pytest.raises(ValueError, match="dataset must be one of"):
        default_flip("imagenet")


def test_hflip_reverses_pixels() -> None:
    clip = _ramp_clip()
    flipped = hflip(clip)
    assert flipped.shape == clip.shape
    for x in range(clip.shape[2]):
        np.testing.assert_array_equal(flipped[:, :, x], clip[:, :, -1 - x])


def test_resize_short_side_matches_torchvision() -> None:
    from torchvision.transforms.v2 import functional as F

    clip = _ramp_clip(h=24, w=40)
    out = resize_short_side(clip, 12)
    assert out.shape == (4, 12, 20, 3) and out.dtype == np.uint8
    assert short_side_size(24, 40, 12) == (12, 20) and short_side_size(40, 24, 12) == (20, 12)
    chw = torch.from_numpy(clip).permute(0, 3, 1, 2)
    expect = F.resize(chw, [12], antialias=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out, expect)
    assert resize_short_side(clip, 24) is clip  # already the right size: untouched


@pytest.mark.parametrize(("h", "w", "size"), [(64, 64, 56), (240, 320, 128), (100, 60, 37)])
def test_resize_short_side_is_torchvisions_resize_bit_for_bit(h: int, w: int, size: int) -> None:
    """The decoder resizes with torch alone (no torchvision import on its first batch): the
    same kernel as torchvision's antialiased resize, to the bit, on noise (every rounding)."""
    from torchvision.transforms.v2 import functional as F

    clip = np.random.default_rng(h * w).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    chw = torch.from_numpy(clip).permute(0, 3, 1, 2)
    expect = F.resize(chw, [size], antialias=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(resize_short_side(clip, size), expect)


@pytest.mark.parametrize("train", [True, False])
def test_same_crop_for_every_frame(train: bool) -> None:
    clip = _ramp_clip()
    for seed in range(10):
        views = clip_views(
            clip, short_side=24, crop_size=16, train=train, rng=np.random.default_rng(seed)
        )
        for view, _ in views:
            assert view.shape == (4, 16, 16, 3) and view.dtype == np.uint8
            diff = view.astype(int) - view[:1].astype(int)
            assert (diff == np.arange(4).reshape(4, 1, 1, 1)).all()


def test_identical_frames_stay_identical_through_resize() -> None:
    clip = np.repeat(_ramp_clip(t=1, h=30, w=50), 5, axis=0)
    (view, _), *_ = clip_views(
        clip, short_side=20, crop_size=16, train=True, rng=np.random.default_rng(0)
    )
    assert view.shape == (5, 16, 16, 3)
    assert (view == view[:1]).all()


def test_eval_three_crops_along_long_side() -> None:
    assert three_crop_boxes(24, 40, 16) == [(4, 0), (4, 12), (4, 24)]
    assert three_crop_boxes(40, 24, 16) == [(0, 4), (12, 4), (24, 4)]
    clip = _ramp_clip()
    views = clip_views(clip, short_side=24, crop_size=16, train=False, n_crops=3, flip=True)
    assert [flipped for _, flipped in views] == [False] * 3  # eval never flips
    for (view, _), (top, left) in zip(views, three_crop_boxes(24, 40, 16)):
        np.testing.assert_array_equal(view, clip[:, top : top + 16, left : left + 16])


def test_train_flip_mirrors_the_same_crop() -> None:
    clip = _ramp_clip()
    flips = set()
    for seed in range(20):
        kw = dict(short_side=24, crop_size=16, train=True)
        ((plain, _),) = clip_views(clip, flip=False, rng=np.random.default_rng(seed), **kw)
        ((view, flipped),) = clip_views(clip, flip=True, rng=np.random.default_rng(seed), **kw)
        np.testing.assert_array_equal(view, plain[:, :, ::-1] if flipped else plain)
        flips.add(flipped)
    assert flips == {True, False}


def test_to_model_input_layout_and_values() -> None:
    clips = torch.randint(0, 256, (2, 4, 8, 8, 3), dtype=torch.uint8)
    x = to_model_input(clips, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    assert x.shape == (2, 3, 4, 8, 8) and x.dtype == torch.float32
    expect = (clips.permute(0, 4, 1, 2, 3).float() / 255 - 0.5) / torch.tensor(
        [0.5, 0.25, 1.0]
    ).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(x, expect)
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(clips.float(), (0.5,) * 3, (0.5,) * 3)
