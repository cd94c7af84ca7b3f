"""DFB's diagnostics pictures: where the true class's and the strongest class's discriminative
filters respond most, as boxes on the frames of the time cell that holds the maximum."""

from __future__ import annotations

from collections import Counter

import matplotlib.patheffects as pe
from matplotlib.patches import Rectangle

from finegrain.platform.figures import (
    MAX_SAMPLES,
    TEXT_PT,
    _clip_rows,
    _columns,
    _footer,
    _frames,
    _ints,
    _labels,
    _name,
    _np,
    _outline,
    _span,
    _title,
)

TRUE_BOX, STRONGEST_BOX = "magenta", "cyan"  # DFB boxes, outlined in black: rare in videos
BOX_OUTLINE = [pe.Stroke(linewidth=4, foreground="black"), pe.Normal()]


def draw(diagnostics, sample, names, class_groups) -> dict:
    """Boxes where the true class's (magenta) and the strongest class's (cyan, dashed) filters
    respond most, on the frames of the time cell that holds the maximum.

    A box is the feature cell ``[coord·stride, (coord + 1)·stride)`` in input pixels / frames
    (the receptive field is larger); "strongest" is the class with the largest max response.
    """
    thw, stride = diagnostics.get("max_response_thw"), diagnostics.get("feature_stride")
    frames = _frames(sample)
    if thw is None or stride is None or frames is None:
        return {}
    thw = _ints(thw)  # (B, K, 3)
    stride = _np(stride).astype(float).reshape(-1)
    value = diagnostics.get("max_response_value")
    value = None if value is None else _np(value)
    labels = _labels(sample)
    b = min(MAX_SAMPLES, len(frames), thw.shape[0])
    if b == 0 or thw.ndim != 3 or len(stride) != 3:
        return {}
    num_frames, height, width = frames.shape[1:4]
    cells = max(1, round(num_frames / stride[0]))
    per_row = []
    for r in range(b):
        boxes = []  # (class, colour, linestyle, role)
        true = int(labels[r]) if labels is not None and r < len(labels) else -1
        strongest = int(value[r].argmax()) if value is not None else -1
        if 0 <= true < thw.shape[1]:
            boxes.append((true, TRUE_BOX, "-", "true"))
        if 0 <= strongest < thw.shape[1] and strongest != true:
            boxes.append((strongest, STRONGEST_BOX, "--", "strongest"))
        per_row.append(boxes)
    columns = [_columns(cells, [int(thw[r, k, 0]) for k, *_ in per_row[r]]) for r in range(b)]
    ncols = max(len(c) for c in columns)
    headings = [
        f"clip {r + 1}\n"
        + "\n".join(
            f"{'true class' if role == 'true' else 'strongest other class'}: {_name(names, k)}"
            for k, _, _, role in boxes
        )
        if boxes
        else f"clip {r + 1}: true class unknown"
        for r, boxes in enumerate(per_row)
    ]
    # a panel's title: its frames, then a line per box in it (with values)
    per_cell = [Counter(int(thw[r, k, 0]) for k, *_ in boxes) for r, boxes in enumerate(per_row)]
    stacked = max(max(c.values(), default=0) for c in per_cell) if value is not None else 0
    fig, axes = _clip_rows(headings, ncols, title_lines=1 + stacked)
    for r, cols in enumerate(columns):
        for col in range(ncols):
            ax = axes[r, col]
            if col >= len(cols):
                ax.set_visible(False)
                continue
            start, stop = _span(cols[col], stride[0], num_frames)
            ax.imshow(frames[r, (start + stop - 1) // 2])
            ax.set_xticks([])
            ax.set_yticks([])
            notes = []
            for k, colour, style, role in per_row[r]:
                t, h, w = thw[r, k]
                if t != cols[col]:
                    continue
                ax.add_patch(
                    Rectangle(
                        (w * stride[2] - 0.5, h * stride[1] - 0.5),
                        stride[2],
                        stride[1],
                        fill=False,
                        edgecolor=colour,
                        linestyle=style,
                        linewidth=2,
                        path_effects=BOX_OUTLINE,
                    )
                )
                if value is not None:
                    notes.append(f"{role} {value[r, k]:.2f}")
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
            ax.set_title("\n".join([f"frames {start}–{stop - 1}", *notes]), fontsize=TEXT_PT)
    roles = {role for boxes in per_row for *_, role in boxes}
    handles = [
        _outline(label, colour, style, BOX_OUTLINE)
        for role, label, colour, style in (
            ("true", "true class", TRUE_BOX, "-"),
            ("strongest", "strongest other class", STRONGEST_BOX, "--"),
        )
        if role in roles
    ]
    _title(fig, "Where the DFB filters of the true and the strongest class respond most")
    _footer(
        fig,
        f"Box: the feature cell ({stride[0]:g} frames × {stride[1]:g} × {stride[2]:g} pixels) "
        "holding a class's maximum filter response, on the middle frame of its time cell; the "
        "receptive field is larger. Strongest class: the class with the largest maximum "
        "response; numbers: maximum responses.",
        handles,
    )
    return {"dfb_max_response": fig}
