"""Clip transforms: short-side resize, crops, horizontal flip with a class-aware label swap.

A clip is a ``uint8`` array ``(T, H, W, 3)`` (decord's layout); every transform acts on all ``T``
frames at once, so each frame of a clip gets the same crop and flip.

Resize is ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)`` on the
channels-last view of the clip: the fast uint8 kernel that
``torchvision.transforms.v2.functional.resize`` calls, bit for bit (tests/test_transforms.py),
without importing torchvision. Crop and flip are numpy slices: views, no copy (the decoder copies
each view once, into its output batch). This is the "documented faster equivalent" of
torchvision's crop/flip, which do the same slicing but need torch. Torch is imported only when a
clip actually needs resizing: a decode actor's first batch waits for that import, so every run
waits for it before its first step (measured on 2 cores: torch 2.2 s, torchvision another 2.2 s,
idle), and data already stored at the training resolution never pays it.

Flip and labels (as for Something-Something-v2, Goyal et al. 2017): mirroring a video of
"Moving something from left to right" shows "Moving something from right to left". The swap map
pairs every class whose name contains the words ``left``/``right`` with the class named with
those words exchanged. A class that names a direction but has no mirrored counterpart cannot be
flipped without lying about its label, so its clips are never flipped (``unflippable_classes``).
Other mirror-asymmetric cues (clockwise rotation, handedness) are not in the map; that is one
reason flip is off by default for SSv2 and the synthetic benchmark (``default_flip``).

Boxes: :func:`view_geometry` draws a clip's views (resize, crop box, flip) once;
:meth:`ViewGeometry.apply` cuts the pixels and :meth:`ViewGeometry.transform_boxes` carries
boxes drawn on the source frames (the synthetic benchmark's ground truth) into the view's pixel
coordinates, with the same numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "center_crop_box",
    "clip_views",
    "crop",
    "ViewGeometry",
    "view_geometry",
    "default_flip",
    "flip_swap_map",
    "hflip",
    "random_crop_box",
    "resize_short_side",
    "short_side_size",
    "three_crop_boxes",
    "unflippable_classes",
]

Box = tuple[int, int]  # (top, left) of a square crop

# flip on by default for datasets whose labels do not depend on left/right (UCF101, HMDB51,
# Kinetics, Diving48); off where they do (SSv2 and the synthetic benchmark in its layout)
_FLIP_DEFAULT = {
    "ssv2": False,
    "synthetic": False,
    "diving48": True,
    "ucf101": True,
    "hmdb51": True,
    "kinetics": True,
}
_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def default_flip(dataset: str) -> bool:
    """Whether horizontal flip is on by default for ``dataset`` (off for SSv2 / synthetic)."""
    key = dataset.lower().replace("-", "").replace("_", "")
    if key not in _FLIP_DEFAULT:
        raise ValueError(f"dataset must be one of {sorted(_FLIP_DEFAULT)}, got {dataset!r}")
    return _FLIP_DEFAULT[key]


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (H, W) of a short-side resize to ``size`` (torchvision's rounding)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_short_side(clip: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased resize of ``(T, H, W, 3)`` so that ``min(H, W) == size``."""
    height, width = clip.shape[1:3]
    if min(height, width) == size:
        return clip
    import torch  # only when needed: see the module docstring
    from torch.nn.functional import interpolate

    # (T, H, W, 3) -> (T, 3, H, W) is a channels-last view: the layout of the fast uint8 kernel
    frames = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2)
    size_hw = short_side_size(height, width, size)
    out = interpolate(frames, size=size_hw, mode="bilinear", antialias=True, align_corners=False)
    return out.permute(0, 2, 3, 1).numpy()


def random_crop_box(height: int, width: int, size: int, rng: np.random.Generator) -> Box:
    """Uniform random ``size`` x ``size`` crop inside ``height`` x ``width``."""
    _check_fits(height, width, size)
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def center_crop_box(height: int, width: int, size: int) -> Box:
    """The centred ``size`` x ``size`` crop."""
    _check_fits(height, width, size)
    return (height - size) // 2, (width - size) // 2


def three_crop_boxes(height: int, width: int, size: int) -> list[Box]:
    """Three crops along the long side: start, centre, end (left/centre/right when wide)."""
    _check_fits(height, width, size)
    top, left = center_crop_box(height, width, size)
    if width >= height:
        return [(top, 0), (top, left), (top, width - size)]
    return [(0, left), (top, left), (height - size, left)]


def _check_fits(height: int, width: int, size: int) -> None:
    if not 0 < size <= min(height, width):
        raise ValueError(f"crop size {size} does not fit in a {height}x{width} frame")


def crop(clip: np.ndarray, box: Box, size: int) -> np.ndarray:
    """Square crop of ``(T, H, W, 3)`` at ``box = (top, left)`` (a view)."""
    top, left = box
    return clip[:, top : top + size, left : left + size]


def hflip(clip: np.ndarray) -> np.ndarray:
    """Mirror ``(T, H, W, 3)`` left-right (a view)."""
    return clip[:, :, ::-1]


