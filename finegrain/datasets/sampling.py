"""Frame-index sampling: TSN segments and dense clips (pure numpy).

TSN (Wang et al., "Temporal Segment Networks", ECCV 2016): split the ``N`` frames into ``T``
equal segments ``[e_i, e_{i+1})`` with ``e_i = floor(i N / T)`` and take one frame per segment;
training draws a uniformly random frame of each segment, evaluation takes the segment centre.

Dense (the I3D / SlowFast protocol): ``T`` frames ``s, s + r, ..., s + (T - 1) r`` at stride
``r``; training draws the start ``s`` uniformly over the valid starts ``[0, N - span]`` with
``span = (T - 1) r + 1``, evaluation takes ``n_clips`` evenly spaced starts (the centres of
``n_clips`` equal parts of the valid range).

Short videos: indices never leave ``[0, N - 1]`` and always stay in non-decreasing order.
With TSN and ``N < T`` some segments are empty; they reuse the frame at their start, so frames
repeat (e.g. ``N = 3, T = 6 -> 0 0 1 1 2 2``). With dense clips and ``N < span`` the clip starts
at frame 0 and indices past the end are clamped to the last frame (the "repeat last frame"
policy; looping would break the temporal order that fine-grained classes depend on).

Every function returns an ``int64`` array of shape ``(n_clips, T)``; training always returns
one clip. Training needs a ``numpy.random.Generator`` (seed it for reproducible draws).
"""

from __future__ import annotations

import numpy as np

__all__ = ["dense_indices", "tsn_indices"]


def _check(num_frames: int, clip_len: int, n_clips: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if clip_len < 1:
        raise ValueError(f"clip_len must be >= 1, got {clip_len}")
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips}")


def tsn_indices(
    num_frames: int,
    num_segments: int,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    n_clips: int = 1,
) -> np.ndarray:
    """TSN segment sampling: one frame per segment, ``(n_clips, num_segments)`` int64.

    Train: a uniform random frame inside each segment (``n_clips`` is ignored: one clip).
    Eval: clip ``k`` takes the frame at relative position ``(k + 1/2) / n_clips`` of every
    segment, so ``n_clips = 1`` is the segment centre and more clips tile each segment evenly.
    """
    _check(num_frames, num_segments, n_clips)
    edges = np.arange(num_segments + 1, dtype=np.int64) * num_frames // num_segments
    start, length = edges[:-1], np.diff(edges)
    if train:
        if rng is None:
            raise ValueError("tsn_indices(train=True) needs rng (a numpy Generator)")
        # integers(0, max(len, 1)) draws 0 for empty segments (short videos, see module doc)
        offsets = rng.integers(0, np.maximum(length, 1))[None, :]
    else:
        rel = (np.arange(n_clips)[:, None] + 0.5) / n_clips
        offsets = np.floor(rel * length[None, :]).astype(np.int64)
    return np.minimum(start[None, :] + offsets, num_frames - 1).astype(np.int64)


def dense_indices(
    num_frames: int,
    clip_len: int,
    stride: int,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    n_clips: int = 1,
) -> np.ndarray:
    """Dense clips of ``clip_len`` frames at ``stride``: ``(n_clips, clip_len)`` int64.

    Train: one clip with a uniform random start in ``[0, N - span]``.
    Eval: ``n_clips`` starts ``floor((N - span + 1) (2k + 1) / (2 n_clips))``, i.e. the centres
    of ``n_clips`` equal parts of the valid start range (one clip -> the centred clip).
    """
    _check(num_frames, clip_len, n_clips)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    span = (clip_len - 1) * stride + 1
    n_starts = max(num_frames - span + 1, 1)  # a short video has the single start 0
    if train:
        if rng is None:
            raise ValueError("dense_indices(train=True) needs rng (a numpy Generator)")
        starts = rng.integers(0, n_starts, size=1)
    else:
        starts = (n_starts * (2 * np.arange(n_clips) + 1)) // (2 * n_clips)
    idx = starts[:, None] + stride * np.arange(clip_len)[None, :]
    return np.minimum(idx, num_frames - 1).astype(np.int64)
