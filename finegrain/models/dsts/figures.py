"""DSTS's diagnostics pictures: which neuron each clip is routed to, and each neuron's share of
channels that go to its temporal operation (per layer, split by the synthetic benchmark's
spatial/temporal classes when the batch's per-clip selection is known)."""

from __future__ import annotations

import math
import re

import numpy as np

from finegrain.platform.figures import (
    SUBTLETY_COLOURS,
    TEXT_PT,
    _footer,
    _nice_step,
    _np,
    _subplots,
    _subtlety_per_clip,
    _title,
)

DSTS_KEY = re.compile(r"dsts/layer(\d+)/(\w+)")


def draw(diagnostics, sample, names, class_groups) -> dict:
    """Per layer: how often each neuron is selected, and each neuron's temporal share.

    Reads ``dsts/layer{j}/selected`` (N,) counts, ``dsts/layer{j}/temporal_share`` (N,) and,
    when the model provides it, ``dsts/layer{j}/selection`` (B,): each clip's selected neuron.
    With that and the synthetic benchmark's groups, the selection bars are split into
    spatial-subtle / temporal-subtle clips (share of each group's clips) and the temporal-share
    panel marks the mean temporal share of the neurons each group's clips went through.
    """
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, value in diagnostics.items():
        m = DSTS_KEY.fullmatch(str(key))
        if m:
            layers.setdefault(int(m[1]), {})[m[2]] = _np(value).reshape(-1)
    figs = {}
    selected = {j: d for j, d in sorted(layers.items()) if "selected" in d or "selection" in d}
    if selected:
        figs["dsts_neuron_selection"] = _dsts_selection(selected, sample, names, class_groups)
    shared = {j: d for j, d in sorted(layers.items()) if "temporal_share" in d}
    if shared:
        figs["dsts_temporal_share"] = _dsts_temporal_share(shared, sample, names, class_groups)
    return figs