@dataclass(frozen=True)
class ViewGeometry:
    """Where one spatial view comes from: frames of ``height`` x ``width`` resized to
    ``resized`` (H, W), the ``size`` x ``size`` crop at ``box`` (top, left) of the resized
    frames, mirrored when ``flipped``. The same numbers transform the pixels (:meth:`apply`) and
    boxes drawn on the frames (:meth:`transform_boxes`)."""

    height: int
    width: int
    resized: tuple[int, int]
    box: Box
    size: int
    flipped: bool

    def apply(self, resized: np.ndarray) -> np.ndarray:
        """The view of ``(T, *self.resized, 3)`` (the resized clip): crop, then mirror (views)."""
        view = crop(resized, self.box, self.size)
        return hflip(view) if self.flipped else view

    def transform_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes ``(..., 4)`` ``(x0, y0, x1, y1)`` in the source frames' pixel coordinates
        (x right, y down, right/bottom edges exclusive) -> float32 boxes in the view's: scaled
        as the resize scales (pixel edges map to pixel edges), shifted by the crop, mirrored
        (``x -> size - x``, x0 and x1 swapped) when flipped, clipped to ``[0, size]``. NaN
        where the box is NaN (none) or nothing of it is inside the crop."""
        b = np.asarray(boxes, np.float64)
        top, left = self.box
        sy, sx = self.resized[0] / self.height, self.resized[1] / self.width
        if self.flipped:  # x0' = size - (x1 * sx - left), x1' = size - (x0 * sx - left)
            b = b[..., [2, 1, 0, 3]]
            scale, shift = (-sx, sy, -sx, sy), (self.size + left, -top, self.size + left, -top)
        else:
            scale, shift = (sx, sy, sx, sy), (-left, -top, -left, -top)
        out = np.clip(b * scale + shift, 0, self.size)
        empty = ~((out[..., 2] > out[..., 0]) & (out[..., 3] > out[..., 1]))  # NaN: empty
        out[empty] = np.nan
        return out.astype(np.float32)


def view_geometry(
    height: int,
    width: int,
    *,
    short_side: int,
    crop_size: int,
    train: bool,
    n_crops: int = 1,
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> list[ViewGeometry]:
    """The spatial views of a clip of ``height`` x ``width`` frames (see :func:`clip_views`),
    drawing from ``rng`` exactly what :func:`clip_views` draws."""
    if n_crops not in (1, 3):
        raise ValueError(f"n_crops must be 1 or 3, got {n_crops}")
    resized = short_side_size(height, width, short_side)  # (height, width) when already there
    h, w = resized
    if train:
        if rng is None:
            raise ValueError("clip_views(train=True) needs rng (a numpy Generator)")
        box = random_crop_box(h, w, crop_size, rng)
        flipped = bool(flip and rng.random() < 0.5)
        return [ViewGeometry(height, width, resized, box, crop_size, flipped)]
    if n_crops == 3:
        boxes = three_crop_boxes(h, w, crop_size)
    else:
        boxes = [center_crop_box(h, w, crop_size)]
    return [ViewGeometry(height, width, resized, box, crop_size, False) for box in boxes]


def clip_views(
    frames: np.ndarray,
    *,
    short_side: int,
    crop_size: int,
    train: bool,
    n_crops: int = 1,
    flip: bool = False,
    rng: np.random.Generator | None = None,
    geometry: list[ViewGeometry] | None = None,
) -> list[tuple[np.ndarray, bool]]:
    """Spatial views of one clip ``(T, H, W, 3)`` uint8 -> ``[(view (T, S, S, 3), flipped)]``.

    Train: resize, one random crop, and (``flip``) a mirror with probability 1/2; the caller
    swaps the label of a flipped view (``flip_swap_map``). Eval: resize, then the centre crop
    (``n_crops = 1``) or three crops along the long side (``n_crops = 3``); never flipped.
    The views may share memory with ``frames``. ``geometry``: the views'
    :class:`ViewGeometry` from :func:`view_geometry` for these frames and options (drawn from
    ``rng`` already), e.g. to transform boxes with the same numbers; else drawn here.
    """
    if geometry is None:
        height, width = frames.shape[1:3]
        geometry = view_geometry(
            height, width, short_side=short_side, crop_size=crop_size, train=train,
            n_crops=n_crops, flip=flip, rng=rng,
        )  # fmt: skip
    clip = resize_short_side(frames, short_side)
    return [(g.apply(clip), g.flipped) for g in geometry]


def _names(class_names: Sequence[str] | Mapping[int | str, str]) -> dict[int, str]:
    if isinstance(class_names, Mapping):
        return {int(k): v for k, v in class_names.items()}
    return dict(enumerate(class_names))


def _mirror(name: str) -> str:
    def swap(m: re.Match[str]) -> str:
        word = "right" if m.group(0).lower() == "left" else "left"
        return word.capitalize() if m.group(0)[0].isupper() else word

    return _SIDE.sub(swap, name)


def _key(name: str) -> str:
    return " ".join(name.casefold().split())


def flip_swap_map(class_names: Sequence[str] | Mapping[int | str, str]) -> dict[int, int]:
    """``{label: mirrored label}`` for the classes whose names differ only by left <-> right.

    ``class_names`` is a list (index = label) or a ``classes.json``-style mapping. The map is
    symmetric; labels not in it keep their label when flipped. Names match case- and
    whitespace-insensitively ("Moving something from left to right" <-> "... right to left").
    """
    names = _names(class_names)
    by_key = {_key(name): label for label, name in names.items()}
    swap = {}
    for label, name in names.items():
        if _SIDE.search(name):
            other = by_key.get(_key(_mirror(name)))
            if other is not None and other != label:
                swap[label] = other
    return swap


def unflippable_classes(class_names: Sequence[str] | Mapping[int | str, str]) -> frozenset[int]:
    """Labels whose name says left or right but whose mirrored class does not exist."""
    names = _names(class_names)
    swap = flip_swap_map(names)
    return frozenset(lbl for lbl, name in names.items() if _SIDE.search(name) and lbl not in swap)
