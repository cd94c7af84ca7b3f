"""JointAttn's diagnostics picture: the LSTM's soft attention over the frames, step by step."""

from __future__ import annotations

from finegrain.platform.figures import (
    MAX_SAMPLES,
    TEXT_PT,
    _clip_rows,
    _colorbar,
    _columns,
    _footer,
    _frames,
    _labels,
    _name,
    _np,
    _overlay,
    _span,
    _title,
)


def draw(diagnostics, sample, names, class_groups) -> dict:
    """The LSTM's soft attention ``(B, T, K, K)`` per time step, upsampled over the frame of
    that step (LSTM steps spread evenly over the clip's frames)."""
    att = diagnostics.get("attention")
    if att is None:
        return {}
    att = _np(att)
    if att.ndim != 4 or att.shape[0] == 0 or att.shape[1] == 0:
        return {}
    frames = _frames(sample)
    labels = _labels(sample)
    b = min(MAX_SAMPLES, att.shape[0], len(frames) if frames is not None else MAX_SAMPLES)
    steps, grid = att.shape[1], att.shape[2]
    cols = _columns(steps)
    headings = [
        f"clip {r + 1} · true class: "
        + (_name(names, int(labels[r])) if labels is not None and r < len(labels) else "?")
        for r in range(b)
    ]
    fig, axes = _clip_rows(headings, len(cols), extra=1.4)
    # At least twice the uniform weight: flat attention stays mid-scale, not all red.
    vmax = max(float(att[:b, cols].max()), 2.0 / grid**2)
    for r in range(b):
        for col, t in enumerate(cols):
            ax = axes[r, col]
            frame, title = None, f"step {t}"
            if frames is not None:
                start, stop = _span(t, frames.shape[1] / steps, frames.shape[1])
                f = (start + stop - 1) // 2
                frame, title = frames[r, f], f"step {t} · frame {f}"
            _overlay(ax, frame, att[r, t], 0.0, vmax)
            ax.set_title(title, fontsize=TEXT_PT)
    _colorbar(fig, axes, 0.0, vmax, f"attention (uniform = {1 / grid**2:.3f})")
    _title(fig, "Where the JointAttn LSTM looks at each step")
    _footer(
        fig,
        f"Soft attention over the {grid} × {grid} feature grid at each LSTM step, stretched over "
        "the middle frame of the step's frames (steps spread evenly over the clip); weights sum "
        "to 1 over the grid.",
    )
    return {"joint_attn_attention": fig}