def _layer_axes(count: int, neurons: int):
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    width = min(12.0, max(5.0, cols * max(2.8, 0.8 + 0.25 * neurons)))
    fig, axes = _subplots(rows, cols, figsize=(width, 0.8 + 2.4 * rows), squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def _neuron_axis(ax, n: int) -> None:
    """Neuron indices on the x axis (every few when they would not fit), shares on y."""
    width = ax.figure.get_figwidth() / min(3, len(ax.figure.axes)) - 0.5
    step = _nice_step(n * 0.25 / max(width, 0.5))
    ax.set_xticks(range(0, n, step), [str(i) for i in range(0, n, step)])
    ax.set_xlabel("neuron", fontsize=TEXT_PT)
    ax.set_ylim(0, 1.05)
    ax.tick_params(labelsize=TEXT_PT)


def _selection_of(d: dict[str, np.ndarray]) -> np.ndarray | None:
    return d["selection"].astype(np.int64) if "selection" in d else None


def _neurons(d: dict[str, np.ndarray]) -> int:
    n = max(len(d.get("selected", ())), len(d.get("temporal_share", ())))
    sel = _selection_of(d)
    return max(n, int(sel.max()) + 1 if sel is not None and len(sel) else 0, 1)


def _dsts_selection(layers, sample, names, class_groups):
    n_max = max(_neurons(d) for d in layers.values())
    fig, axes = _layer_axes(len(layers), n_max)
    for ax, (j, d) in zip(axes, layers.items()):
        n = _neurons(d)
        sel = _selection_of(d)
        kinds = _subtlety_per_clip(sample, names, class_groups, sel)
        x = np.arange(n)
        if kinds:
            present = [k for k in ("spatial", "temporal", "other") if k in kinds]
            width = 0.8 / len(present)
            for g, kind in enumerate(present):
                mask = np.array([k == kind for k in kinds])
                share = np.bincount(sel[mask], minlength=n)[:n] / mask.sum()
                ax.bar(
                    x - 0.4 + width * (g + 0.5),
                    share,
                    width,
                    color=SUBTLETY_COLOURS[kind],
                    label=f"{kind}-subtle classes ({mask.sum()} clips)",
                )
            total = len(sel)
        else:
            counts = np.bincount(sel, minlength=n)[:n] if sel is not None else d["selected"]
            total = max(int(counts.sum()), 1)
            ax.bar(x, counts / total, 0.7, color="tab:green")
        ax.set_title(f"layer {j} ({total} clips)", fontsize=TEXT_PT + 1)
        _neuron_axis(ax, n)
    axes[0].set_ylabel("share of clips", fontsize=TEXT_PT)
    handles, _ = axes[0].get_legend_handles_labels()
    _title(fig, "Which DSTS neuron each validation clip is routed to")
    caption = (
        "First validation batch, model in evaluation mode (each clip goes through the neuron "
        "with the largest impulse). Bars: share of the clips that select each neuron"
    )
    if handles:
        caption += (
            ", counted within each class group (classes that differ in appearance: "
            "spatial-subtle; in motion: temporal-subtle)"
        )
    _footer(fig, caption + ".", handles)
    return fig


def _dsts_temporal_share(layers, sample, names, class_groups):
    n_max = max(_neurons(d) for d in layers.values())
    fig, axes = _layer_axes(len(layers), n_max)
    for ax, (j, d) in zip(axes, layers.items()):
        share = d["temporal_share"]
        x = np.arange(len(share))
        sel = _selection_of(d)
        used = None
        if sel is not None:
            used = np.bincount(sel, minlength=len(share))[: len(share)] > 0
        elif "selected" in d and len(d["selected"]) == len(share):
            used = d["selected"] > 0
        alpha = np.where(used, 1.0, 0.35) if used is not None else np.ones(len(share))
        for i in x:  # faded: no clip of the batch selected the neuron
            ax.bar(i, share[i], 0.7, color="tab:purple", alpha=float(alpha[i]))
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=0.8)
        kinds = _subtlety_per_clip(sample, names, class_groups, sel)
        means = {}
        if kinds is not None and len(sel) and sel.max() < len(share):
            for kind in ("spatial", "temporal"):
                mask = np.array([k == kind for k in kinds])
                if mask.any():
                    means[kind] = float(share[sel[mask]].mean())
        values = _mean_lines(ax, means)
        ax.set_title(f"layer {j}" + (f"\n{values}" if values else ""), fontsize=TEXT_PT)
        _neuron_axis(ax, len(share))
    axes[0].set_ylabel("share of channels to temporal op", fontsize=TEXT_PT)
    handles, _ = axes[0].get_legend_handles_labels()
    _title(fig, "Share of each DSTS neuron's channels that go to its temporal operation")
    caption = (
        "Gates b = 1[g > 0] send a channel to the neuron's temporal op T_i (b = 1) or to its "
        "spatial op S_i (b = 0); a bar is the mean of b over the channels. Faded bars: no clip "
        "of the first validation batch selected the neuron; dotted grey line: half."
    )
    if handles:
        caption += (
            " Lines: mean share of the neurons that the clips of spatial-subtle (dashed) and "
            "temporal-subtle (dotted) classes went through, their values under each layer's name "
            "(spatial · temporal)."
        )
    _footer(fig, caption, handles)
    return fig


def _mean_lines(ax, means: dict[str, float]) -> str:
    """A line per class group at its mean temporal share, in its own style; returns the values
    for the panel's title (written inside the axes, they hid the bars under them)."""
    styles = {"spatial": "--", "temporal": ":"}
    for kind, mean in means.items():
        ax.axhline(
            mean,
            color=SUBTLETY_COLOURS[kind],
            linestyle=styles[kind],
            linewidth=2,
            label=f"mean over {kind}-subtle classes' clips",
        )
    # short ("spatial 0.55 · temporal 0.56"; the legend names the groups): with the groups'
    # full names the titles of three panels a row ran into each other
    return " · ".join(f"{kind} {mean:.2f}" for kind, mean in means.items())
