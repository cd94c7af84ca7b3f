"""U2S's diagnostics pictures: the category similarity matrix (which classes U2S treats as
confusable) and, for a few clips, the masks on the CSN's features."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from finegrain.platform.figures import (
    MAX_SAMPLES,
    SUBTLETY_COLOURS,
    TEXT_PT,
    _clip_rows,
    _colorbar,
    _columns,
    _footer,
    _frames,
    _heatmap_figure,
    _heatmap_layout,
    _heatmap_ticks,
    _ints,
    _labels,
    _name,
    _np,
    _overlay,
    _span,
    _title,
)


def draw(diagnostics, sample, names, class_groups) -> dict:
    """The CSM (similarity S in colour, confusers C = 1 marked) and a few clips' masks.

    Empty in stage 1 (UN-only mode: no CSM yet, no diagnostics).
    """
    figs = {}
    if diagnostics.get("csm_similarity") is not None or diagnostics.get("csm") is not None:
        figs["u2s_csm"] = _u2s_csm(diagnostics, names, class_groups)
    if diagnostics.get("mask") is not None:
        fig = _u2s_masks(diagnostics, sample, names)
        if fig is not None:
            figs["u2s_masks"] = fig
    return figs


def _u2s_csm(diagnostics, names, class_groups):
    s, c = diagnostics.get("csm_similarity"), diagnostics.get("csm")
    c = None if c is None else _np(c)
    heat = _np(s) if s is not None else c
    k = heat.shape[0]
    labels, cell = _heatmap_layout(k, names, 0.2, 44)
    fig, ax = _heatmap_figure(k, labels, cell)
    off = heat[~np.eye(k, dtype=bool)]
    # S of trained models often lies in a narrow band near 1: start the colours at its minimum.
    vmin = min(max(math.floor(float(off.min()) * 10) / 10, 0.0), 0.9) if off.size else 0.0
    im = ax.imshow(heat, cmap="viridis", vmin=vmin, vmax=1)
    label = "similarity S (cosine of sparsity)" if s is not None else "confuser C"
    fig.colorbar(im, ax=ax, fraction=0.04, label=label)
    if c is not None and s is not None:
        i, j = np.nonzero((c > 0.5) & ~np.eye(k, dtype=bool))
        ax.scatter(j, i, marker="x", color="red", s=(0.35 * cell * 72) ** 2, linewidths=1)
    _heatmap_ticks(ax, k, labels, cell)
    coloured = bool(class_groups) and labels is not None and len(names) >= k
    if coloured:
        _colour_ticks(ax.get_xticklabels(), names, class_groups)
        _colour_ticks(ax.get_yticklabels(), names, class_groups)
    mc = diagnostics.get("mean_confusers")
    if mc is not None:
        mean = float(_np(mc).reshape(-1)[0])
    elif c is not None:
        mean = float(((c > 0.5).sum() - np.trace(c > 0.5)) / k)
    else:
        mean = float("nan")
    _title(fig, f"Which classes U2S treats as confusable ({mean:.2f} confusers per class)")
    caption = "Category similarity matrix (CSM) of the classes: "
    if s is not None:
        caption += "colour: similarity S of two classes (cosine of their feature sparsity)"
        caption += "; ×: confuser pair, C = 1 (masked for each other)." if c is not None else "."
    else:
        caption += "colour: C = 1 where the column class is a confuser of the row class."
    if coloured:
        caption += " Names in blue: spatial-subtle, orange: temporal-subtle classes."
    if labels is None:
        caption += " Class indices as in eval/per_class_accuracy.csv."
    _footer(fig, caption)
    return fig


def _u2s_masks(diagnostics, sample, names):
    mask = _np(diagnostics["mask"])  # (B, T, H, W), sigmoid in (0, 1)
    if mask.ndim != 4 or mask.shape[0] == 0:
        return None
    frames = _frames(sample)
    labels = _labels(sample)
    cls = diagnostics.get("mask_class")
    cls = None if cls is None else _ints(cls).reshape(-1)
    b = min(MAX_SAMPLES, mask.shape[0], len(frames) if frames is not None else MAX_SAMPLES)
    cells = mask.shape[1]
    cols = _columns(cells)
    headings = []
    for r in range(b):
        true = _name(names, int(labels[r])) if labels is not None and r < len(labels) else "?"
        chosen = _name(names, int(cls[r])) if cls is not None and r < len(cls) else "?"
        headings.append(f"clip {r + 1} · true class: {true}\nmasked for the confusers of: {chosen}")
    fig, axes = _clip_rows(headings, len(cols), extra=1.2)
    for r in range(b):
        for col, t in enumerate(cols):
            ax = axes[r, col]
            frame = None
            title = f"mask step {t}"
            if frames is not None:
                start, stop = _span(t, frames.shape[1] / cells, frames.shape[1])
                frame = frames[r, (start + stop - 1) // 2]
                title = f"frames {start}–{stop - 1}"
            _overlay(ax, frame, mask[r, t], 0.0, 1.0)
            ax.set_title(title, fontsize=TEXT_PT)
    _colorbar(fig, axes, 0.0, 1.0, "mask (sigmoid)")
    _title(fig, "Where U2S masks the features of the predicted class's confusers")
    _footer(
        fig,
        "Mask (sigmoid, 1 = kept) on the CSN features at each time step, stretched over the "
        "middle frame of the step's frames; computed for the confusers (C = 1 in the CSM) of the "
        "class the UN branch predicts.",
    )
    return fig


def _colour_ticks(labels, names: Sequence[str], class_groups: dict) -> None:
    for lbl, name in zip(labels, names):
        kind = class_groups.get(name, {}).get("subtlety")
        if kind in SUBTLETY_COLOURS:
            lbl.set_color(SUBTLETY_COLOURS[kind])
