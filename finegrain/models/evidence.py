"""Maps over a feature grid scored against the synthetic benchmark's evidence boxes.

The mechanism scorers of DFB, JointAttn and the one-pass baseline share this: each turns its
diagnostics into one non-negative map per clip over a feature grid ``(T', H', W')`` (DFB: a
one-hot map at the true class's strongest filter response; JointAttn: the LSTM's attention; the
baseline: the class activation map), and asks how much of the map, and whether its peak, lies
in a box of the evaluation batch's ``evidence`` (``{"part", "object": (B, T, 4), "visible":
(B, T)}``, boxes ``(x0, y0, x1, y1)`` in the pixels of the model-input clip, NaN where none).

Geometry: the grid tiles the input clip uniformly (the convention of DFB's ``feature_stride``).
Feature cell ``(i, j)`` covers input pixels ``[j·W/W', (j+1)·W/W') × [i·H/H', (i+1)·H/H')``,
and input frame ``f`` lies in time cell ``⌊(f + ½)·T'/T⌋`` (the cell whose span holds the
frame's centre). The receptive fields are larger than the cells; the cells are what the maps
resolve. A map is read as constant over each cell (nearest upsampling to the input pixels).

Per frame that has a box (a box with a NaN coordinate, or none of its area inside the frame,
is no box) and a map of positive total mass:

- ``mass``: the share of the map's mass inside the box: Σ_cells map · overlap / Σ_cells map,
  where ``overlap`` is the share of the cell's area inside the box.
- ``hit``: the overlap of the map's peak cell (ties share: the mean overlap of the tied cells).
  For a small box this is below 1 even when the peak is on it (a box covering a quarter of a
  cell scores 0.25): it is what the grid can resolve, and its chance level is exact.
- ``chance``: the box's share of the frame's area. A map that ignores the box (uniform, or a
  peak at a uniformly random cell) scores ``mass`` = ``hit`` = ``chance`` in expectation: the
  overlaps of the cells average to the area share.

A clip's value is the mean over its scored frames; the scores are means over the clips with at
least one scored frame (NaN without any: callers leave such keys out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# (a batch's diagnostics, the labels from its first clip on) → (its maps (B, T', H', W'), the
# input clip's size (T, H, W)), or None when the diagnostics lack them
MapsOf = Callable[[dict, Tensor], tuple[Tensor, Sequence[float]] | None]


def frame_cells(frames: int, cells: int) -> Tensor:
    """``(frames,)``: the time cell of each input frame, ``⌊(f + ½)·cells/frames⌋``."""
    f = torch.arange(frames, dtype=torch.float64)
    return ((f + 0.5) * cells / frames).floor().long().clamp(0, cells - 1)


def cell_overlap(
    boxes: Tensor, grid: Sequence[int], size: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """The share of each cell's area inside each box, and each box's share of the frame.

    boxes ``(..., 4)`` ``(x0, y0, x1, y1)`` in input pixels; grid ``(H', W')``; size ``(H, W)``
    of the input frame. Returns ``overlap (..., H', W')`` and ``area (...)``, both float64 and 0
    for a box with a NaN coordinate. Boxes are clipped to the frame.
    """
    h, w = int(grid[0]), int(grid[1])
    height, width = float(size[0]), float(size[1])
    b = boxes.detach().cpu().double()
    finite = torch.isfinite(b).all(dim=-1, keepdim=True)
    b = torch.where(finite, b, torch.zeros_like(b))
    x0, x1 = b[..., 0:1].clamp(0, width), b[..., 2:3].clamp(0, width)
    y0, y1 = b[..., 1:2].clamp(0, height), b[..., 3:4].clamp(0, height)
    xs = torch.linspace(0, width, w + 1, dtype=torch.float64)
    ys = torch.linspace(0, height, h + 1, dtype=torch.float64)
    ox = (torch.minimum(x1, xs[1:]) - torch.maximum(x0, xs[:-1])).clamp(min=0) / (width / w)
    oy = (torch.minimum(y1, ys[1:]) - torch.maximum(y0, ys[:-1])).clamp(min=0) / (height / h)
    overlap = oy[..., :, None] * ox[..., None, :]
    area = ((x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)).squeeze(-1) / (height * width)
    return overlap, area


def clip_scores(maps: Tensor, boxes: Tensor, input_size: Sequence[float]) -> dict[str, Tensor]:
    """Per clip ``mass``, ``hit`` and ``chance`` (each ``(N,)`` float64, NaN for a clip without
    a scored frame) of ``maps`` ``(N, T', H', W')`` (negative values count as 0) against
    ``boxes`` ``(N, T, 4)``; ``input_size``: the input clip's ``(T, H, W)`` (its H and W are
    read; the frames are the boxes' T)."""
    n, cells, h, w = maps.shape
    if boxes.shape[0] != n or boxes.dim() != 3 or boxes.shape[2] != 4:
        raise ValueError(f"boxes {tuple(boxes.shape)} do not match maps {tuple(maps.shape)}")
    frames = boxes.shape[1]
    m = maps.detach().cpu().double().clamp(min=0)[:, frame_cells(frames, cells)]  # (N, T, h, w)
    overlap, area = cell_overlap(boxes, (h, w), input_size[-2:])  # (N, T, h, w), (N, T)
    total = m.sum(dim=(2, 3))
    scored = torch.isfinite(boxes.detach().cpu()).all(dim=-1) & (area > 0) & (total > 0)
    mass = (m * overlap).sum(dim=(2, 3)) / total.clamp(min=torch.finfo(torch.float64).tiny)
    peak = (m == m.amax(dim=(2, 3), keepdim=True)).double()
    hit = (peak * overlap).sum(dim=(2, 3)) / peak.sum(dim=(2, 3))
    frames_scored = scored.sum(dim=1)

    def per_clip(x: Tensor) -> Tensor:
        mean = torch.where(scored, x, torch.zeros_like(x)).sum(dim=1) / frames_scored.clamp(min=1)
        return torch.where(frames_scored > 0, mean, torch.full_like(mean, math.nan))

    return {"mass": per_clip(mass), "hit": per_clip(hit), "chance": per_clip(area)}


def evidence_scores(
    diagnostics: list[dict],
    evidence: list[dict | None] | None,
    labels: Tensor | None,
    box: str,
    maps_of: MapsOf,
) -> dict[str, Tensor]:
    """``clip_scores`` of every evaluated clip with ground truth, batch by batch.

    ``evidence``: the per-batch evidence dicts aligned with ``diagnostics`` (None, or a batch
    without ``box``: no ground truth for its clips); ``labels`` (N,): every clip's true class,
    in the same order (None for maps that need no label; ``maps_of`` then gets an empty
    tensor); ``maps_of(diagnostics, labels)``: the batch's maps and its input size, or None
    when the diagnostics lack them (``labels``: from the batch's first clip on). Returns the
    per-clip values of the clips with a scored frame, concatenated (``{}`` when there is none,
    or when the batches no longer line up with the evidence or the ``labels``).
    """
    if not evidence or len(evidence) != len(diagnostics):
        return {}
    aligned = labels is not None
    labels = torch.as_tensor([] if labels is None else labels).reshape(-1).long().cpu()
    parts: dict[str, list[Tensor]] = {}
    offset = 0
    for d, ev in zip(diagnostics, evidence):
        got = maps_of(d, labels[offset:] if aligned else labels) if isinstance(d, dict) else None
        if got is None:
            return {}  # the clips of later batches would no longer line up with the labels
        maps, input_size = got
        offset += maps.shape[0]
        boxes = ev.get(box) if isinstance(ev, dict) else None
        if boxes is None or maps.shape[0] == 0:
            continue
        boxes = torch.as_tensor(boxes)
        if boxes.dim() != 3 or boxes.shape[0] != maps.shape[0]:
            return {}
        scores = clip_scores(maps, boxes, input_size)
        keep = torch.isfinite(scores["chance"])
        for k, v in scores.items():
            parts.setdefault(k, []).append(v[keep])
    if aligned and offset != labels.numel():
        return {}
    out = {k: torch.cat(v) for k, v in parts.items()}
    return out if out and out["chance"].numel() else {}


def summary(per_clip: dict[str, Tensor], prefix: str, keys: Sequence[str]) -> dict[str, float]:
    """``{prefix}_{key}`` (the mean over clips) of each of ``keys``, ``{prefix}_chance`` and
    ``{prefix}_lift``: the first key's mean minus the chance's (``{}`` without clips)."""
    if not per_clip or not per_clip["chance"].numel():
        return {}
    out = {f"{prefix}_{k}": float(per_clip[k].mean()) for k in keys}
    out[f"{prefix}_chance"] = float(per_clip["chance"].mean())
    out[f"{prefix}_lift"] = out[f"{prefix}_{keys[0]}"] - out[f"{prefix}_chance"]
    return out


def one_hot_maps(cells: Tensor, grid: Sequence[int]) -> Tensor:
    """``(N, T', H', W')`` maps, 1 at each clip's cell ``cells`` ``(N, 3)`` (t, h, w), 0
    elsewhere; a row with a coordinate outside the grid gives an all-zero map (not scored)."""
    t, h, w = (int(g) for g in grid)
    cells = torch.as_tensor(cells).long().reshape(-1, 3)
    maps = torch.zeros(cells.shape[0], t, h, w, dtype=torch.float64)
    inside = ((cells >= 0) & (cells < torch.tensor([t, h, w]))).all(dim=1)
    rows = torch.nonzero(inside).reshape(-1)
    c = cells[rows]
    maps[rows, c[:, 0], c[:, 1], c[:, 2]] = 1.0
    return maps


def input_size_of(diagnostics: dict) -> tuple[float, float, float] | None:
    """The ``input_size`` diagnostic ``(T, H, W)`` of the model-input clip, or None."""
    size = diagnostics.get("input_size")
    if size is None:
        return None
    size = torch.as_tensor(size).detach().cpu().double().reshape(-1)
    return tuple(float(s) for s in size[:3]) if size.numel() >= 3 else None


def lift_words(scores: dict, prefix: str, key: str, box: str, subject: str) -> str:
    """The verdict on ``{prefix}_{key}`` beside ``{prefix}_chance`` ({key: (mean, CI low, CI
    high)} over seeds): holds when the 95 % interval of ``{prefix}_lift`` lies above 0."""
    if f"{prefix}_lift" not in scores or f"{prefix}_{key}" not in scores:
        # the variant has no such mechanism (DFB without filters) or the data no evidence boxes
        return "not scored (its runs logged no evidence scores)"
    value = scores[f"{prefix}_{key}"][0]
    chance = scores.get(f"{prefix}_chance", (math.nan,) * 3)[0]
    lift, lo, hi = scores[f"{prefix}_lift"]
    return (
        f"{'holds' if lo > 0 else 'not shown'}: {subject} {100 * value:.0f} % in the {box} box "
        f"vs {100 * chance:.0f} % by chance (the box's share of the frame), lift "
        f"{100 * lift:+.0f} points (95 % CI [{100 * lo:+.0f}, {100 * hi:+.0f}])"
    )
